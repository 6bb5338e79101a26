/* sf-share.c: clones hand results back to their parent through XenStore; the tool
 * as sflib/cli/share.py, with sflib/guest/share.py's layout: a value as base64
 * chunks <key>/<i>, then <key>/chunks, written last, so no reader sees half a value. */
#define _GNU_SOURCE
#include "sf-share.h"

#include "sf-call.h"
#include "sf-cli.h"
#include "sf-freepages.h"
#include "sf-xs.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 1536u /* base64 makes 2048 of it */
#define SHARE "snowflock/share"
#define PARENT_SHARE SHARE "/parent/0" /* a parent's own results, for the host */
#define PATH_MAX_ 256

static const struct sfa_cmd SHARE_CMDS[] = {
    {"put", "In a clone: share FILE (or stdin) with the parent under KEY.", NULL, {{NULL}},
     {{"KEY", 0, "A name: [A-Za-z0-9_-], at most 64."},
      {"FILE", 1, "What to share [default: stdin]."}}, NULL},
    {"get", "In the parent: what clone ID of TICKET shared under KEY.", NULL, {{NULL}},
     {{"TICKET", 0, "The ticket the clones were made with."}, {"CLONE_ID", 0, "The clone's ID."},
      {"KEY", 0, "A name: [A-Za-z0-9_-], at most 64."},
      {"FILE", 1, "Where to write [default: stdout]."}}, NULL},
    {"ls", "In the parent: each clone's shared keys, \"ID KEY\" per line.", NULL,
     {{"--json", 0, NULL, NULL, "Print as JSON."}},
     {{"TICKET", 0, "The ticket the clones were made with."}}, NULL},
    {"clear", "In the parent: remove everything shared under TICKET.", NULL, {{NULL}},
     {{"TICKET", 0, "The ticket the clones were made with."}}, NULL},
    {NULL, NULL, NULL, {{NULL}}, {{NULL, 0, NULL}}, NULL},
};

static const struct sfa_cmd SHARE_GROUP = {
    "sf-share", "Clones hand results back to their parent through XenStore.", NULL,
    {{"--debug", 0, NULL, NULL, "Log debug messages and show tracebacks on errors."},
     {"--quiet", 'q', NULL, NULL, "Log only warnings and errors."}},
    {{NULL, 0, NULL}}, SHARE_CMDS};

/* A connection, or the tool's exit 5 (or 111). */
static void connect_or_fail(struct sfx *x)
{
    char why[SFC_WHY_MAX];
    int rc = sfc_reachable(why, sizeof why);

    if (rc < 0 || (rc = sfx_open(x)) < 0)
        sfa_fail(-rc, "%s", rc < 0 && why[0] ? why : strerror(errno));
}

static void check_key(const struct sfa_line *line, const char *key)
{
    size_t n = strlen(key);

    if (n < 1 || n > 64 || strspn(key, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                       "0123456789_-") != n)
        sfa_fail(2, "invalid key '%s' (use [A-Za-z0-9_-], at most 64)", key);
    (void)line;
}

/* All of stream, malloc'd, its length in *len; or the tool's error. */
static unsigned char *slurp(FILE *in, const char *name, size_t *len)
{
    size_t cap = 1 << 16;
    unsigned char *data = malloc(cap);

    *len = 0;
    while (data) {
        *len += fread(data + *len, 1, cap - *len, in);
        if (*len < cap)
            break;
        unsigned char *more = realloc(data, cap *= 2);
        if (!more)
            free(data);
        data = more;
    }
    if (!data)
        sfa_fail(111, "out of memory reading %s", name);
    if (ferror(in))
        sfa_fail(111, "cannot read %s: %s", name, strerror(errno));
    return data;
}

/* Where this VM shares: a clone's folder as sfld wrote it in its identity, or the
 * parent's own one. */
static void share_folder(struct sfx *x, char *out, size_t size)
{
    char raw[SFX_PAYLOAD_MAX + 1];
    struct sfj identity;
    size_t len = 0;

    if (sfx_read(x, "snowflock/identity", raw, sizeof raw, &len) < 0)
        sfa_fail(111, "cannot read this VM's identity: %s", strerror(errno));
    if (len == 0) {
        snprintf(out, size, "%s", PARENT_SHARE);
        return;
    }
    if (sfj_parse(raw, len, &identity) < 0 || !sfj_get_str(&identity, "share"))
        sfa_fail(111, "this clone's identity names no share folder");
    snprintf(out, size, "%s", sfj_get_str(&identity, "share"));
    sfj_free(&identity);
}

static int put(const struct sfa_line *line)
{
    char base[PATH_MAX_], path[PATH_MAX_ + 16], value[2 * CHUNK + 8];
    const char *key = line->arg[0], *file = line->arg[1];
    unsigned char *data;
    size_t len, chunks = 0;
    struct sfx x;
    FILE *in;
    int rc = 0;

    check_key(line, key);
    in = file ? fopen(file, "rbe") : stdin;
    if (!in)
        sfa_fail(2, "cannot open %s: %s", file, strerror(errno));
    data = slurp(in, file ? file : "stdin", &len);
    if (file)
        (void)fclose(in); /* read only */
    connect_or_fail(&x);
    share_folder(&x, base, sizeof base - 66);
    strcat(strcat(base, "/"), key);
    while (rc == 0 && chunks * CHUNK < len) { /* no data: no chunk, a count of 0 */
        size_t n = len - chunks * CHUNK < CHUNK ? len - chunks * CHUNK : CHUNK;
        size_t vlen = sff_base64(data + chunks * CHUNK, n, value);
        snprintf(path, sizeof path, "%s/%zu", base, chunks++);
        rc = sfx_write(&x, path, value, vlen);
    }
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/chunks", base);
        snprintf(value, sizeof value, "%zu", chunks);
        rc = sfx_write(&x, path, value, strlen(value));
    }
    free(data);
    if (rc < 0) {
        int err = errno;
        if (sfx_rm(&x, base) < 0) /* half a value only uses up the quota the rest needs */
            sfa_log(SFA_WARNING, "the half-shared %s stays: %s", base, strerror(errno));
        sfa_fail(111, "cannot share %s (%zu bytes): %s (XenStore holds little; share a "
                      "digest or a path on shared storage instead)", key, len,
                 err == ENOSPC ? "over the domain's XenStore quota" : strerror(err));
    }
    sfx_close(&x);
    return 0;
}

/* A base64 value decoded onto out; 0, or -1 if it is no base64. */
static int unbase64(const char *in, size_t n, FILE *out)
{
    static const char ABC[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned v = 0, bits = 0;

    for (size_t i = 0; i < n && in[i] != '='; i++) {
        const char *p = strchr(ABC, in[i]);
        if (!p || !in[i])
            return -1;
        v = v << 6 | (unsigned)(p - ABC);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (fputc((int)(v >> bits & 0xff), out) == EOF)
                return -1;
        }
    }
    return 0;
}

static int get(const struct sfa_line *line)
{
    char base[PATH_MAX_], path[PATH_MAX_ + 32], value[SFX_PAYLOAD_MAX + 1];
    const char *ticket = line->arg[0], *file = line->arg[3];
    long id = sfa_int_arg(line, 1, 1, SFA_NO_LIMIT);
    size_t len = 0;
    struct sfx x;
    long chunks;
    char *end;

    check_key(line, line->arg[2]);
    snprintf(base, sizeof base, "%s/%s/%ld/%s", SHARE, ticket, id, line->arg[2]);
    connect_or_fail(&x);
    snprintf(path, sizeof path, "%s/chunks", base);
    if (sfx_read(&x, path, value, sizeof value, &len) < 0 || len == 0)
        sfa_fail(3, "clone %ld of %s shared no %s", id, ticket, line->arg[2]);
    chunks = strtol(value, &end, 10);
    if (*end || chunks < 0)
        sfa_fail(111, "%s holds no count: %s", path, value);
    FILE *out = file ? fopen(file, "wbe") : stdout;
    if (!out)
        sfa_fail(2, "cannot open %s: %s", file, strerror(errno));
    for (long i = 0; i < chunks; i++) {
        snprintf(path, sizeof path, "%s/%ld", base, i);
        if (sfx_read(&x, path, value, sizeof value, &len) < 0)
            sfa_fail(3, "clone %ld of %s shared no %s", id, ticket, line->arg[2]);
        if (unbase64(value, len, out) < 0)
            sfa_fail(111, "%s is no base64, or cannot be written", path);
    }
    if (fflush(out) == EOF || (file && fclose(out) == EOF))
        sfa_fail(111, "cannot write %s: %s", file ? file : "stdout", strerror(errno));
    sfx_close(&x);
    return 0;
}

#define NAMES_MAX 1024

static int by_number(const void *a, const void *b)
{
    long x = strtol(*(char *const *)a, NULL, 10), y = strtol(*(char *const *)b, NULL, 10);

    return (x > y) - (x < y);
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The names under path, sorted by cmp, into names[] (pointing into buf); how many.
 * A missing path is NOT_FOUND. */
static size_t list(struct sfx *x, const char *path, char *buf, size_t cap, char **names,
                   int (*cmp)(const void *, const void *))
{
    size_t len = 0, n = 0;

    if (sfx_list(x, path, buf, cap, &len) < 0)
        sfa_fail(errno == ENOENT ? 3 : 111, "no share for %s", strrchr(path, '/') + 1);
    for (size_t at = 0; at < len && n < NAMES_MAX; at += strlen(buf + at) + 1)
        names[n++] = buf + at;
    qsort(names, n, sizeof *names, cmp);
    return n;
}

/* Whether the value at folder/key is whole: its count is written last. */
static int complete(struct sfx *x, const char *folder, const char *key)
{
    char path[PATH_MAX_ * 4], value[64];
    size_t len = 0;

    snprintf(path, sizeof path, "%s/%s/chunks", folder, key);
    return sfx_read(x, path, value, sizeof value, &len) == 0 && len > 0;
}

static int ls(const struct sfa_line *line)
{
    static char *clones[NAMES_MAX], *keys[NAMES_MAX];
    char cbuf[SFX_PAYLOAD_MAX + 1], kbuf[SFX_PAYLOAD_MAX + 1], folder[PATH_MAX_ * 2];
    int as_json = sfa_flag(line, "--json", 0);
    struct sfx x;

    connect_or_fail(&x);
    snprintf(folder, sizeof folder, "%s/%s", SHARE, line->arg[0]);
    size_t n = list(&x, folder, cbuf, sizeof cbuf, clones, by_number);
    if (as_json)
        putchar('{');
    for (size_t c = 0; c < n; c++) {
        snprintf(folder, sizeof folder, "%s/%s/%s", SHARE, line->arg[0], clones[c]);
        size_t m = list(&x, folder, kbuf, sizeof kbuf, keys, by_name);
        if (as_json)
            printf("%s\"%s\": [", c ? ", " : "", clones[c]);
        for (size_t k = 0, shown = 0; k < m; k++) {
            if (!complete(&x, folder, keys[k]))
                continue; /* not (yet) whole */
            if (as_json)
                printf("%s\"%s\"", shown++ ? ", " : "", keys[k]);
            else
                printf("%s %s\n", clones[c], keys[k]);
        }
        if (as_json)
            putchar(']');
    }
    if (as_json)
        puts("}");
    sfx_close(&x);
    return 0;
}

static int clear(const struct sfa_line *line)
{
    char path[PATH_MAX_];
    struct sfx x;

    connect_or_fail(&x);
    snprintf(path, sizeof path, "%s/%s", SHARE, line->arg[0]);
    if (sfx_rm(&x, path) < 0 && errno != ENOENT)
        sfa_fail(111, "cannot remove %s: %s", path, strerror(errno));
    sfx_close(&x);
    return 0;
}

int share_main(int argc, char **argv)
{
    struct sfa_line line;

    sfa_parse(&SHARE_GROUP, argc, argv, &line);
    sfa_log_setup("sf-share", sfa_flag(&line, "--debug", 0), sfa_flag(&line, "--quiet", 0));
    if (strcmp(line.cmd->name, "put") == 0)
        return put(&line);
    if (strcmp(line.cmd->name, "get") == 0)
        return get(&line);
    if (strcmp(line.cmd->name, "ls") == 0)
        return ls(&line);
    return clear(&line);
}

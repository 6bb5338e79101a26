/* sf-unittest: libsnowflock without a VM. The JSON reader and writer, the request
 * and reply messages, the hook runner (real scripts in a temporary folder), then
 * every call against a fake XenStore peer: a thread serving one Unix socket, given
 * to the library as $SF_XENBUS, which answers each request as sfld would.
 * Run under valgrind by `make test-c`. Prints "N failed" and exits 1 on failure.
 * (The calls against the real agent and XenStore server: test_c_agent.py.)
 */
#define _GNU_SOURCE
#include "snowflock.h"

#include "sf-freepages.h"
#include "sf-hooks.h"
#include "sf-json.h"
#include "sf-proto.h"
#include "sf-xs.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(failures, cond) check((cond), #cond, __LINE__, (failures))

static void check(int ok, const char *what, int line, int *failures)
{
    if (!ok) {
        fprintf(stderr, "sf-unittest.c:%d: FAILED: %s\n", line, what);
        ++*failures;
    }
}

/* JSON ---------------------------------------------------------------------------- */

static int parses(const char *text)
{
    struct sfj v;

    if (sfj_parse(text, strlen(text), &v) < 0)
        return 0;
    sfj_free(&v);
    return 1;
}

/* text parsed and written again, compact, into out[size]: 0 or -1. */
static int round_trip(const char *text, char *out, size_t size)
{
    struct sfj_out o;
    struct sfj v;

    if (sfj_parse(text, strlen(text), &v) < 0)
        return -1;
    sfj_out_init(&o, out, size);
    sfj_value(&o, &v);
    sfj_free(&v);
    return o.failed ? -1 : 0;
}

static void test_json_reader(int *f)
{
    const char *text = " {\"a\": [1, -2, 3.5e1, true, false, null], \"s\": \"x\\\"\\\\\\/\\b\\f\\n\\r\\t\","
                       " \"u\": \"\\u00e9\\ud83d\\ude00\", \"a\": {}} ";
    struct sfj v;
    long long i;

    CHECK(f, sfj_parse(text, strlen(text), &v) == 0);
    CHECK(f, v.type == SFJ_OBJECT && v.n == 4);
    CHECK(f, sfj_get(&v, "a")->type == SFJ_OBJECT); /* the last duplicate wins */
    CHECK(f, v.kids[0].n == 6 && v.kids[0].kids[1].type == SFJ_INT && v.kids[0].kids[1].i == -2);
    CHECK(f, v.kids[0].kids[2].type == SFJ_REAL && strcmp(v.kids[0].kids[2].str, "3.5e1") == 0);
    CHECK(f, v.kids[0].kids[3].type == SFJ_TRUE && v.kids[0].kids[5].type == SFJ_NULL);
    CHECK(f, strcmp(sfj_get_str(&v, "s"), "x\"\\/\b\f\n\r\t") == 0);
    CHECK(f, strcmp(sfj_get_str(&v, "u"), "\xc3\xa9\xf0\x9f\x98\x80") == 0);
    CHECK(f, sfj_get_str(&v, "a") == NULL && sfj_get(&v, "nothing") == NULL);
    CHECK(f, sfj_get_int(&v, "s", 0, 9, &i) < 0);
    sfj_free(&v);

    CHECK(f, parses("0") && parses("-0") && parses("\"\"") && parses("[]") && parses("[[]]"));
    CHECK(f, parses("99999999999999999999")); /* too big for SFJ_INT: SFJ_REAL */
    CHECK(f, !parses("") && !parses(" ") && !parses("01") && !parses("1.") && !parses(".5"));
    CHECK(f, !parses("1e") && !parses("+1") && !parses("-") && !parses("0x10"));
    CHECK(f, !parses("[1,]") && !parses("{\"a\":1,}") && !parses("{\"a\"}") && !parses("{1:2}"));
    CHECK(f, !parses("[1] x") && !parses("[1") && !parses("\"abc") && !parses("tru"));
    CHECK(f, !parses("\"a\tb\"") && !parses("\"\\x\"") && !parses("\"\\u12\""));
    CHECK(f, !parses("\"\\u0000\"") && !parses("\"\\udc00\"") && !parses("\"\\ud83d\""));
    CHECK(f, !parses("\"\\ud83d\\u0041\"") && !parses("NaN") && !parses("{\"a\" 1}"));
}

static void test_json_limits(int *f)
{
    char deep[2 * SFJ_DEPTH_MAX + 8];
    size_t n = 0;

    for (int k = 0; k < SFJ_DEPTH_MAX; k++)
        deep[n++] = '[';
    for (int k = 0; k < SFJ_DEPTH_MAX; k++)
        deep[n++] = ']';
    deep[n] = '\0';
    CHECK(f, parses(deep));
    memmove(deep + 1, deep, n + 1);
    deep[0] = '[';
    strcat(deep, "]");
    CHECK(f, !parses(deep) && errno == EPROTO);
    {
        struct sfj v;
        long long i;
        CHECK(f, sfj_parse("{\"n\": 5}", 8, &v) == 0);
        CHECK(f, sfj_get_int(&v, "n", 0, 9, &i) == 0 && i == 5);
        CHECK(f, sfj_get_int(&v, "n", 6, 9, &i) < 0);
        sfj_free(&v);
        CHECK(f, sfj_parse("{\"n\": 5} trailing", 17, &v) < 0);
        CHECK(f, sfj_parse("[1]xyz", 3, &v) == 0); /* only len bytes are read */
        sfj_free(&v);
    }
}

static void test_json_writer(int *f)
{
    char buf[128], tiny[8];
    struct sfj_out o;

    sfj_out_init(&o, buf, sizeof buf);
    sfj_raw(&o, "{");
    sfj_key(&o, "a\"b", 1);
    sfj_string(&o, "q\"\\\n\x01\xc3\xa9");
    sfj_key(&o, "n", 0);
    sfj_int(&o, -42);
    sfj_raw(&o, "}");
    CHECK(f, !o.failed);
    CHECK(f, strcmp(buf, "{\"a\\\"b\": \"q\\\"\\\\\\u000a\\u0001\xc3\xa9\", \"n\": -42}") == 0);
    CHECK(f, parses(buf));
    sfj_out_init(&o, tiny, sizeof tiny);
    sfj_string(&o, "too long for it");
    CHECK(f, o.failed && strlen(tiny) < sizeof tiny);
    CHECK(f, round_trip(" {\"a\" : [1,2.5, null,{}],\"b\":\"\\u00e9\"} ", buf, sizeof buf) == 0);
    CHECK(f, strcmp(buf, "{\"a\": [1, 2.5, null, {}], \"b\": \"\xc3\xa9\"}") == 0);
    CHECK(f, round_trip("[true, false]", tiny, sizeof tiny) < 0);
}

static void test_json_indented(int *f)
{
    const char *text = "{\"a\": [1, {\"b\": null}], \"e\": {}, \"l\": [], \"s\": \"x\"}";
    char buf[256];
    struct sfj v;
    struct sfj_out o;

    CHECK(f, sfj_parse(text, strlen(text), &v) == 0);
    sfj_out_init(&o, buf, sizeof buf);
    sfj_value_indented(&o, &v, 2);
    CHECK(f, !o.failed); /* as Python's json.dumps(v, indent=2) */
    CHECK(f, strcmp(buf, "{\n  \"a\": [\n    1,\n    {\n      \"b\": null\n    }\n  ],\n"
                         "  \"e\": {},\n  \"l\": [],\n  \"s\": \"x\"\n}") == 0);
    sfj_free(&v);
}

/* The free-page report ------------------------------------------------------------- */

static void test_free_page_report(int *f)
{
    uint64_t pfns[] = {9, 3, 4, 5, 12, 10, 3, 11, 1}, runs[18];
    char out[16];

    CHECK(f, sff_runs(pfns, 9, runs) == 3); /* sorted, merged, the duplicate dropped */
    CHECK(f, runs[0] == 1 && runs[1] == 1 && runs[2] == 3 && runs[3] == 3);
    CHECK(f, runs[4] == 9 && runs[5] == 4);
    CHECK(f, sff_runs(pfns, 0, runs) == 0);
    CHECK(f, sff_margin(512ull << 20) == (512ull << 20) / 1000 * 100);
    CHECK(f, sff_margin(128ull << 20) == 24ull << 20); /* at least 24 MiB */
    CHECK(f, sff_base64((const unsigned char *)"", 0, out) == 0 && !out[0]);
    CHECK(f, sff_base64((const unsigned char *)"f", 1, out) == 4 && !strcmp(out, "Zg=="));
    CHECK(f, sff_base64((const unsigned char *)"fo", 2, out) == 4 && !strcmp(out, "Zm8="));
    CHECK(f, sff_base64((const unsigned char *)"foob\xff", 5, out) == 8 && !strcmp(out, "Zm9vYv8="));
}

/* Messages ------------------------------------------------------------------------ */

static void test_requests(int *f)
{
    const unsigned char rnd[8] = {0, 1, 2, 0xab, 0xcd, 0xef, 0x10, 0xff};
    struct sfp_arg args[] = {{"ticket", "t1-\"x", 0}, {"n", NULL, -3}};
    char rid[SFP_RID_MAX + 1], msg[128];

    sfp_rid(rid, 1234, 1240, rnd);
    CHECK(f, strcmp(rid, "1234-1240-000102abcdef10ff") == 0);
    sfp_rid(rid, 4194304, 4194304, rnd);
    CHECK(f, strlen(rid) <= SFP_RID_MAX && strspn(rid, "0123456789abcdef-") == strlen(rid));
    CHECK(f, sfp_request(msg, sizeof msg, "kill", args, 2) > 0);
    CHECK(f, strcmp(msg, "{\"op\": \"kill\", \"args\": {\"ticket\": \"t1-\\\"x\", \"n\": -3}}") == 0);
    CHECK(f, sfp_request(msg, sizeof msg, "checkpoint", NULL, 0) > 0);
    CHECK(f, strcmp(msg, "{\"op\": \"checkpoint\", \"args\": {}}") == 0);
    CHECK(f, sfp_request(msg, 20, "checkpoint", NULL, 0) == -1);
}

/* The code sfp_reply gives raw, and what it says into msg. */
static int reply_code(const char *raw, char *msg, size_t size)
{
    struct sfj result;
    int rc = sfp_reply(raw, strlen(raw), &result, msg, size);

    sfj_free(&result);
    return rc;
}

static void test_replies(int *f)
{
    static const struct {
        const char *type;
        int code;
    } types[] = {{"UsageError", 2}, {"NotFoundError", 3}, {"WrongStateError", 4},
                 {"UnreachableError", 5}, {"OperationTimeout", 99}, {"SystemFailure", 111},
                 {"SnowFlockError", 1}, {"AuthError", 1}, {"HookFailed", 1}};
    char raw[256], msg[64];
    struct sfj result;

    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        snprintf(raw, sizeof raw, "{\"ok\": false, \"error\": {\"type\": \"%s\", \"message\": "
                                  "\"no ticket t9\", \"hint\": null}}", types[k].type);
        CHECK(f, reply_code(raw, msg, sizeof msg) == -types[k].code);
        CHECK(f, strcmp(msg, "no ticket t9") == 0);
        CHECK(f, sfp_error_code(types[k].type) == types[k].code);
    }
    CHECK(f, reply_code("{\"ok\": false, \"error\": {\"type\": \"UsageError\", \"message\": \"bad\", "
                        "\"hint\": \"try 1\"}}", msg, sizeof msg) == -SF_EUSAGE);
    CHECK(f, strcmp(msg, "bad (try 1)") == 0);
    CHECK(f, reply_code("{\"ok\": false}", msg, sizeof msg) == -SF_EFAILED);
    CHECK(f, strcmp(msg, "None") == 0);
    CHECK(f, reply_code("{\"ok\": 1}", msg, sizeof msg) == -SF_ESYSTEM && errno == EPROTO);
    CHECK(f, reply_code("[]", msg, sizeof msg) == -SF_ESYSTEM && errno == EPROTO);
    CHECK(f, reply_code("{\"ok\": true, \"result\"", msg, sizeof msg) == -SF_ESYSTEM);
    CHECK(f, sfp_reply("{\"ok\": true}", 12, &result, msg, sizeof msg) == 0);
    CHECK(f, result.type == SFJ_NULL);
    sfj_free(&result);
    CHECK(f, sfp_reply("{\"result\": {\"id\": 3}, \"ok\": true}", 33, &result, msg, 0) == 0);
    CHECK(f, result.type == SFJ_OBJECT && result.key == NULL && result.kids[0].i == 3);
    sfj_free(&result);
}

static int result_of(const char *text, struct sfj *v)
{
    return sfj_parse(text, strlen(text), v);
}

static void test_results(int *f)
{
    const char *seed, *name;
    sf_ticket_t t;
    struct sfj v;

    CHECK(f, result_of("{\"ticket\": \"t1-abc\", \"granted\": 2, \"requested\": 3}", &v) == 0);
    CHECK(f, sfp_ticket(&v, &t) == 0 && strcmp(t.id, "t1-abc") == 0 && t.granted == 2 &&
             t.requested == 3);
    sfj_free(&v);
    CHECK(f, result_of("{\"ticket\": \"t1\", \"granted\": -1, \"requested\": 3}", &v) == 0);
    CHECK(f, sfp_ticket(&v, &t) == -SF_ESYSTEM && errno == EPROTO);
    sfj_free(&v);
    CHECK(f, result_of("{\"ticket\": \"" "0123456789012345678901234567890123456789"
                       "012345678901234567890123\", \"granted\": 1, \"requested\": 1}", &v) == 0);
    CHECK(f, sfp_ticket(&v, &t) == -SF_ESYSTEM); /* 64 characters: no room for the NUL */
    sfj_free(&v);

    CHECK(f, result_of("{\"id\": 2, \"seed\": \"00ff\", \"checkpoint\": \"c1-x\"}", &v) == 0);
    CHECK(f, sfp_fork(&v, &seed, &name) == 2 && strcmp(seed, "00ff") == 0);
    CHECK(f, strcmp(name, "c1-x") == 0);
    sfj_free(&v);
    CHECK(f, result_of("{\"id\": 0}", &v) == 0);
    CHECK(f, sfp_fork(&v, &seed, NULL) == 0 && seed == NULL);
    CHECK(f, sfp_fork(&v, &seed, &name) == -SF_ESYSTEM); /* no checkpoint named */
    sfj_free(&v);
    CHECK(f, result_of("{\"id\": \"1\"}", &v) == 0);
    CHECK(f, sfp_fork(&v, &seed, NULL) == -SF_ESYSTEM);
    sfj_free(&v);
}

#define JOINED "{\"ticket\": \"t1\", \"pause_ms\": 101.5, \"clones\": {" \
    "\"2\": {\"id\": 2, \"vm\": \"t1-2\", \"state\": \"crashed\", \"status\": null, \"ready_ms\": 1.5}," \
    "\"10\": {\"id\": 10, \"state\": \"killed\", \"status\": null}," \
    "\"1\": {\"id\": 1, \"state\": \"exited\", \"status\": 11, \"host\": \"h1\"}}}"

static void test_clone_lists(int *f)
{
    sf_clone_status_t c[2];
    struct sfj v;

    CHECK(f, result_of(JOINED, &v) == 0);
    CHECK(f, sfp_clones(&v, c, 2, 0) == 3);
    CHECK(f, c[0].id == 1 && strcmp(c[0].state, "exited") == 0 && c[0].status == 11);
    CHECK(f, c[1].id == 2 && strcmp(c[1].state, "crashed") == 0 && c[1].status == -1);
    CHECK(f, sfp_clones(&v, NULL, 0, 1) == 1);
    sfj_free(&v);
    CHECK(f, result_of("{\"clones\": {}}", &v) == 0 && sfp_clones(&v, c, 2, 0) == 0);
    sfj_free(&v);
    CHECK(f, result_of("{\"clones\": {\"1\": {\"id\": 1, \"state\": \"exited\", \"status\": 256}}}",
                       &v) == 0);
    CHECK(f, sfp_clones(&v, c, 2, 0) == -SF_ESYSTEM && errno == EPROTO);
    sfj_free(&v);
    CHECK(f, result_of("{\"clones\": {\"1\": {\"id\": 1, \"state\": \"a-state-too-long-for-it\", "
                       "\"status\": 0}}}", &v) == 0);
    CHECK(f, sfp_clones(&v, c, 2, 0) == -SF_ESYSTEM);
    sfj_free(&v);
    CHECK(f, result_of("{\"clones\": []}", &v) == 0 && sfp_clones(&v, c, 2, 0) == -SF_ESYSTEM);
    sfj_free(&v);

    CHECK(f, sfx_errno("ENOENT") == ENOENT && sfx_errno("EACCES") == EACCES);
    CHECK(f, sfx_errno("EWHATEVER") == EIO);
    CHECK(f, strcmp(sf_strerror(-SF_ENOTFOUND), sf_strerror(SF_ENOTFOUND)) == 0);
    CHECK(f, strstr(sf_strerror(-SF_EUNREACHABLE), "daemon") != NULL);
    CHECK(f, strcmp(sf_strerror(-12345), "unknown SnowFlock error") == 0);
}

/* Hooks --------------------------------------------------------------------------- */

static int write_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    size_t len = strlen(text);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = write(fd, text, len);
    if (close(fd) < 0 || n != (ssize_t)len)
        return -1;
    return 0;
}

/* The whole of a small file into out[size] ("" if it cannot be read). */
static const char *read_file(const char *path, char *out, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, out, size - 1);

    out[n > 0 ? n : 0] = '\0';
    if (fd >= 0 && close(fd) < 0)
        out[0] = '\0';
    return out;
}

static void test_hook_environment(int *f)
{
    char *environ_[] = {"HOME=/root", "SF_X=1", "SF_ID=stale", "PATH=/mine", "SF_NOEQUALS", NULL};
    struct sfj identity;
    char **env;
    size_t n = 0;

    CHECK(f, sfh_name_ok("10-network") && sfh_name_ok("a_B-9"));
    CHECK(f, !sfh_name_ok("") && !sfh_name_ok("x.bak") && !sfh_name_ok("x~") && !sfh_name_ok("a b"));
    CHECK(f, result_of("{\"id\": 3, \"family\": \"web\", \"up\": true, \"none\": null, "
                       "\"net\": {\"ip\": \"10.0.0.3/24\"}, \"ms\": 2.5}", &identity) == 0);
    env = sfh_environment(environ_, "clone", "post", &identity);
    CHECK(f, env != NULL);
    while (env && env[n])
        n++;
    CHECK(f, n == 10);
    if (n == 10) {
        const char *want[] = {"SF_X=1", "SF_ID=3", "PATH=" SFH_PATH, "SF_HOOKS_EVENT=clone",
                              "SF_HOOKS_PHASE=post", "SF_FAMILY=web", "SF_UP=True",
                              "SF_NONE=None", "SF_NET={\"ip\": \"10.0.0.3/24\"}", "SF_MS=2.5"};
        for (size_t k = 0; k < n; k++)
            CHECK(f, strcmp(env[k], want[k]) == 0);
    }
    sfh_free_env(env);
    sfj_free(&identity);
}

struct hooks_dir {
    char root[64], dir[128], out[160];
};

/* root/clone-post.d with hooks: 10-env records its environment and stdin, 20-fail
 * fails (the rest still run), 30-after runs after it, x.bak and 40-noexec never
 * run, 50-slow outlives a short timeout. */
static int make_hooks(struct hooks_dir *h)
{
    static const struct {
        const char *name, *script;
        mode_t mode;
    } hooks[] = {
        {"10-env", "#!/bin/sh\nenv | sort > \"$0.out\"\nread x && echo stdin:$x >> \"$0.out\"\n"
                   "echo to stdout\nexit 0\n", 0755},
        {"20-fail", "#!/bin/sh\necho some noise >&2\necho the reason >&2\nexit 3\n", 0755},
        {"30-after", "#!/bin/sh\ntouch \"$0.out\"\n", 0755},
        {"x.bak", "#!/bin/sh\ntouch \"$0.out\"\n", 0755},
        {"40-noexec", "#!/bin/sh\ntouch \"$0.out\"\n", 0644},
        {"50-slow", "#!/bin/sh\n[ -n \"$SF_SLOW\" ] && exec sleep 30\nexit 0\n", 0755},
    };
    char path[256];

    strcpy(h->root, "/tmp/sf-unittest-XXXXXX");
    if (!mkdtemp(h->root))
        return -1;
    snprintf(h->dir, sizeof h->dir, "%s/clone-post.d", h->root);
    if (mkdir(h->dir, 0755) < 0)
        return -1;
    for (size_t k = 0; k < sizeof hooks / sizeof hooks[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", h->dir, hooks[k].name);
        if (write_file(path, hooks[k].script, hooks[k].mode) < 0)
            return -1;
    }
    return 0;
}

static int exists(const char *dir, const char *name)
{
    char path[256];

    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

static int remove_hooks(struct hooks_dir *h)
{
    const char *names[] = {"10-env", "10-env.out", "20-fail", "30-after", "30-after.out",
                           "x.bak", "40-noexec", "50-slow"};
    char path[256];

    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", h->dir, names[k]);
        if (unlink(path) < 0 && errno != ENOENT)
            return -1;
    }
    return rmdir(h->dir) < 0 || rmdir(h->root) < 0 ? -1 : 0;
}

static void test_hooks(int *f)
{
    struct hooks_dir h;
    struct sfj identity;
    char text[4096], path[256];

    CHECK(f, make_hooks(&h) == 0);
    CHECK(f, result_of("{\"id\": 2, \"ticket\": \"t1-abc\"}", &identity) == 0);
    fprintf(stderr, "sf-unittest: complaints about 20-fail (and 50-slow) are expected:\n");
    CHECK(f, setenv("SF_KEEP", "kept", 1) == 0 && setenv("OTHER", "dropped", 1) == 0);
    CHECK(f, sfh_run_hooks(h.root, "clone", "post", &identity, 5000) == 1);
    snprintf(path, sizeof path, "%s/10-env.out", h.dir);
    read_file(path, text, sizeof text);
    CHECK(f, strstr(text, "SF_ID=2\n") && strstr(text, "SF_TICKET=t1-abc\n"));
    CHECK(f, strstr(text, "SF_KEEP=kept\n") && strstr(text, "SF_HOOKS_EVENT=clone\n"));
    CHECK(f, strstr(text, "PATH=" SFH_PATH "\n") && !strstr(text, "OTHER="));
    CHECK(f, !strstr(text, "stdin:")); /* /dev/null: nothing to read */
    CHECK(f, exists(h.dir, "30-after.out") && !exists(h.dir, "x.bak.out"));
    CHECK(f, !exists(h.dir, "40-noexec.out"));
    CHECK(f, setenv("SF_SLOW", "1", 1) == 0);
    CHECK(f, sfh_run_hooks(h.root, "clone", "post", &identity, 2000) == 2); /* 50-slow too */
    CHECK(f, unsetenv("SF_SLOW") == 0 && unsetenv("SF_KEEP") == 0 && unsetenv("OTHER") == 0);
    CHECK(f, sfh_run_hooks(h.root, "clone", "pre", &identity, 2000) == 0); /* no such folder */
    CHECK(f, setenv("SF_HOOKS_DIR", h.root, 1) == 0);
    CHECK(f, sfh_run_hooks(NULL, "clone", "post", NULL, 5000) == 1);
    CHECK(f, unsetenv("SF_HOOKS_DIR") == 0);
    sfj_free(&identity);
    CHECK(f, remove_hooks(&h) == 0);
    sfh_reseed("zz"); /* not hex: a warning, nothing else */
    sfh_reseed(NULL);
}

/* A fake XenStore peer ------------------------------------------------------------- */

/* What sfld would answer to the request raw (JSON), into reply[size]. */
static void answer(const char *raw, char *reply, size_t size)
{
    static const char *const error = "{\"ok\": false, \"error\": {\"type\": \"%s\", "
                                     "\"message\": \"%s\", \"hint\": null}}";
    struct sfj req;
    const struct sfj *args;
    const char *op, *ticket;
    long long n = -1;

    if (sfj_parse(raw, strlen(raw), &req) < 0) {
        snprintf(reply, size, error, "UsageError", "malformed request");
        return;
    }
    op = sfj_get_str(&req, "op");
    args = sfj_get(&req, "args");
    ticket = sfj_get_str(args, "ticket");
    (void)(sfj_get_int(args, "n", -999, 999, &n) == 0 || sfj_get_int(args, "status", 0, 255, &n));
    ticket = ticket ? ticket : "";
    op = op ? op : "";
    if (strcmp(op, "ticket") == 0 && n == 2)
        snprintf(reply, size, "{\"ok\": true, \"result\": {\"ticket\": \"t1-abc\", \"granted\": 2, "
                              "\"requested\": 3}}");
    else if (strcmp(op, "clone") == 0 && strcmp(ticket, "t1-abc") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": {\"id\": 0, \"seed\": \"00ff\"}}");
    else if (strcmp(op, "clone") == 0 && strcmp(ticket, "t-clone") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": {\"id\": 7, \"seed\": \"zz\"}}");
    else if (strcmp(op, "checkpoint") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": {\"checkpoint\": \"c1-x\", \"id\": 0}}");
    else if (strcmp(op, "create_clones") == 0 && strcmp(ticket, "t1-abc") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": {\"clones\": 2, \"id\": 0}}");
    else if (strcmp(op, "join") == 0 && strcmp(ticket, "t1-abc") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": %s}", JOINED);
    else if (strcmp(op, "kill") == 0 && strcmp(ticket, "t1-abc") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": %s}", JOINED);
    else if (strcmp(op, "kill") == 0 && strcmp(ticket, "t-junk") == 0)
        snprintf(reply, size, "{\"ok\": true, \"result\": [1, 2]}");
    else if (strcmp(op, "exit") == 0 && n == 5)
        snprintf(reply, size, "{\"ok\": true, \"result\": {\"status\": 5}}");
    else if (strcmp(op, "exit") == 0)
        snprintf(reply, size, error, "WrongStateError", "sf-exit is for clones");
    else if (strcmp(op, "ticket") == 0)
        snprintf(reply, size, error, "UsageError", "n must be an integer from 1");
    else if (strcmp(op, "kill") == 0)
        snprintf(reply, size, error, "WrongStateError", "ticket already ended");
    else
        snprintf(reply, size, error, "NotFoundError", "no such ticket");
    sfj_free(&req);
}

struct peer {
    char path[108];
    int listener;
    int connections; /* served */
    char identity[256];
    int trickle; /* send byte by byte, each reply after a stray one of another ID */
};

struct conn {
    int fd, trickle;
};

struct msg {
    uint32_t op, id, len;
    char body[SFX_PAYLOAD_MAX + 1];
};

static int recv_msg(int fd, struct msg *m)
{
    unsigned char head[16];

    if (recv(fd, head, 16, MSG_WAITALL) != 16)
        return -1;
    m->op = head[0] | head[1] << 8;
    m->id = head[4] | head[5] << 8 | (uint32_t)head[6] << 16;
    m->len = head[12] | head[13] << 8;
    if (m->len > SFX_PAYLOAD_MAX || (m->len && recv(fd, m->body, m->len, MSG_WAITALL) != (ssize_t)m->len))
        return -1;
    m->body[m->len] = '\0';
    return 0;
}

static int send_all(const struct conn *c, const char *buf, size_t len)
{
    for (size_t k = 0; k < len; k += c->trickle ? 1 : len - k)
        if (send(c->fd, buf + k, c->trickle ? 1 : len - k, MSG_NOSIGNAL) <= 0)
            return -1;
    return 0;
}

static void put_header(char *buf, uint32_t op, uint32_t id, size_t len)
{
    memset(buf, 0, 16);
    buf[0] = (char)op;
    buf[4] = (char)id;
    buf[5] = (char)(id >> 8);
    buf[6] = (char)(id >> 16);
    buf[12] = (char)len;
    buf[13] = (char)(len >> 8);
}

static int send_msg(const struct conn *c, uint32_t op, uint32_t id, const char *body, size_t len)
{
    char buf[16 + SFX_PAYLOAD_MAX];

    if (c->trickle && op != SFX_WATCH_EVENT) { /* what a killed earlier opener left */
        put_header(buf, SFX_READ, id + 1000, 5);
        memcpy(buf + 16, "stray", 5);
        if (send_all(c, buf, 21) < 0)
            return -1;
    }
    put_header(buf, op, id, len);
    memcpy(buf + 16, body, len);
    return send_all(c, buf, 16 + len);
}

/* A watch event for the connection's one watch. */
static int send_event(const struct conn *fd, const char *path, const char *token)
{
    char body[512];
    int n = snprintf(body, sizeof body, "%s%c%s", path, '\0', token);

    return send_msg(fd, SFX_WATCH_EVENT, 0, body, (size_t)n + 1);
}

/* One client connection, as a XenStore server with sfld behind it would serve it.
 * The first read of the reply key finds nothing and brings another event: the
 * library must wait on. */
static void serve(struct peer *p, int sock)
{
    const struct conn conn = {sock, p->trickle}, *fd = &conn;
    char path[512] = "", token[128] = "", reply[SFX_PAYLOAD_MAX];
    int answered = 0, reads = 0;
    struct msg m;

    while (recv_msg(sock, &m) == 0) {
        const char *value = m.body + strlen(m.body) + 1;
        int ok = 0;
        if (m.op == SFX_WATCH) {
            if (strlen(m.body) >= sizeof path || strlen(value) >= sizeof token)
                break;
            memcpy(path, m.body, strlen(m.body) + 1);
            memcpy(token, value, strlen(value) + 1);
            ok = send_msg(fd, SFX_WATCH, m.id, "OK", 3) == 0 && send_event(fd, path, token) == 0;
        } else if (m.op == SFX_WRITE) {
            answer(value, reply, sizeof reply);
            answered = 1;
            ok = send_msg(fd, SFX_WRITE, m.id, "OK", 3) == 0 && send_event(fd, path, token) == 0;
        } else if (m.op == SFX_READ && strcmp(m.body, SFP_IDENTITY) == 0) {
            ok = send_msg(fd, SFX_READ, m.id, p->identity, strlen(p->identity)) == 0;
        } else if (m.op == SFX_READ && answered && reads++ > 0) {
            ok = send_msg(fd, SFX_READ, m.id, reply, strlen(reply)) == 0;
        } else if (m.op == SFX_READ) {
            ok = send_msg(fd, SFX_ERROR, m.id, "ENOENT", 7) == 0 &&
                 (!answered || send_event(fd, path, token) == 0);
        } else {
            ok = send_msg(fd, m.op, m.id, "OK", 3) == 0; /* RM, UNWATCH */
        }
        if (!ok)
            break;
    }
    (void)close(sock);
}

static void *peer_main(void *arg)
{
    struct peer *p = arg;
    int fd;

    while ((fd = accept4(p->listener, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
        p->connections++;
        serve(p, fd);
    }
    return NULL; /* the listener was shut down */
}

static int start_peer(struct peer *p, pthread_t *thread)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};

    snprintf(p->path, sizeof p->path, "/tmp/sf-unittest-%d.sock", (int)getpid());
    strcpy(addr.sun_path, p->path);
    p->listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (p->listener < 0 || bind(p->listener, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        listen(p->listener, 8) < 0)
        return -1;
    return pthread_create(thread, NULL, peer_main, p) == 0 ? 0 : -1;
}

static int stop_peer(struct peer *p, pthread_t thread)
{
    int rc = shutdown(p->listener, SHUT_RDWR);

    rc |= pthread_join(thread, NULL);
    rc |= close(p->listener);
    return rc | unlink(p->path);
}

/* sf_exit in a child process: its exit status, or -1. With waits, -2 if it is still
 * waiting (as it should once sfld took the request) after a second; it is killed. */
static int exit_status_of_sf_exit(int status, int waits)
{
    int wstatus;
    pid_t pid = fork();

    if (pid == 0)
        sf_exit(status);
    if (pid < 0)
        return -1;
    if (waits) {
        sleep(1);
        if (waitpid(pid, &wstatus, WNOHANG) != 0)
            return -1; /* it ended, or cannot be waited for */
        if (kill(pid, SIGKILL) < 0 || waitpid(pid, &wstatus, 0) < 0)
            return -1;
        return -2;
    }
    if (waitpid(pid, &wstatus, 0) < 0)
        return -1;
    return WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
}

static void test_calls(int *f, struct peer *p)
{
    sf_ticket_t t, other = {"t-clone", 1, 1}, bad = {"t-bad", 1, 1}, junk = {"t-junk", 1, 1};
    sf_clone_status_t c[3];
    char ckpt[SF_ID_MAX];

    fprintf(stderr, "sf-unittest: error messages from the fake sfld are expected:\n");
    CHECK(f, sf_request_ticket(2, &t) == 0);
    CHECK(f, strcmp(t.id, "t1-abc") == 0 && t.granted == 2 && t.requested == 3);
    CHECK(f, sf_request_ticket(0, &t) == -SF_EUSAGE);
    CHECK(f, sf_request_ticket(2, NULL) == -SF_EUSAGE);
    CHECK(f, sf_clone(&t) == 0);
    CHECK(f, sf_clone(&other) == 7); /* a clone: no hooks folder here, a bad seed */
    CHECK(f, sf_clone(&bad) == -SF_ENOTFOUND);
    CHECK(f, sf_clone(NULL) == -SF_EUSAGE);
    CHECK(f, sf_checkpoint_parent(ckpt, sizeof ckpt) == 0 && strcmp(ckpt, "c1-x") == 0);
    CHECK(f, sf_checkpoint_parent(ckpt, 10) == -SF_EUSAGE);
    CHECK(f, sf_create_clones("c1-x", &t) == 0);
    CHECK(f, sf_create_clones("c9-y", &bad) == -SF_ENOTFOUND);
    CHECK(f, sf_create_clones(NULL, &t) == -SF_EUSAGE);
    CHECK(f, sf_join(&t, c, 3) == 3);
    CHECK(f, c[0].status == 11 && c[1].status == -1 && c[2].id == 10);
    CHECK(f, sf_join(&t, NULL, 0) == 3);
    CHECK(f, sf_join(&t, NULL, 1) == -SF_EUSAGE);
    CHECK(f, sf_join(&bad, c, 3) == -SF_ENOTFOUND);
    CHECK(f, sf_kill(&t) == 1);
    CHECK(f, sf_kill(&bad) == -SF_EWRONGSTATE);
    CHECK(f, sf_kill(&junk) == -SF_ESYSTEM && errno == EPROTO);
    CHECK(f, exit_status_of_sf_exit(3, 0) == SF_EWRONGSTATE); /* the fake says: a parent */
    CHECK(f, exit_status_of_sf_exit(5, 1) == -2);             /* accepted: waits for its end */
    CHECK(f, p->connections >= 15);
}

/* Replies that come a byte at a time, each after a stray reply: the same results. */
static void test_trickle(int *f, struct peer *p)
{
    sf_ticket_t t = {"t1-abc", 1, 1};
    sf_clone_status_t c[3];

    p->trickle = 1;
    CHECK(f, sf_request_ticket(2, &t) == 0 && strcmp(t.id, "t1-abc") == 0);
    CHECK(f, sf_join(&t, c, 3) == 3 && c[0].status == 11 && c[2].id == 10);
    CHECK(f, sf_clone(&t) == 0);
    p->trickle = 0;
}

static void test_unreachable(int *f)
{
    sf_ticket_t t = {"t1-abc", 1, 1};

    fprintf(stderr, "sf-unittest: complaints about no agent are expected:\n");
    CHECK(f, setenv("SF_XENBUS", "/nonexistent/port", 1) == 0);
    CHECK(f, sf_kill(&t) == -SF_EUNREACHABLE);
    CHECK(f, exit_status_of_sf_exit(0, 0) == SF_EUNREACHABLE);
    CHECK(f, unsetenv("SF_XENBUS") == 0 && setenv("XENSTORED_PATH", "/nonexistent/sock", 1) == 0);
    /* No agent socket: the port, which no test machine has. */
    if (access(SFX_PORT, F_OK) != 0)
        CHECK(f, sf_kill(&t) == -SF_EUNREACHABLE);
    CHECK(f, unsetenv("XENSTORED_PATH") == 0);
}

/* The lowest free file descriptor: the same before and after the calls, if none leaked. */
static int lowest_free_fd(void)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

    if (fd >= 0 && close(fd) < 0)
        return -1;
    return fd;
}

int main(void)
{
    int failures = 0, fd = lowest_free_fd();
    struct peer peer = {.identity = "{\"id\": 7}"};
    pthread_t thread;

    test_json_reader(&failures);
    test_json_limits(&failures);
    test_json_writer(&failures);
    test_json_indented(&failures);
    test_free_page_report(&failures);
    test_requests(&failures);
    test_replies(&failures);
    test_results(&failures);
    test_clone_lists(&failures);
    test_hook_environment(&failures);
    test_hooks(&failures);
    if (start_peer(&peer, &thread) < 0) {
        perror("sf-unittest: cannot start the fake XenStore peer");
        return 1;
    }
    CHECK(&failures, setenv("SF_XENBUS", peer.path, 1) == 0);
    CHECK(&failures, setenv("SF_HOOKS_DIR", "/nonexistent", 1) == 0);
    test_calls(&failures, &peer);
    test_trickle(&failures, &peer);
    CHECK(&failures, unsetenv("SF_XENBUS") == 0);
    CHECK(&failures, stop_peer(&peer, thread) == 0);
    test_unreachable(&failures);
    CHECK(&failures, fd >= 0 && lowest_free_fd() == fd); /* no descriptor leaked */
    printf(failures ? "sf-unittest: %d failed\n" : "sf-unittest: all passed\n", failures);
    return failures ? 1 : 0;
}

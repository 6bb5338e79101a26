/* sf-json.c: a strict JSON reader and a small writer for libsnowflock (sf-json.h).
 *
 * Why not a library: the guest image and other distributions' VMs must not need
 * one, and the messages are small (a XenStore value holds at most 4096 bytes), so
 * a recursive-descent parser into malloc'd nodes is enough.
 */
#include "sf-json.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cursor {
    const char *p, *end;
    int depth;
};

static int parse_value(struct cursor *c, struct sfj *out);

static void skip_space(struct cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

/* Whether the literal word is next (and step over it). */
static int take(struct cursor *c, const char *word)
{
    size_t n = strlen(word);

    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;

    for (int k = 0; k < 4; k++) {
        char h = p[k];
        int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
              : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + (unsigned)d;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | cp >> 12);
        o[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | cp >> 18);
    o[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* \uXXXX at p (after the backslash and u), a surrogate pair joined: the code point,
 * and p moved past it; -1 for a bad escape, a lone surrogate or \u0000. */
static long unicode_escape(const char **p, const char *end)
{
    unsigned hi, lo;

    if (end - *p < 4 || hex4(*p, &hi) < 0 || hi == 0)
        return -1;
    *p += 4;
    if (hi >= 0xdc00 && hi <= 0xdfff)
        return -1;
    if (hi < 0xd800 || hi > 0xdbff)
        return hi;
    if (end - *p < 6 || (*p)[0] != '\\' || (*p)[1] != 'u' || hex4(*p + 2, &lo) < 0 ||
        lo < 0xdc00 || lo > 0xdfff)
        return -1;
    *p += 6;
    return 0x10000 + ((long)(hi - 0xd800) << 10) + (lo - 0xdc00);
}

/* One escape after a backslash at *p into o; the bytes written, or 0 if bad. */
static size_t escape(const char **p, const char *end, char *o)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *hit;
    long cp;

    if (*p >= end)
        return 0;
    if (**p == 'u') {
        ++*p;
        cp = unicode_escape(p, end);
        return cp < 0 ? 0 : put_utf8(o, (unsigned)cp);
    }
    hit = memchr(from, **p, sizeof from - 1);
    if (!hit)
        return 0;
    ++*p;
    *o = to[hit - from];
    return 1;
}

/* A string at c (its opening quote next) into a new NUL-terminated *out. Its
 * decoded form is never longer than its source, so one allocation does. */
static int parse_string(struct cursor *c, char **out)
{
    const char *p = c->p + 1;
    char *s = malloc((size_t)(c->end - c->p)), *o = s;

    if (!s)
        return -1;
    while (p < c->end && *p != '"') {
        unsigned char ch = (unsigned char)*p;
        size_t n;
        if (ch < 0x20)
            goto bad; /* raw control characters must be escaped */
        if (ch != '\\') {
            *o++ = *p++;
            continue;
        }
        p++;
        n = escape(&p, c->end, o);
        if (n == 0)
            goto bad;
        o += n;
    }
    if (p >= c->end)
        goto bad;
    *o = '\0';
    c->p = p + 1;
    *out = s;
    return 0;
bad:
    free(s);
    errno = EPROTO;
    return -1;
}

static int digits(struct cursor *c)
{
    const char *start = c->p;

    while (c->p < c->end && *c->p >= '0' && *c->p <= '9')
        c->p++;
    return c->p > start;
}

/* A number, by the grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static int parse_number(struct cursor *c, struct sfj *out)
{
    const char *start = c->p;
    int integral = 1;
    char *end;

    if (c->p < c->end && *c->p == '-')
        c->p++;
    if (c->p < c->end && *c->p == '0')
        c->p++;
    else if (!digits(c))
        goto bad;
    if (c->p < c->end && *c->p == '.') {
        c->p++;
        integral = 0;
        if (!digits(c))
            goto bad;
    }
    if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
        c->p++;
        integral = 0;
        if (c->p < c->end && (*c->p == '+' || *c->p == '-'))
            c->p++;
        if (!digits(c))
            goto bad;
    }
    out->str = strndup(start, (size_t)(c->p - start));
    if (!out->str)
        return -1;
    out->type = SFJ_REAL;
    errno = 0;
    out->i = strtoll(out->str, &end, 10);
    if (integral && errno == 0 && *end == '\0')
        out->type = SFJ_INT;
    return 0;
bad:
    errno = EPROTO;
    return -1;
}

/* Adds a zeroed node to v's kids (which grow by doubling); NULL on ENOMEM. */
static struct sfj *add_kid(struct sfj *v, size_t *cap)
{
    if (v->n == *cap) {
        size_t more = *cap ? *cap * 2 : 4;
        struct sfj *kids = realloc(v->kids, more * sizeof *kids);
        if (!kids)
            return NULL;
        v->kids = kids;
        *cap = more;
    }
    memset(&v->kids[v->n], 0, sizeof v->kids[0]);
    return &v->kids[v->n++];
}

/* An array or an object (its bracket next); members parsed into v->kids. */
static int parse_container(struct cursor *c, struct sfj *v, int object)
{
    char close = object ? '}' : ']';
    size_t cap = 0;

    if (++c->depth > SFJ_DEPTH_MAX)
        goto bad;
    c->p++;
    skip_space(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        c->depth--;
        return 0;
    }
    for (;;) {
        struct sfj *kid = add_kid(v, &cap);
        if (!kid)
            return -1;
        kid->type = SFJ_NULL;
        skip_space(c);
        if (object) {
            if (c->p >= c->end || *c->p != '"')
                goto bad;
            if (parse_string(c, &kid->key) < 0)
                return -1;
            skip_space(c);
            if (c->p >= c->end || *c->p++ != ':')
                goto bad;
        }
        if (parse_value(c, kid) < 0)
            return -1;
        skip_space(c);
        if (c->p < c->end && *c->p == ',') {
            c->p++;
            continue;
        }
        if (c->p < c->end && *c->p == close) {
            c->p++;
            c->depth--;
            return 0;
        }
        goto bad;
    }
bad:
    errno = EPROTO;
    return -1;
}

/* Any value at c into out, whose kids (if any) out owns even on failure. */
static int parse_value(struct cursor *c, struct sfj *out)
{
    skip_space(c);
    if (c->p >= c->end)
        goto bad;
    switch (*c->p) {
    case '{':
        out->type = SFJ_OBJECT;
        return parse_container(c, out, 1);
    case '[':
        out->type = SFJ_ARRAY;
        return parse_container(c, out, 0);
    case '"':
        out->type = SFJ_STRING;
        return parse_string(c, &out->str);
    }
    if (take(c, "null"))
        out->type = SFJ_NULL;
    else if (take(c, "true"))
        out->type = SFJ_TRUE;
    else if (take(c, "false"))
        out->type = SFJ_FALSE;
    else
        return parse_number(c, out);
    return 0;
bad:
    errno = EPROTO;
    return -1;
}

int sfj_parse(const char *text, size_t len, struct sfj *out)
{
    struct cursor c = {text, text + len, 0};
    struct sfj v = {0};

    if (parse_value(&c, &v) < 0)
        goto fail;
    skip_space(&c);
    if (c.p != c.end) {
        errno = EPROTO;
        goto fail;
    }
    *out = v;
    return 0;
fail:;
    int err = errno;
    sfj_free(&v);
    errno = err;
    return -1;
}

void sfj_free(struct sfj *v)
{
    for (size_t k = 0; k < v->n; k++)
        sfj_free(&v->kids[k]);
    free(v->kids);
    free(v->str);
    free(v->key);
    memset(v, 0, sizeof *v);
}

const struct sfj *sfj_get(const struct sfj *v, const char *key)
{
    if (!v || v->type != SFJ_OBJECT)
        return NULL;
    /* The last of duplicate names wins, as in Python's json. */
    for (size_t k = v->n; k-- > 0;)
        if (strcmp(v->kids[k].key, key) == 0)
            return &v->kids[k];
    return NULL;
}

const char *sfj_get_str(const struct sfj *v, const char *key)
{
    const struct sfj *m = sfj_get(v, key);

    return m && m->type == SFJ_STRING ? m->str : NULL;
}

int sfj_get_int(const struct sfj *v, const char *key, long long low, long long high, long long *out)
{
    const struct sfj *m = sfj_get(v, key);

    if (!m || m->type != SFJ_INT || m->i < low || m->i > high)
        return -1;
    *out = m->i;
    return 0;
}

/* Writing ------------------------------------------------------------------------- */

void sfj_out_init(struct sfj_out *o, char *buf, size_t cap)
{
    o->buf = buf;
    o->len = 0;
    o->cap = cap;
    o->failed = cap == 0;
    if (cap)
        buf[0] = '\0';
}

static void put(struct sfj_out *o, const char *s, size_t n)
{
    if (o->failed)
        return;
    if (o->len + n >= o->cap) {
        o->failed = 1;
        return;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    o->buf[o->len] = '\0';
}

void sfj_raw(struct sfj_out *o, const char *text)
{
    put(o, text, strlen(text));
}

void sfj_string(struct sfj_out *o, const char *s)
{
    put(o, "\"", 1);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        char esc[8];
        if (ch == '"' || ch == '\\') {
            esc[0] = '\\';
            esc[1] = (char)ch;
            put(o, esc, 2);
        } else if (ch < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", ch);
            put(o, esc, 6);
        } else {
            put(o, s, 1);
        }
    }
    put(o, "\"", 1);
}

void sfj_int(struct sfj_out *o, long long v)
{
    char num[24];
    int n = snprintf(num, sizeof num, "%lld", v);

    put(o, num, (size_t)n);
}

void sfj_key(struct sfj_out *o, const char *key, int first)
{
    if (!first)
        sfj_raw(o, ", ");
    sfj_string(o, key);
    sfj_raw(o, ": ");
}

/* v at nesting depth, compact (indent 0) or with indent spaces a level. */
static void value(struct sfj_out *o, const struct sfj *v, int indent, int depth)
{
    static const char *const words[] = {"null", "false", "true"};

    switch (v->type) {
    case SFJ_NULL:
    case SFJ_FALSE:
    case SFJ_TRUE:
        sfj_raw(o, words[v->type]);
        return;
    case SFJ_INT:
    case SFJ_REAL:
        sfj_raw(o, v->str);
        return;
    case SFJ_STRING:
        sfj_string(o, v->str);
        return;
    case SFJ_ARRAY:
    case SFJ_OBJECT:
        break;
    }
    sfj_raw(o, v->type == SFJ_ARRAY ? "[" : "{");
    for (size_t k = 0; k < v->n; k++) {
        if (k)
            sfj_raw(o, indent ? "," : ", ");
        if (indent) {
            sfj_raw(o, "\n");
            for (int i = 0; i < indent * (depth + 1); i++)
                sfj_raw(o, " ");
        }
        if (v->type == SFJ_OBJECT)
            sfj_key(o, v->kids[k].key, 1);
        value(o, &v->kids[k], indent, depth + 1);
    }
    if (indent && v->n) {
        sfj_raw(o, "\n");
        for (int i = 0; i < indent * depth; i++)
            sfj_raw(o, " ");
    }
    sfj_raw(o, v->type == SFJ_ARRAY ? "]" : "}");
}

void sfj_value(struct sfj_out *o, const struct sfj *v)
{
    value(o, v, 0, 0);
}

void sfj_value_indented(struct sfj_out *o, const struct sfj *v, int indent)
{
    value(o, v, indent, 0);
}

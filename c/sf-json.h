/* sf-json.h: the JSON of SnowFlock's requests and replies, read and written (pure).
 *
 * Internal to libsnowflock (hidden from its shared object). Strict RFC 8259: one
 * value, whitespace around it only; objects, arrays, strings with every escape
 * (\uXXXX and surrogate pairs become UTF-8), numbers, true, false, null. A string
 * holding \u0000 is refused (C strings could not carry it), and nesting is limited
 * to SFJ_DEPTH_MAX, so hostile input cannot exhaust the stack.
 */
#ifndef SF_JSON_H
#define SF_JSON_H

#include <stddef.h>

#define SF_INTERNAL __attribute__((visibility("hidden")))
#define SFJ_DEPTH_MAX 32

enum sfj_type { SFJ_NULL, SFJ_FALSE, SFJ_TRUE, SFJ_INT, SFJ_REAL, SFJ_STRING, SFJ_ARRAY, SFJ_OBJECT };

/* A parsed value. Numbers keep their text in str (hooks print it as it came);
 * an integer that fits a long long is SFJ_INT with its value in i, any other
 * number SFJ_REAL. An object's members are kids with their names in key. */
struct sfj {
    enum sfj_type type;
    long long i;
    char *str;       /* a string's decoded value, a number's text */
    char *key;       /* a member's name */
    struct sfj *kids; /* an array's items, an object's members */
    size_t n;
};

/* Parses text[len] into *out. Returns 0, or -1 with errno EPROTO (not JSON, or too
 * deep) or ENOMEM; *out then needs no sfj_free. */
SF_INTERNAL int sfj_parse(const char *text, size_t len, struct sfj *out);
SF_INTERNAL void sfj_free(struct sfj *v);

/* The member key of object v, or NULL (also when v is no object). */
SF_INTERNAL const struct sfj *sfj_get(const struct sfj *v, const char *key);
/* The string member key, or NULL if it is absent or no string. */
SF_INTERNAL const char *sfj_get_str(const struct sfj *v, const char *key);
/* The integer member key into *out if it is one in [low, high]: 0, else -1. */
SF_INTERNAL int sfj_get_int(const struct sfj *v, const char *key, long long low, long long high,
                            long long *out);

/* A writer into a fixed buffer: once anything does not fit, failed is set and the
 * rest is ignored, so a caller checks once at the end. */
struct sfj_out {
    char *buf;
    size_t len, cap; /* buf[len] stays NUL while cap > 0 */
    int failed;
};

SF_INTERNAL void sfj_out_init(struct sfj_out *o, char *buf, size_t cap);
SF_INTERNAL void sfj_raw(struct sfj_out *o, const char *text); /* punctuation: {, :, ... */
SF_INTERNAL void sfj_string(struct sfj_out *o, const char *s); /* quoted and escaped */
SF_INTERNAL void sfj_int(struct sfj_out *o, long long v);
/* Any parsed value, compact (", " and ": " between items, as Python's json). */
SF_INTERNAL void sfj_value(struct sfj_out *o, const struct sfj *v);
/* The same, a member or item a line, indented indent spaces a level (Python's
 * json.dumps(v, indent=indent)). */
SF_INTERNAL void sfj_value_indented(struct sfj_out *o, const struct sfj *v, int indent);
/* "key": at the start of an object's member (comma first unless first). */
SF_INTERNAL void sfj_key(struct sfj_out *o, const char *key, int first);

#endif

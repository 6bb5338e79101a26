/* sf-proto.c: SnowFlock's request and reply messages, pure (sf-proto.h). */
#include "sf-proto.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int protocol_error(void)
{
    errno = EPROTO;
    return -SF_ESYSTEM;
}

void sfp_rid(char out[SFP_RID_MAX + 1], long pid, long tid, const unsigned char rnd[8])
{
    int n = snprintf(out, SFP_RID_MAX + 1, "%ld-%ld-", pid, tid);

    for (int k = 0; k < 8 && n + 2 <= SFP_RID_MAX; k++)
        n += snprintf(out + n, (size_t)(SFP_RID_MAX + 1 - n), "%02x", rnd[k]);
}

int sfp_request(char *out, size_t cap, const char *op, const struct sfp_arg *args, size_t nargs)
{
    struct sfj_out o;

    sfj_out_init(&o, out, cap);
    sfj_raw(&o, "{");
    sfj_key(&o, "op", 1);
    sfj_string(&o, op);
    sfj_key(&o, "args", 0);
    sfj_raw(&o, "{");
    for (size_t k = 0; k < nargs; k++) {
        sfj_key(&o, args[k].name, k == 0);
        if (args[k].str)
            sfj_string(&o, args[k].str);
        else
            sfj_int(&o, args[k].num);
    }
    sfj_raw(&o, "}}");
    return o.failed ? -1 : (int)o.len;
}

int sfp_error_code(const char *type)
{
    static const struct {
        const char *type;
        int code;
    } CODES[] = {
        {"UsageError", SF_EUSAGE},           {"NotFoundError", SF_ENOTFOUND},
        {"WrongStateError", SF_EWRONGSTATE}, {"UnreachableError", SF_EUNREACHABLE},
        {"OperationTimeout", SF_ETIMEOUT},   {"SystemFailure", SF_ESYSTEM},
    };

    for (size_t k = 0; type && k < sizeof CODES / sizeof CODES[0]; k++)
        if (strcmp(CODES[k].type, type) == 0)
            return CODES[k].code;
    return SF_EFAILED;
}

/* The host's error: its code, its words into msg (as SnowFlockError's str()). */
static int host_error(const struct sfj *error, char *msg, size_t size)
{
    const char *message = sfj_get_str(error, "message"), *hint = sfj_get_str(error, "hint");

    if (size) {
        if (hint && *hint)
            snprintf(msg, size, "%s (%s)", message ? message : "None", hint);
        else
            snprintf(msg, size, "%s", message ? message : "None");
    }
    errno = 0;
    return -sfp_error_code(sfj_get_str(error, "type"));
}

int sfp_reply(const char *raw, size_t len, struct sfj *result, char *msg, size_t size)
{
    struct sfj reply;
    const struct sfj *ok, *value;
    int rc = 0;

    if (size)
        msg[0] = '\0';
    memset(result, 0, sizeof *result); /* null, if the reply holds no result */
    if (sfj_parse(raw, len, &reply) < 0)
        return protocol_error();
    ok = sfj_get(&reply, "ok");
    if (!ok || (ok->type != SFJ_TRUE && ok->type != SFJ_FALSE)) {
        rc = protocol_error();
    } else if (ok->type == SFJ_FALSE) {
        rc = host_error(sfj_get(&reply, "error"), msg, size);
    } else if ((value = sfj_get(&reply, "result")) != NULL) {
        *result = *value; /* moved out of the reply: freed by the caller */
        memset((struct sfj *)value, 0, sizeof *value);
        free(result->key); /* its name in the reply */
        result->key = NULL;
    }
    sfj_free(&reply);
    return rc;
}

int sfp_ticket(const struct sfj *result, sf_ticket_t *out)
{
    const char *id = sfj_get_str(result, "ticket");
    long long granted, requested;

    if (!id || !*id || strlen(id) >= SF_ID_MAX ||
        sfj_get_int(result, "granted", 0, INT_MAX, &granted) < 0 ||
        sfj_get_int(result, "requested", 0, INT_MAX, &requested) < 0)
        return protocol_error();
    memset(out, 0, sizeof *out);
    memcpy(out->id, id, strlen(id) + 1);
    out->granted = (int)granted;
    out->requested = (int)requested;
    return 0;
}

int sfp_fork(const struct sfj *result, const char **seed, const char **checkpoint)
{
    long long id;

    if (sfj_get_int(result, "id", 0, INT_MAX, &id) < 0)
        return protocol_error();
    *seed = sfj_get_str(result, "seed");
    if (checkpoint) {
        *checkpoint = sfj_get_str(result, "checkpoint");
        if (!*checkpoint || !**checkpoint || strlen(*checkpoint) >= SF_ID_MAX)
            return protocol_error();
    }
    return (int)id;
}

/* One member of a ticket's "clones" (Clone.to_json); 0 or -1. */
static int clone_status(const struct sfj *c, sf_clone_status_t *out)
{
    const struct sfj *status = sfj_get(c, "status");
    const char *state = sfj_get_str(c, "state");
    long long id, code = -1;

    if (sfj_get_int(c, "id", 1, INT_MAX, &id) < 0 || !state || strlen(state) >= sizeof out->state)
        return -1;
    if (!status || (status->type != SFJ_NULL &&
                    sfj_get_int(c, "status", 0, 255, &code) < 0))
        return -1;
    memset(out, 0, sizeof *out);
    out->id = (int)id;
    memcpy(out->state, state, strlen(state) + 1);
    out->status = (int)code;
    return 0;
}

static int by_id(const void *a, const void *b)
{
    const sf_clone_status_t *x = a, *y = b;

    return (x->id > y->id) - (x->id < y->id);
}

int sfp_clones(const struct sfj *result, sf_clone_status_t *out, int max, int killed)
{
    const struct sfj *clones = sfj_get(result, "clones");
    sf_clone_status_t *all;
    int n = 0;

    if (!clones || clones->type != SFJ_OBJECT || clones->n > INT_MAX)
        return protocol_error();
    all = calloc(clones->n + 1, sizeof *all);
    if (!all)
        return -SF_ESYSTEM;
    for (size_t k = 0; k < clones->n; k++) {
        if (clone_status(&clones->kids[k], &all[k]) < 0) {
            free(all);
            return protocol_error();
        }
        n += !killed || strcmp(all[k].state, "killed") == 0;
    }
    qsort(all, clones->n, sizeof *all, by_id);
    for (int k = 0; k < max && (size_t)k < clones->n; k++)
        out[k] = all[k];
    free(all);
    return n;
}

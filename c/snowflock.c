/* snowflock.c: the SnowFlock API for C (snowflock.h), speaking sfld's protocol.
 *
 * One request is what sflib.guest.api.request does: watch the reply key first and
 * take the watch's initial event, so that no reply can come unseen; write the
 * request; on each event read the reply key until it holds a value (an event may
 * come before the value); remove it. sfld copies the domain and the pending watch
 * into every clone, so a call blocked here in the parent wakes in each clone too.
 */
#define _GNU_SOURCE
#include "snowflock.h"

#include "sf-call.h"
#include "sf-hooks.h"
#include "sf-json.h"
#include "sf-proto.h"
#include "sf-xs.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KEY_MAX (sizeof SFP_REPLIES + SFP_RID_MAX + 1)

/* A fresh request ID: unique per call, per thread and per process. */
static void new_rid(char rid[SFP_RID_MAX + 1])
{
    unsigned char rnd[8];
    struct timespec ts;

    if (getrandom(rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd) {
        /* Early in boot the kernel's pool may not be ready; pid, tid and the time
         * still make the ID unique. */
        (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
        uint64_t t = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        memcpy(rnd, &t, sizeof rnd);
    }
    sfp_rid(rid, (long)getpid(), (long)syscall(SYS_gettid), rnd);
}

/* Waits for a non-empty value at key, one watch event at a time. */
static int await_reply(struct sfx *x, const char *key, char *reply, size_t cap, size_t *len)
{
    int rc;

    do {
        rc = sfx_wait_event(x);
        if (rc == 0)
            rc = sfx_read(x, key, reply, cap, len);
    } while (rc == 0 && *len == 0); /* sfld's replies are never empty */
    return rc;
}

/* The XenStore part of a request: the reply's raw JSON into reply[cap]. */
static int exchange(struct sfx *x, const char *rid, const char *msg, size_t n, char *reply,
                    size_t cap, size_t *len)
{
    char request_key[KEY_MAX], reply_key[KEY_MAX];
    int rc;

    snprintf(request_key, sizeof request_key, "%s%s", SFP_REQUESTS, rid);
    snprintf(reply_key, sizeof reply_key, "%s%s", SFP_REPLIES, rid);
    rc = sfx_watch(x, reply_key, rid);
    if (rc == 0)
        rc = sfx_wait_event(x); /* the watch's initial event */
    if (rc == 0)
        rc = sfx_write(x, request_key, msg, n);
    if (rc == 0)
        rc = await_reply(x, reply_key, reply, cap, len);
    if (rc == 0 && sfx_rm(x, reply_key) < 0 && errno != ENOENT)
        rc = -SF_ESYSTEM;
    return rc;
}

/* Says in why what rc, from sfx_open, means. */
static int open_failed(const struct sfx *x, int rc, char *why, size_t size)
{
    if (rc == -SF_EUNREACHABLE && errno == ENOENT)
        snprintf(why, size, "no XenStore port at %s (is this a SnowFlock VM?)", x->where);
    else
        snprintf(why, size, "cannot open the XenStore connection %s: %s", x->where,
                 strerror(errno));
    return rc;
}

int sfc_reachable(char *why, size_t size)
{
    struct sfx x;
    int rc = sfx_open(&x);

    if (rc < 0)
        return open_failed(&x, rc, why, size);
    sfx_close(&x);
    return 0;
}

int sfc_request(const char *op, const struct sfp_arg *args, size_t nargs, struct sfj *result,
                char *why, size_t size)
{
    char rid[SFP_RID_MAX + 1], msg[SFX_PAYLOAD_MAX], reply[SFX_PAYLOAD_MAX + 1];
    int n = sfp_request(msg, sizeof msg, op, args, nargs), rc, err;
    struct sfx x;
    size_t len = 0;

    memset(result, 0, sizeof *result);
    why[0] = '\0';
    if (n < 0) {
        snprintf(why, size, "the arguments of %s do not fit a XenStore value", op);
        return -SF_EUSAGE;
    }
    new_rid(rid);
    rc = sfx_open(&x);
    if (rc < 0)
        return open_failed(&x, rc, why, size);
    rc = exchange(&x, rid, msg, (size_t)n, reply, sizeof reply, &len);
    err = errno;
    sfx_close(&x);
    errno = err;
    if (rc < 0) {
        snprintf(why, size, "XenStore at %s: %s", x.where, strerror(err));
        return rc;
    }
    rc = sfp_reply(reply, len, result, why, size);
    if (rc < 0 && !why[0])
        snprintf(why, size, "%s", strerror(errno)); /* no reply sfld would send */
    return rc;
}

/* sfc_request for the calls: sfld's message, or what failed, said on stderr
 * ("snowflock: fn: error: ..."). fn names the call. */
static int request(const char *fn, const char *op, const struct sfp_arg *args, size_t nargs,
                   struct sfj *result)
{
    char why[SFC_WHY_MAX];
    int rc = sfc_request(op, args, nargs, result, why, sizeof why), err = errno;

    if (rc < 0 && why[0])
        fprintf(stderr, "snowflock: %s: error: %s\n", fn, why);
    errno = err;
    return rc;
}

/* Whether t holds a ticket ID at all (sfld judges the rest). */
static int ticket_ok(const sf_ticket_t *t)
{
    return t && t->id[0] && memchr(t->id, '\0', sizeof t->id);
}

/* This clone's identity (snowflock/identity) into *out; an empty object when
 * there is none or it cannot be read (said on stderr): the hooks run anyway. */
static void read_identity(struct sfj *out)
{
    char raw[SFX_PAYLOAD_MAX + 1];
    struct sfx x;
    size_t len = 0;
    int rc = sfx_open(&x);

    if (rc == 0) {
        rc = sfx_read(&x, SFP_IDENTITY, raw, sizeof raw, &len);
        sfx_close(&x);
    }
    memset(out, 0, sizeof *out);
    if (rc == 0 && len > 0 && sfj_parse(raw, len, out) == 0 && out->type == SFJ_OBJECT)
        return;
    if (rc < 0 || len > 0)
        fprintf(stderr, "snowflock: cannot read this clone's identity: %s\n",
                rc < 0 ? sf_strerror(rc) : "not a JSON object");
    sfj_free(out);
    out->type = SFJ_OBJECT;
}

void sfc_after_fork(const char *seed, int id, const char *hooks_dir, sfh_log_fn log)
{
    struct sfj identity;

    sfh_reseed(seed);
    if (id <= 0)
        return;
    read_identity(&identity);
    (void)sfh_run_hooks_logged(hooks_dir, "clone", "post", &identity, SFH_TIMEOUT_MS, log);
    sfj_free(&identity);
}

/* The calls ----------------------------------------------------------------------- */

int sf_request_ticket(int n, sf_ticket_t *out)
{
    struct sfp_arg args[] = {{"n", NULL, n}};
    struct sfj result;
    int rc;

    if (!out)
        return -SF_EUSAGE;
    rc = request("sf_request_ticket", "ticket", args, 1, &result);
    if (rc == 0)
        rc = sfp_ticket(&result, out);
    sfj_free(&result);
    return rc;
}

int sf_clone(const sf_ticket_t *t)
{
    struct sfp_arg args[] = {{"ticket", t ? t->id : NULL, 0}};
    struct sfj result;
    const char *seed;
    int rc;

    if (!ticket_ok(t))
        return -SF_EUSAGE;
    (void)fflush(NULL); /* else every clone would write the buffered output again */
    rc = request("sf_clone", "clone", args, 1, &result);
    if (rc == 0)
        rc = sfp_fork(&result, &seed, NULL);
    if (rc >= 0)
        sfc_after_fork(seed, rc, NULL, NULL);
    sfj_free(&result);
    return rc;
}

int sf_checkpoint_parent(char *checkpoint, size_t len)
{
    const char *seed, *name;
    struct sfj result;
    int rc;

    if (!checkpoint || len < SF_ID_MAX)
        return -SF_EUSAGE;
    (void)fflush(NULL);
    rc = request("sf_checkpoint_parent", "checkpoint", NULL, 0, &result);
    if (rc == 0)
        rc = sfp_fork(&result, &seed, &name);
    if (rc >= 0) {
        memcpy(checkpoint, name, strlen(name) + 1);
        sfc_after_fork(seed, rc, NULL, NULL);
    }
    sfj_free(&result);
    return rc;
}

int sf_create_clones(const char *checkpoint, const sf_ticket_t *t)
{
    struct sfp_arg args[] = {{"checkpoint", checkpoint, 0}, {"ticket", t ? t->id : NULL, 0}};
    struct sfj result;
    const char *seed;
    int rc;

    if (!checkpoint || !*checkpoint || !ticket_ok(t))
        return -SF_EUSAGE;
    rc = request("sf_create_clones", "create_clones", args, 2, &result);
    if (rc == 0)
        rc = sfp_fork(&result, &seed, NULL);
    if (rc > 0) { /* the parent's ID is 0: its clones return elsewhere */
        errno = EPROTO;
        rc = -SF_ESYSTEM;
    }
    sfj_free(&result);
    return rc;
}

void sf_exit(int status)
{
    struct sfp_arg args[] = {{"status", NULL, status}};
    struct sfj result;
    int rc;

    (void)fflush(NULL); /* sfld stops the VM: nothing buffered would ever be written */
    rc = request("sf_exit", "exit", args, 1, &result);
    sfj_free(&result);
    if (rc == 0)
        for (;;)
            pause(); /* until sfld stops this clone, as sflib.guest.api.exit */
    exit(-rc); /* request() said why */
}

int sf_join(const sf_ticket_t *t, sf_clone_status_t *out, int max)
{
    struct sfp_arg args[] = {{"ticket", t ? t->id : NULL, 0}};
    struct sfj result;
    int rc;

    if (!ticket_ok(t) || max < 0 || (max > 0 && !out))
        return -SF_EUSAGE;
    rc = request("sf_join", "join", args, 1, &result);
    if (rc == 0)
        rc = sfp_clones(&result, out, max, 0);
    sfj_free(&result);
    return rc;
}

int sf_kill(const sf_ticket_t *t)
{
    struct sfp_arg args[] = {{"ticket", t ? t->id : NULL, 0}};
    struct sfj result;
    int rc;

    if (!ticket_ok(t))
        return -SF_EUSAGE;
    rc = request("sf_kill", "kill", args, 1, &result);
    if (rc == 0)
        rc = sfp_clones(&result, NULL, 0, 1);
    sfj_free(&result);
    return rc;
}

const char *sf_strerror(int err)
{
    switch (err < 0 ? 0u - (unsigned)err : (unsigned)err) {
    case 0:
        return "success";
    case SF_EFAILED:
        return "the operation failed";
    case SF_EUSAGE:
        return "usage error: bad argument";
    case SF_ENOTFOUND:
        return "no such ticket or checkpoint";
    case SF_EWRONGSTATE:
        return "the operation is not allowed in the current state";
    case SF_EUNREACHABLE:
        return "the SnowFlock daemon could not be reached (not a SnowFlock VM?)";
    case SF_ETIMEOUT:
        return "timed out";
    case SF_ESYSTEM:
        return "a system call failed, or the SnowFlock daemon did";
    default:
        return "unknown SnowFlock error";
    }
}

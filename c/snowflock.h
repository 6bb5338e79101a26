/* snowflock.h: the SnowFlock API for C programs inside a guest VM (DESIGN.md §1),
 * libsnowflock (-lsnowflock; libsnowflock.so.0 or libsnowflock.a). See snowflock(3).
 *
 * Each call speaks the protocol itself, as the Python API (sflib.guest.api) does:
 * it writes a request into the VM's XenStore domain (snowflock/requests/RID, JSON)
 * and blocks on a watch until sfld writes the reply (snowflock/replies/RID). No
 * Python and no exec on the way. A VM fork clones the whole guest, this process
 * blocked in sf_clone() included, so sf_clone() returns in the parent and in every
 * clone, each with its own reply.
 *
 * TRANSPORT. Each call opens its own XenStore connection and closes it before it
 * returns: to the guest agent's Unix socket, /run/xenstored/socket (or
 * $XENSTORED_PATH), which serves any number of processes at once (sf-guestd(8));
 * when that socket does not exist, on the virtio-serial port
 * /dev/virtio-ports/org.snowflock.xenbus itself, which admits one opener at a time.
 * $SF_XENBUS names a port (or socket) to use instead of both. Neither there, or
 * refused: -SF_EUNREACHABLE.
 *
 * THREADS. The library keeps no global mutable state: every call has its own
 * connection and request ID, so calls from several threads (and processes) run at
 * once. They read the environment (getenv), so do not change it with setenv() while
 * calls run. sfld allows one clone or checkpoint of a VM in flight at a time; a
 * second one fails with -SF_EWRONGSTATE. The calls block until sfld answers (no
 * timeout; sf_join() waits as long as the clones run); signals do not interrupt
 * them (EINTR is retried).
 *
 * AFTER A FORK (sf_clone, sf_checkpoint_parent), in the parent and in each clone:
 * the seed of the reply is mixed into the kernel's RNG, which is reseeded at once
 * (RNDRESEEDCRNG: root only; a failure is a warning on stderr). In a clone, then,
 * the hooks of hooks.d/clone-post.d run ($SF_HOOKS_DIR or /etc/snowflock/hooks.d),
 * with the clone's identity in SF_* variables, exactly as sf-clone(1) runs them; a
 * failing hook is reported on stderr and the rest still run. Each fork first
 * flushes every stdio stream (fflush(NULL)), so that no buffered output is written
 * by the parent and again by every clone; sf_exit() flushes too, as the clone ends
 * without exit().
 *
 * NO AVOIDANCE. Unlike sf-clone(1), the library sends no free-page report with a
 * fork (the Python API with avoidance=False): clones fetch every page the parent
 * touched, free ones included.
 *
 * ERRORS are returned as the negative of the tools' exit codes (sflib/exitcodes.py):
 * sfld's error types map to them (UsageError -SF_EUSAGE, NotFoundError
 * -SF_ENOTFOUND, WrongStateError -SF_EWRONGSTATE, UnreachableError -SF_EUNREACHABLE,
 * OperationTimeout -SF_ETIMEOUT, SystemFailure -SF_ESYSTEM, others -SF_EFAILED), and
 * sfld's message is written on stderr ("snowflock: sf_join: error: MESSAGE (HINT)").
 * -SF_ESYSTEM with errno set when a system call of the library failed, or EPROTO when
 * the reply is not what sfld sends; that too is said on stderr, as is where no
 * XenStore was found ("... error: no XenStore port at PATH (is this a SnowFlock
 * VM?)").
 */
#ifndef SNOWFLOCK_H
#define SNOWFLOCK_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes, as the tools' exit codes; the calls return their negatives. */
enum {
    SF_EFAILED = 1,       /* the operation failed */
    SF_EUSAGE = 2,        /* bad argument */
    SF_ENOTFOUND = 3,     /* no such ticket or checkpoint */
    SF_EWRONGSTATE = 4,   /* not allowed now, e.g. sf_join in a clone */
    SF_EUNREACHABLE = 5,  /* sfld cannot be reached: not a SnowFlock VM */
    SF_ETIMEOUT = 99,     /* timed out */
    SF_ESYSTEM = 111      /* a system call failed (see errno), or sfld did */
};

#define SF_ID_MAX 64 /* room for a ticket or checkpoint ID and its NUL */

typedef struct {
    char id[SF_ID_MAX]; /* what the other calls pass to sfld */
    int granted;        /* clone slots granted, 1 <= granted <= requested */
    int requested;
} sf_ticket_t;

typedef struct {
    int id;         /* 1..granted */
    char state[16]; /* "exited", "killed", "crashed" (or "running") */
    int status;     /* what the clone passed to sf_exit; -1 if it did not exit */
} sf_clone_status_t;

/* Reserve resources for n clones; *out gets a ticket for m <= n of them.
 * Returns 0, or -SF_EUSAGE for n < 1, -SF_EWRONGSTATE when no slot is free. */
int sf_request_ticket(int n, sf_ticket_t *out);

/* Clone this VM with ticket t (once per ticket). Returns 0 in the parent and the
 * clone's ID (1..t->granted) in each clone, or a negative error. */
int sf_clone(const sf_ticket_t *t);

/* Make an immutable checkpoint of this VM; its ID goes to checkpoint (len bytes,
 * at least SF_ID_MAX, else -SF_EUSAGE before anything is asked). Returns 0 now;
 * clones made from it later by sf_create_clones() return from here with their ID.
 * Negative on error. */
int sf_checkpoint_parent(char *checkpoint, size_t len);

/* Create t->granted clones from checkpoint; they resume in sf_checkpoint_parent().
 * Returns 0 (here, in the parent), or a negative error. */
int sf_create_clones(const char *checkpoint, const sf_ticket_t *t);

/* End this clone; the parent's sf_join() reports status (0-255). Never returns:
 * after sfld took the request this thread waits until sfld stops the VM. If the
 * request fails (e.g. in the parent, which is no clone), this process exits with
 * the error's code (SF_EWRONGSTATE, SF_EUNREACHABLE, ...), having said why on
 * stderr. */
void sf_exit(int status) __attribute__((noreturn));

/* Wait until every clone of t has ended; the ticket is then used up. Fills at most
 * max entries of out (sorted by ID) and returns how many clones the ticket had,
 * whatever their statuses, or a negative error. */
int sf_join(const sf_ticket_t *t, sf_clone_status_t *out, int max);

/* Kill every clone of t at once and invalidate it. Returns how many clones were
 * still running and were killed, or a negative error. */
int sf_kill(const sf_ticket_t *t);

/* A message for err (a return value above, negative or not); a static string. */
const char *sf_strerror(int err);

#ifdef __cplusplus
}
#endif

#endif

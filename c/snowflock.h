/* snowflock.h: the SnowFlock API for C programs inside a guest VM (DESIGN.md §1).
 *
 * Each call runs the matching guest tool (sf-ticket, sf-clone, sf-checkpoint,
 * sf-exit, sf-join, sf-kill, found on PATH) with fork and execvp, reads what it
 * prints and waits for it. A VM fork clones the whole guest, this process and the
 * waiting tool included, so sf_clone() returns in the parent and in every clone.
 *
 * Errors are returned as the negative of the tools' exit code (sflib/exitcodes.py):
 * -SF_ENOTFOUND for an unknown ticket, -SF_EUNREACHABLE outside a SnowFlock VM, and
 * so on; -SF_ESYSTEM when a system call of the library failed (errno says which),
 * and also with errno EPROTO when a tool could not be run, died of a signal or
 * printed what it never prints, or EMSGSIZE when its output was too long. The tools
 * print their own error messages on stderr, which stays the caller's stderr.
 *
 * Each call flushes every stdio stream first, so that no buffered output is
 * written twice, by the tool's process or by a clone of the VM.
 *
 * The library keeps no state of its own. sfld allows one clone or checkpoint of a
 * VM in flight at a time; a second one fails with -SF_EWRONGSTATE.
 */
#ifndef SNOWFLOCK_H
#define SNOWFLOCK_H

#include <stddef.h>

/* Error codes, as the tools' exit codes; the calls return their negatives. */
enum {
    SF_EFAILED = 1,       /* the operation failed */
    SF_EUSAGE = 2,        /* bad argument */
    SF_ENOTFOUND = 3,     /* no such ticket or checkpoint */
    SF_EWRONGSTATE = 4,   /* not allowed now, e.g. sf_join in a clone */
    SF_EUNREACHABLE = 5,  /* sfld cannot be reached: not a SnowFlock VM */
    SF_ETIMEOUT = 99,     /* timed out */
    SF_ESYSTEM = 111      /* a system call or a tool failed (see errno) */
};

#define SF_ID_MAX 64 /* room for a ticket or checkpoint ID and its NUL */

typedef struct {
    char id[SF_ID_MAX]; /* what the other calls pass to the tools */
    int granted;        /* clone slots granted, 1 <= granted <= requested */
    int requested;
} sf_ticket_t;

typedef struct {
    int id;        /* 1..granted */
    char state[16]; /* "exited", "killed", "crashed" (or "running") */
    int status;    /* what the clone passed to sf_exit; -1 if it did not exit */
} sf_clone_status_t;

/* Reserve resources for n clones; *out gets a ticket for m <= n of them.
 * Returns 0, or -SF_EUSAGE for n < 1, -SF_EWRONGSTATE when no slot is free. */
int sf_request_ticket(int n, sf_ticket_t *out);

/* Clone this VM with ticket t (once per ticket). Returns 0 in the parent and the
 * clone's ID (1..t->granted) in each clone, or a negative error. */
int sf_clone(const sf_ticket_t *t);

/* Make an immutable checkpoint of this VM; its ID goes to checkpoint (len bytes,
 * SF_ID_MAX is enough). Returns 0 now; clones made from it later by
 * sf_create_clones() return from here with their ID. Negative on error
 * (-SF_EUSAGE if len is too small for the ID). */
int sf_checkpoint_parent(char *checkpoint, size_t len);

/* Create t->granted clones from checkpoint; they resume in sf_checkpoint_parent().
 * Returns 0 (here, in the parent), or a negative error. */
int sf_create_clones(const char *checkpoint, const sf_ticket_t *t);

/* End this clone; the parent's sf_join() reports status (0-255). Never returns:
 * if the tool fails (e.g. in the parent, which is no clone), this process exits
 * with the tool's exit code (SF_ESYSTEM if it could not be run), the tool having
 * said why on stderr. */
void sf_exit(int status) __attribute__((noreturn));

/* Wait until every clone of t has ended; the ticket is then used up. Fills at most
 * max entries of out (sorted by ID) and returns how many clones the ticket had,
 * whatever their statuses, or a negative error. */
int sf_join(const sf_ticket_t *t, sf_clone_status_t *out, int max);

/* Kill every clone of t at once and invalidate it. Returns how many clones were
 * still running and were killed, or a negative error. */
int sf_kill(const sf_ticket_t *t);

/* A message for err (a return value above, negative or not). */
const char *sf_strerror(int err);

/* Parsers of the tools' output: pure, exposed for tests and for programs that run
 * the tools themselves. Each returns what the matching call would (0 or a count)
 * or -SF_ESYSTEM (errno EPROTO) when text is not what the tool prints. */
int sf_parse_ticket(const char *text, sf_ticket_t *out);           /* sf-ticket --json */
int sf_parse_id(const char *text);                                 /* sf-clone */
int sf_parse_checkpoint(const char *text, char *checkpoint, size_t len); /* sf-checkpoint */
int sf_parse_join(const char *text, sf_clone_status_t *out, int max);     /* sf-join */
int sf_parse_kill(const char *text);                               /* sf-kill */

#endif

/* sf-proto.h: SnowFlock's requests and replies (sflib/guest/layout.py), pure and
 * internal to libsnowflock. The results' shapes are sflib/fork/calls.py's. */
#ifndef SF_PROTO_H
#define SF_PROTO_H

#include <stddef.h>

#include "snowflock.h"
#include "sf-json.h"

#define SFP_REQUESTS "snowflock/requests/"
#define SFP_REPLIES "snowflock/replies/"
#define SFP_IDENTITY "snowflock/identity"
#define SFP_RID_MAX 64

/* A request ID from pid, tid and 8 random bytes: [A-Za-z0-9_-]{1,64}. */
SF_INTERNAL void sfp_rid(char out[SFP_RID_MAX + 1], long pid, long tid, const unsigned char rnd[8]);

/* One argument of a request: a string, or an integer when str is NULL. */
struct sfp_arg {
    const char *name;
    const char *str;
    long long num;
};

/* {"op": op, "args": {...}} into out[cap]; its length, or -1 if it does not fit. */
SF_INTERNAL int sfp_request(char *out, size_t cap, const char *op, const struct sfp_arg *args,
                            size_t nargs);

/* A reply's result into *result (owned by the caller: sfj_free) and 0; or the
 * host's error as a negative SF_E* code (its message into msg[size]: "message
 * (hint)"), or -SF_ESYSTEM with errno EPROTO if raw is no reply. */
SF_INTERNAL int sfp_reply(const char *raw, size_t len, struct sfj *result, char *msg, size_t size);

/* The exit code of an error type of sflib/errors.py (UsageError: 2, ...; 1 for any
 * other name). */
SF_INTERNAL int sfp_error_code(const char *type);

/* The results, each checked; -SF_ESYSTEM (errno EPROTO) when it is not the shape
 * sfld sends. */
SF_INTERNAL int sfp_ticket(const struct sfj *result, sf_ticket_t *out);
/* clone, checkpoint and create_clones: the ID (0 in the parent), and the seed
 * (NULL if there is none) and checkpoint (NULL if not asked for) it names. */
SF_INTERNAL int sfp_fork(const struct sfj *result, const char **seed, const char **checkpoint);
/* join and kill: the clones of the ticket, sorted by ID into out[max]; returns how
 * many there are (also beyond max); with killed, how many are "killed" instead. */
SF_INTERNAL int sfp_clones(const struct sfj *result, sf_clone_status_t *out, int max, int killed);

#endif

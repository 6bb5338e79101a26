/* sf-xs.h: a XenStore client connection for libsnowflock (internal).
 *
 * One connection per call of the API, so that threads share nothing: to the guest
 * agent's socket (sf-guestd(8)), else on the virtio-serial port itself. The wire
 * protocol is Xen's (sflib/xenstore/wire.py): a 16-byte header of four
 * little-endian uint32 (type, req_id, tx_id, len), then len <= 4096 bytes.
 */
#ifndef SF_XS_H
#define SF_XS_H

#include <stddef.h>
#include <stdint.h>

#include "sf-json.h"

#define SFX_PAYLOAD_MAX 4096
#define SFX_AGENT_SOCKET "/run/xenstored/socket"
#define SFX_PORT "/dev/virtio-ports/org.snowflock.xenbus"

enum { SFX_DIRECTORY = 1, SFX_READ = 2, SFX_WATCH = 4, SFX_UNWATCH = 5, SFX_WRITE = 11, SFX_RM = 13,
       SFX_WATCH_EVENT = 15, SFX_ERROR = 16 };

struct sfx {
    int fd;
    uint32_t next_id;
    unsigned events; /* watch events received and not yet waited for */
    char token[72];  /* the token of the one watch this connection places */
    char path[200];  /* its path, to unwatch */
    int direct;      /* on the port itself: no agent removes the watch for us */
    const char *where; /* what sfx_open connected to, or tried last */
};

/* Connects (see snowflock.h's TRANSPORT): 0, or -SF_EUNREACHABLE when there is no
 * agent nor port or they refuse, -SF_ESYSTEM when a system call failed; errno is
 * set then, and x->where names what was tried last. */
SF_INTERNAL int sfx_open(struct sfx *x);
/* Closes x, first removing its watch when it is on the port (best effort: a
 * watch left there only counts against the domain's quota). */
SF_INTERNAL void sfx_close(struct sfx *x);

/* One request: payload[len] sent as op; the reply's payload into out[cap] (NUL
 * added; cap >= 1), its length in *out_len. Returns 0; -SF_ESYSTEM with errno set
 * from a XenStore error (ENOENT, EACCES, ...) or a failed system call, EPROTO for
 * a peer that does not speak the protocol. Watch events met meanwhile are counted. */
SF_INTERNAL int sfx_request(struct sfx *x, uint32_t op, const void *payload, size_t len,
                            char *out, size_t cap, size_t *out_len);

/* The common requests. sfx_read of a missing key gives "" (length 0). */
SF_INTERNAL int sfx_read(struct sfx *x, const char *path, char *out, size_t cap, size_t *out_len);
SF_INTERNAL int sfx_write(struct sfx *x, const char *path, const char *value, size_t len);
/* The names under path, each NUL-terminated, into out[cap] (length in *out_len);
 * -SF_ESYSTEM with errno ENOENT when path does not exist. */
SF_INTERNAL int sfx_list(struct sfx *x, const char *path, char *out, size_t cap, size_t *out_len);
SF_INTERNAL int sfx_rm(struct sfx *x, const char *path);
SF_INTERNAL int sfx_watch(struct sfx *x, const char *path, const char *token);

/* Blocks until a watch event comes (or takes one already counted). 0 or as above. */
SF_INTERNAL int sfx_wait_event(struct sfx *x);

/* The errno of one of Xen's error strings ("ENOENT"); EIO for an unknown one. */
SF_INTERNAL int sfx_errno(const char *name);

#endif

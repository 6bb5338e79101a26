/* memproto.h: the wire protocol between the memory server and memtap.
 *
 * A clone on another host maps its parent's frozen memory image through memtap, a
 * FUSE file system; memtap fetches the pages it lacks from the memory server on the
 * parent's host (DESIGN §2 step 4). The same protocol is spoken by
 * sflib/memory/protocol.py (the Python codec used by sfld and the tests): keep both in
 * step, and bump MP_VERSION when a change breaks a peer of the other version. A new op
 * does not: a server that lacks it answers MP_EINVAL and the connection stays (FREEMAP
 * came that way, in version 1).
 *
 * TCP, one image per connection. Every message starts with a 24-byte header; all
 * integers are little-endian. A client sends requests one at a time and reads each
 * reply before the next request (no pipelining).
 *
 *   request:  magic u32 | op u16 | flags u16 | length u32 | reserved u32 | offset u64
 *   reply:    magic u32 | op u16 | status u16 | length u32 | pages u32  | value u64
 *
 * A request's payload is length bytes, for every op but READ (whose length is the
 * range's and which has no payload). A reply's payload is always length bytes.
 *
 * HELLO    request length = secret length, payload = the shared secret (may be
 *          empty); offset = MP_VERSION. Must be the first request. Reply: status,
 *          value = MP_VERSION. A wrong secret is answered MP_EACCES, then the server
 *          closes the connection.
 * OPEN     payload = the image's name (1..MP_MAX_NAME bytes of [A-Za-z0-9._-], not
 *          starting with '.'): a file in the server's image folder. Reply: value =
 *          the image's size in bytes; pages = its size in pages. One OPEN per
 *          connection.
 * READ     offset and length: a page-aligned range inside the image, length a
 *          non-zero multiple of MP_PAGE, at most MP_MAX_READ. Reply: pages = length
 *          / MP_PAGE, value = offset, length = payload bytes; payload = a bitmap of
 *          ceil(pages / 8) bytes (bit i of byte i / 8, least significant first: page
 *          i's data follows), then the data of those pages in order. A page whose bit
 *          is clear is not sent: it is all zero, or the guest reported it free at the
 *          checkpoint (its content does not matter); the client fills it with zeros.
 * STATS    no payload. Reply payload: one JSON object of the server's counters.
 * FREEMAP  no payload. Reply: pages = the image's size in pages, length = ceil(pages /
 *          8), payload = the image's free-page map (below), all zero bytes if it has
 *          none; bits past the last page are clear. A client asks once after OPEN and
 *          then never READs a free page by itself (a READ may still span one between
 *          pages it lacks; the reply leaves it out).
 *
 * Errors come back as a reply with a non-zero status and no payload; the connection
 * stays usable, except after a bad HELLO (MP_EACCES, MP_EVERSION), a request before
 * HELLO (MP_EACCES), or a request payload length over MP_MAX_PAYLOAD (MP_EINVAL): the
 * server answers these, then closes the connection. A bad magic closes it unanswered.
 * READ before OPEN and FREEMAP before OPEN are MP_ESTATE.
 *
 * Reply payloads are bounded by their op, not by MP_MAX_PAYLOAD: a READ's by
 * ceil(pages / 8) + MP_MAX_READ, a FREEMAP's by ceil(pages / 8) <= MP_MAX_FREEMAP
 * (512 KiB for a 16 GiB image), a STATS' by the number of clients.
 *
 * The free-page map of an image NAME is the optional file NAME.free beside it: one
 * bit per page in the same bit order as the READ bitmap, set for a page that the guest
 * reported free (its content does not matter: a client reads it as zeros).
 */
#ifndef SNOWFLOCK_MEMPROTO_H
#define SNOWFLOCK_MEMPROTO_H

#include <stdint.h>

#define MP_MAGIC 0x4d504653u /* "SFPM" on the wire */
#define MP_VERSION 1u
#define MP_PAGE 4096u
#define MP_HEADER 24u
#define MP_MAX_NAME 255u
#define MP_MAX_SECRET 1024u
#define MP_MAX_READ (1024u * 1024u) /* 256 pages per request */
#define MP_MAX_PAYLOAD MP_MAX_SECRET        /* of a request */
#define MP_MAX_FREEMAP (512u * 1024u * 1024u) /* ceil(UINT32_MAX pages / 8) bytes */

enum mp_op {
    MP_OP_HELLO = 1,
    MP_OP_OPEN = 2,
    MP_OP_READ = 3,
    MP_OP_STATS = 4,
    MP_OP_FREEMAP = 5,
};

enum mp_status {
    MP_OK = 0,
    MP_EINVAL = 1,  /* malformed request: bad op, alignment, length, name */
    MP_ENOENT = 2,  /* no such image */
    MP_ERANGE = 3,  /* the range lies (partly) outside the image */
    MP_EACCES = 4,  /* wrong secret, or a request before HELLO */
    MP_ESTATE = 5,  /* READ or FREEMAP before OPEN, a second OPEN or HELLO */
    MP_EIO = 6,     /* the server could not read the image */
    MP_EVERSION = 7 /* the client speaks another MP_VERSION */
};

struct mp_request {
    uint32_t magic;
    uint16_t op;
    uint16_t flags;
    uint32_t length;
    uint32_t reserved;
    uint64_t offset;
} __attribute__((packed));

struct mp_reply {
    uint32_t magic;
    uint16_t op;
    uint16_t status;
    uint32_t length;
    uint32_t pages;
    uint64_t value;
} __attribute__((packed));

_Static_assert(sizeof(struct mp_request) == MP_HEADER, "request header is 24 bytes");
_Static_assert(sizeof(struct mp_reply) == MP_HEADER, "reply header is 24 bytes");

#endif

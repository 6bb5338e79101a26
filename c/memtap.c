/* memtap.c: a FUSE file system that serves a remote memory image lazily (DESIGN §2
 * step 4).
 *
 * A clone on another host maps its parent's frozen RAM through memtap: QEMU's
 * memory-backend-file (share=off, a private copy-on-write mmap) points at
 * MOUNTPOINT/NAME. The first time a page is touched the kernel asks memtap to read
 * it; memtap fetches the missing pages of that range, plus a prefetch window after
 * it, from the memory server (c/memproto.h), stores them in a local cache file and
 * answers from there. Every clone on this host maps the same file, so a page crosses
 * the network once per host; the kernel's page cache then shares it between them.
 *
 * Why one thread: the protocol allows one request in flight per connection, so
 * parallel reads of missing pages would queue on the socket anyway, and a single
 * loop needs no locks around the socket, the bitmap and the counters. A fetch blocks
 * the loop for at most about twice --timeout (the request, then one reconnection);
 * reads the page cache can answer never reach memtap at all.
 *
 * Stopping: FUSE's handlers for SIGTERM, SIGINT and SIGHUP only mark the session as
 * exited; the loop sees that once the request at hand is answered. A fetch waiting on
 * the server gives up at once then (the reads fail with EIO), whenever the signal
 * came: the socket is non-blocking, and every wait on it is a ppoll that unblocks
 * those signals only while it waits (wait_sock).
 *
 * Faults: a connection that fails (closed, reset, timeout, nonsense) is reopened
 * once. If that fails too the server is dead for good: reads that need missing pages
 * fail with EIO at once, cached pages are still served, .stats says so. A READ the
 * server refuses with an error status fails that read only.
 *
 * Free pages: right after OPEN (at start-up and after a reconnection) memtap asks the
 * server's free-page map (FREEMAP) and marks every free page present at once: its
 * content does not matter, and its cache page stays a hole of the sparse file, which
 * reads as zeros. So no READ starts or ends at a free page (one may span free pages
 * between missing ones: the reply leaves them out at the cost of a bit each). A server
 * that refuses FREEMAP (an older one) leaves every page to be fetched.
 *
 * Counters in .stats: requests = READs sent, pages_cached = pages made present by
 * READs, pages_fetched = pages received as data, pages_zero = pages made present by
 * READs as absent (zero or free), pages_free = pages of the free-page map (present
 * from the start, not in pages_cached), bytes_fetched = READ reply payload bytes,
 * cache_hits = reads served from the cache without a fetch, errors = failed reads.
 */
#define _GNU_SOURCE /* asprintf */
#define FUSE_USE_VERSION 31
#include <fuse.h>
#include <fuse_lowlevel.h> /* fuse_session_exited */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "memproto.h"

#define EXIT_USAGE 100
#define EXIT_STARTUP 111
#define STATS_NAME ".stats"
#define READ_PAGES (MP_MAX_READ / MP_PAGE)
#define MAX_PREFETCH (1u << 20)  /* 4 GiB ahead is already absurd */
#define MAX_TIMEOUT 86400.0
#define MAX_SERVER 300          /* HOST:PORT, with room for an IPv6 literal */

struct tap {
    /* From the command line. */
    const char *server, *image, *cache_path, *secret_file, *mountpoint;
    char host[MAX_SERVER], port[16], path[MP_MAX_NAME + 2]; /* path: "/" NAME */
    char secret[MP_MAX_SECRET];
    size_t secret_len;
    unsigned long prefetch;
    struct timespec timeout; /* of every wait on the socket */
    int ready_fd;
    sigset_t stop_signals; /* those FUSE's handlers stop the loop on */

    /* The image and the connection. */
    uint64_t size, pages;
    int sock;  /* -1 between a failure and the reconnection */
    int alive; /* 0 once the server is given up for dead */
    int no_freemap; /* the server refused FREEMAP (said once) */
    struct fuse *fuse;

    /* The cache: page i is in cache_fd once bit i of present is set (a free page from
     * the start, as a hole). */
    int cache_fd;
    uint8_t *present;
    uint8_t *reply; /* one READ reply's payload: bitmap, then data; or a FREEMAP piece */

    struct {
        uint64_t cached, fetched, zero, free, requests, bytes, hits, errors;
    } n;
};

static const char *const status_names[] = {"OK", "EINVAL", "ENOENT", "ERANGE",
                                           "EACCES", "ESTATE", "EIO", "EVERSION"};

static const char *status_name(unsigned status)
{
    return status < sizeof status_names / sizeof *status_names ? status_names[status] : "?";
}

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    (void)fputs("memtap: ", stderr);
    (void)vfprintf(stderr, fmt, ap); /* stderr is where we would report its failure */
    (void)fputc('\n', stderr);
    va_end(ap);
}

/* libfuse's own messages (a bad mount point...) get our prefix too. */
static void fuse_logger(enum fuse_log_level level, const char *fmt, va_list ap)
{
    (void)level;
    (void)fputs("memtap: ", stderr);
    (void)vfprintf(stderr, fmt, ap);
}

/* Pages ------------------------------------------------------------------------- */

/* Bit i of a bitmap in the protocol's order (bit i % 8 of byte i / 8). */
static int bit(const uint8_t *map, uint64_t i)
{
    return map[i / 8] >> (i % 8) & 1;
}

/* The first page of [from, to) not in the cache, or to. */
static uint64_t next_missing(const struct tap *t, uint64_t from, uint64_t to)
{
    while (from < to && bit(t->present, from))
        from++;
    return from;
}

/* Socket I/O -------------------------------------------------------------------- */

/* Whether SIGTERM/SIGINT asked the loop to stop: then a blocked exchange gives up
 * rather than hold the unmount back for a whole timeout. */
static int stopping(const struct tap *t)
{
    return t->fuse && fuse_session_exited(fuse_get_session(t->fuse));
}

/* Waits up to --timeout for the socket to be ready for events. The stop signals are
 * blocked from the check of stopping() until ppoll, which restores the mask of before
 * for the wait alone: a signal handled between the request's send and a blocking recv
 * would have left that recv waiting for the whole timeout; here one that comes in
 * between stays pending and ends the wait as it starts. Fails with EAGAIN on a
 * timeout, EINTR if we are stopping. */
static int wait_sock(struct tap *t, short events)
{
    struct pollfd pfd = {.fd = t->sock, .events = events};
    sigset_t old;
    int n = -1, err = 0;

    if (sigprocmask(SIG_BLOCK, &t->stop_signals, &old) < 0)
        return -1;
    while (!stopping(t) && (n = ppoll(&pfd, 1, &t->timeout, &old)) < 0 && errno == EINTR)
        ; /* a signal that does not stop us */
    if (stopping(t))
        err = EINTR;
    else if (n <= 0)
        err = n == 0 ? EAGAIN : errno;
    if (sigprocmask(SIG_SETMASK, &old, NULL) < 0)
        return -1;
    errno = err;
    return err ? -1 : 0;
}

/* Sends (out) or receives len bytes. Fails with EPIPE if the server closed the
 * connection, EAGAIN on a timeout, EINTR if we are stopping. */
static int sock_io(struct tap *t, void *buf, size_t len, int out)
{
    char *p = buf;

    while (len > 0) {
        /* MSG_NOSIGNAL: a reset connection is an error to handle, not a SIGPIPE. */
        ssize_t n = out ? send(t->sock, p, len, MSG_NOSIGNAL) : recv(t->sock, p, len, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) { /* non-blocking: not yet */
            if (wait_sock(t, out ? POLLOUT : POLLIN) < 0)
                return -1;
            continue;
        }
        if (n <= 0) {
            errno = n == 0 ? EPIPE : errno;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static const char *describe(int err)
{
    if (err == EAGAIN) /* wait_sock's timeout */
        return "no answer within the timeout";
    if (err == EPIPE)
        return "connection closed";
    return strerror(err);
}

/* Sends a request and reads the reply's header, checking its magic and op. Fails
 * with errno EPROTO if the reply does not answer the request. */
static int exchange(struct tap *t, enum mp_op op, uint64_t offset, uint32_t length,
                    const void *payload, struct mp_reply *reply)
{
    char msg[MP_HEADER + MP_MAX_SECRET + MP_MAX_NAME];
    struct mp_request req = {.magic = htole32(MP_MAGIC), .op = htole16(op),
                             .length = htole32(length), .offset = htole64(offset)};
    size_t len = MP_HEADER + (payload ? length : 0);

    /* One send for header and payload, so no Nagle/delayed-ACK stall between them. */
    memcpy(msg, &req, MP_HEADER);
    if (payload)
        memcpy(msg + MP_HEADER, payload, length);
    if (sock_io(t, msg, len, 1) < 0 || sock_io(t, reply, sizeof *reply, 0) < 0)
        return -1;
    reply->magic = le32toh(reply->magic);
    reply->op = le16toh(reply->op);
    reply->status = le16toh(reply->status);
    reply->length = le32toh(reply->length);
    reply->pages = le32toh(reply->pages);
    reply->value = le64toh(reply->value);
    /* An error reply carries no payload: one that does has lost step with us. */
    if (reply->magic != MP_MAGIC || reply->op != op || (reply->status && reply->length)) {
        errno = EPROTO;
        return -1;
    }
    return 0;
}

static void disconnect(struct tap *t)
{
    if (t->sock >= 0)
        (void)close(t->sock); /* a socket we give up on: nothing left to flush */
    t->sock = -1;
}

/* Connects the non-blocking socket, within --timeout and unless we are stopping. */
static int connect_sock(struct tap *t, const struct addrinfo *ai)
{
    socklen_t len = sizeof(int);
    int err;

    if (connect(t->sock, ai->ai_addr, ai->ai_addrlen) == 0)
        return 0;
    if (errno != EINPROGRESS || wait_sock(t, POLLOUT) < 0 ||
        getsockopt(t->sock, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return -1;
    errno = err;
    return err ? -1 : 0;
}

/* A connection to the server, non-blocking: every wait on it is wait_sock's. Returns
 * -1 with why[] filled. */
static int dial(struct tap *t, char *why, size_t len)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *list, *ai;
    int err, one = 1;

    err = getaddrinfo(t->host, t->port, &hints, &list);
    if (err) {
        snprintf(why, len, "cannot resolve the host: %s", gai_strerror(err));
        return -1;
    }
    err = 0;
    for (ai = list; ai && t->sock < 0; ai = ai->ai_next) {
        t->sock = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                         ai->ai_protocol);
        if (t->sock < 0 ||
            /* requests are small and each waits for its reply: send them at once */
            setsockopt(t->sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
            connect_sock(t, ai) < 0) {
            err = errno;
            disconnect(t);
        }
    }
    freeaddrinfo(list);
    if (t->sock < 0)
        snprintf(why, len, "cannot connect: %s", describe(err));
    return t->sock < 0 ? -1 : 0;
}

/* Connects, says HELLO and OPENs the image; learns its size the first time, checks
 * it did not change after. Returns -1 with why[] filled, and no connection. */
static int connect_server(struct tap *t, char *why, size_t len)
{
    struct mp_reply r;
    uint32_t name_len = (uint32_t)strlen(t->image);

    if (dial(t, why, len) < 0)
        return -1;
    if (exchange(t, MP_OP_HELLO, MP_VERSION, (uint32_t)t->secret_len, t->secret, &r) < 0 ||
        (!r.status && exchange(t, MP_OP_OPEN, 0, name_len, t->image, &r) < 0))
        snprintf(why, len, "%s", describe(errno));
    else if (r.status)
        snprintf(why, len, "%s refused: %s", r.op == MP_OP_OPEN ? "OPEN" : "HELLO",
                 status_name(r.status));
    else if (r.value % MP_PAGE || r.pages != r.value / MP_PAGE)
        snprintf(why, len, "image of %" PRIu64 " bytes in %u pages: not whole pages",
                 (uint64_t)r.value, (unsigned)r.pages);
    else if (t->present && r.value != t->size)
        snprintf(why, len, "the image changed size to %" PRIu64, (uint64_t)r.value);
    else {
        t->size = r.value;
        t->pages = r.pages;
        return 0;
    }
    disconnect(t);
    return -1;
}

/* Free pages -------------------------------------------------------------------- */

/* Marks present the free pages of map, bytes [at, at + len) of the free-page map:
 * their cache pages stay holes. */
static void mark_free(struct tap *t, const uint8_t *map, uint64_t at, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        uint8_t bits = map[i];
        if (at + i == t->pages / 8) /* the last byte, partly past the image: ignored */
            bits &= (uint8_t)((1u << (t->pages % 8)) - 1);
        t->present[at + i] |= bits;
        t->n.free += (uint64_t)__builtin_popcount(bits);
    }
}

/* Asks the free-page map of the image just OPENed and marks its free pages present,
 * in pieces of t->reply's size. A server that refuses (an older one, without FREEMAP)
 * leaves the map unknown. Returns -1 with errno if the connection failed. */
static int learn_free_pages(struct tap *t)
{
    uint64_t len = (t->pages + 7) / 8, at;
    struct mp_reply r;

    if (exchange(t, MP_OP_FREEMAP, 0, 0, NULL, &r) < 0)
        return -1;
    if (r.status) {
        if (!t->no_freemap)
            warn("memory server %s refused FREEMAP (%s): free pages will be fetched",
                 t->server, status_name(r.status));
        t->no_freemap = 1;
        return 0;
    }
    if (r.pages != t->pages || r.length != len) {
        errno = EPROTO;
        return -1;
    }
    t->n.free = 0; /* counted anew: the same map, after a reconnection */
    for (at = 0; at < len; at += MP_MAX_READ) {
        size_t piece = len - at < MP_MAX_READ ? (size_t)(len - at) : MP_MAX_READ;
        if (sock_io(t, t->reply, piece, 0) < 0)
            return -1;
        mark_free(t, t->reply, at, piece);
    }
    return 0;
}

/* Connects (connect_server), then learns the free-page map. Returns -1 with why[]
 * filled, and no connection. */
static int open_session(struct tap *t, char *why, size_t len)
{
    if (connect_server(t, why, len) < 0)
        return -1;
    if (learn_free_pages(t) == 0)
        return 0;
    snprintf(why, len, "FREEMAP: %s", describe(errno));
    disconnect(t);
    return -1;
}

/* Fetching ---------------------------------------------------------------------- */

/* One READ of pages [first, first + n): its payload lands in t->reply. Returns 0, 1
 * if the server refused it (the connection stays usable), or -1 with errno if the
 * connection failed. */
static int read_pages(struct tap *t, uint64_t first, uint32_t n)
{
    struct mp_reply r;
    uint32_t map = (n + 7) / 8, sent = 0, i;

    t->n.requests++;
    if (exchange(t, MP_OP_READ, first * MP_PAGE, n * MP_PAGE, NULL, &r) < 0)
        return -1;
    if (r.status) {
        warn("READ of %u pages at page %" PRIu64 " refused: %s", n, first,
             status_name(r.status));
        return 1;
    }
    if (r.pages != n || r.value != first * MP_PAGE || r.length < map ||
        r.length > map + (uint64_t)n * MP_PAGE)
        goto bad;
    if (sock_io(t, t->reply, map, 0) < 0)
        return -1;
    for (i = 0; i < n; i++)
        sent += (uint32_t)bit(t->reply, i);
    if (r.length != map + (uint64_t)sent * MP_PAGE)
        goto bad;
    if (sock_io(t, t->reply + map, (size_t)sent * MP_PAGE, 0) < 0)
        return -1;
    t->n.bytes += r.length;
    t->n.fetched += sent;
    return 0;
bad:
    errno = EPROTO;
    return -1;
}

/* Writes (out) or reads len bytes of the cache at off. */
static int cache_io(struct tap *t, void *buf, size_t len, off_t off, int out)
{
    char *p = buf;

    while (len > 0) {
        ssize_t n = out ? pwrite(t->cache_fd, p, len, off) : pread(t->cache_fd, p, len, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            errno = n == 0 ? EIO : errno; /* someone shrank the cache under us */
            warn("cannot %s the cache %s: %s", out ? "write" : "read", t->cache_path,
                 strerror(errno));
            return -EIO;
        }
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

/* Writes the pages of the READ reply in t->reply to the cache and marks them all
 * present: absent pages stay holes of the sparse cache file, which read as zeros.
 * Pages present already (cached, or free) are not counted again. */
static int store_pages(struct tap *t, uint64_t first, uint32_t n)
{
    uint8_t *data = t->reply + (n + 7) / 8;
    uint32_t i = 0, j;

    while (i < n) { /* i: the start of a run of pages sent, j: its end */
        for (j = i; j < n && bit(t->reply, j); j++)
            ;
        if (j > i &&
            cache_io(t, data, (size_t)(j - i) * MP_PAGE, (off_t)((first + i) * MP_PAGE), 1) < 0)
            return -EIO;
        data += (size_t)(j - i) * MP_PAGE;
        for (i = j; i < n && !bit(t->reply, i); i++)
            ;
    }
    for (i = 0; i < n; i++)
        if (!bit(t->present, first + i)) {
            t->present[(first + i) / 8] |= (uint8_t)(1u << ((first + i) % 8));
            t->n.cached++;
            t->n.zero += !bit(t->reply, i);
        }
    return 0;
}

/* Fetches pages [first, first + n) into the cache, reconnecting once if the
 * connection fails; if that fails too, the server is dead. Returns 0 or -EIO. */
static int fetch(struct tap *t, uint64_t first, uint32_t n)
{
    char why[256];
    int res = t->alive ? read_pages(t, first, n) : 1;

    if (res < 0 && !stopping(t)) {
        warn("lost the memory server %s: %s; reconnecting", t->server, describe(errno));
        disconnect(t);
        if (open_session(t, why, sizeof why) < 0)
            warn("memory server %s: %s; reads of uncached pages now fail", t->server, why);
        else if ((res = read_pages(t, first, n)) < 0)
            warn("memory server %s failed again: %s; reads of uncached pages now fail",
                 t->server, describe(errno));
    }
    if (res < 0) { /* dead for good, or interrupted mid-reply because we are leaving */
        disconnect(t);
        t->alive = 0;
    }
    return res ? -EIO : store_pages(t, first, n);
}

/* Makes pages [first, last] present: fetches the missing pages of that range and of
 * the prefetch window after it, at most READ_PAGES a request. A request spans from a
 * missing page to the last missing one, so a cached page in between is fetched again
 * rather than split the request. Returns 0, or -EIO if some of [first, last] could
 * not be fetched (a failed prefetch beyond them does not fail the read). */
static int make_present(struct tap *t, uint64_t first, uint64_t last)
{
    uint64_t end = last + 1 + t->prefetch, stop, page;
    int res = 0;

    if (next_missing(t, first, last + 1) > last) {
        t->n.hits++;
        return 0;
    }
    if (end > t->pages)
        end = t->pages;
    for (stop = end; stop > first && bit(t->present, stop - 1); stop--)
        ;
    for (page = next_missing(t, first, stop); page < stop && !res;) {
        uint32_t n = (uint32_t)(stop - page < READ_PAGES ? stop - page : READ_PAGES);
        res = fetch(t, page, n);
        page = next_missing(t, page + n, stop);
    }
    return next_missing(t, first, last + 1) > last ? 0 : res ? res : -EIO;
}

/* The file system ------------------------------------------------------------- */

static struct tap *tap(void)
{
    return fuse_get_context()->private_data;
}

static void *tap_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    struct tap *t = tap();

    /* No kernel readahead: a guest touches its RAM at random, and a fault would
     * otherwise pull 32 pages around each page; --prefetch is the one window. */
    conn->max_readahead = 0;
    /* The image never changes: let the kernel keep names and attributes. */
    cfg->entry_timeout = cfg->attr_timeout = cfg->negative_timeout = 3600;
    if (t->ready_fd >= 0) {
        /* The mount is live: the kernel holds other requests until init returns. */
        int written = write(t->ready_fd, "\n", 1) == 1;
        if (close(t->ready_fd) < 0 || !written)
            warn("cannot report readiness on descriptor %d: %s", t->ready_fd,
                 strerror(errno));
        t->ready_fd = -1;
    }
    return t;
}

static int tap_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    struct tap *t = tap();

    (void)fi;
    memset(st, 0, sizeof *st);
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_nlink = 1;
    st->st_mode = S_IFREG | 0444; /* .stats has size 0: its reads are direct_io */
    if (strcmp(path, "/") == 0)
        st->st_mode = S_IFDIR | 0555;
    else if (strcmp(path, t->path) == 0)
        st->st_size = (off_t)t->size;
    else if (strcmp(path, "/" STATS_NAME) != 0)
        return -ENOENT;
    return 0;
}

static int tap_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                       struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    struct tap *t = tap();

    (void)off, (void)fi, (void)flags;
    if (strcmp(path, "/") != 0)
        return -ENOTDIR;
    /* Four names: the buffer cannot fill up, so fill() cannot fail. */
    fill(buf, ".", NULL, 0, 0);
    fill(buf, "..", NULL, 0, 0);
    fill(buf, t->image, NULL, 0, 0);
    fill(buf, STATS_NAME, NULL, 0, 0);
    return 0;
}

/* The image opens O_RDWR too: QEMU opens memory-backend-file paths so even with
 * share=off. The writes themselves fail. .stats is a snapshot taken here. */
static int tap_open(const char *path, struct fuse_file_info *fi)
{
    struct tap *t = tap();
    char *text;

    if (strcmp(path, t->path) == 0) {
        if (fi->flags & O_TRUNC)
            return -EROFS;
        fi->keep_cache = 1; /* immutable: the page cache stays valid across opens */
        return 0;
    }
    if (strcmp(path, "/" STATS_NAME) != 0)
        return -ENOENT;
    if ((fi->flags & O_ACCMODE) != O_RDONLY)
        return -EROFS;
    if (asprintf(&text,
                 "{\"image\": \"%s\", \"server\": \"%s\", \"size\": %" PRIu64
                 ", \"pages\": %" PRIu64 ", \"pages_cached\": %" PRIu64
                 ", \"pages_fetched\": %" PRIu64 ", \"pages_zero\": %" PRIu64
                 ", \"pages_free\": %" PRIu64 ", \"requests\": %" PRIu64
                 ", \"bytes_fetched\": %" PRIu64 ", \"cache_hits\": %" PRIu64
                 ", \"errors\": %" PRIu64 ", \"server_alive\": %s, \"prefetch\": %lu}\n",
                 t->image, t->server, t->size, t->pages, t->n.cached, t->n.fetched,
                 t->n.zero, t->n.free, t->n.requests, t->n.bytes, t->n.hits, t->n.errors,
                 t->alive ? "true" : "false", t->prefetch) < 0)
        return -ENOMEM;
    fi->fh = (uintptr_t)text;
    fi->direct_io = 1; /* its size is not known in advance */
    return 0;
}

static int tap_read(const char *path, char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct tap *t = tap();
    int res;

    if (strcmp(path, t->path) != 0) {
        const char *text = (const char *)(uintptr_t)fi->fh;
        size_t len = strlen(text);
        if ((size_t)off >= len)
            return 0;
        size = size < len - (size_t)off ? size : len - (size_t)off;
        memcpy(buf, text + off, size);
        return (int)size;
    }
    if ((uint64_t)off >= t->size || size == 0)
        return 0;
    if (size > t->size - (uint64_t)off)
        size = (size_t)(t->size - (uint64_t)off);
    res = make_present(t, (uint64_t)off / MP_PAGE, ((uint64_t)off + size - 1) / MP_PAGE);
    if (!res)
        res = cache_io(t, buf, size, off, 0);
    if (res)
        t->n.errors++;
    return res ? res : (int)size;
}

static int tap_release(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    free((void *)(uintptr_t)fi->fh); /* .stats's text; 0 for the image */
    return 0;
}

static int tap_write(const char *path, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    (void)path, (void)buf, (void)size, (void)off, (void)fi;
    return -EROFS;
}

static int tap_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    (void)path, (void)size, (void)fi;
    return -EROFS;
}

/* QEMU punches holes in the backing file on discard: never in the shared image. */
static int tap_fallocate(const char *path, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    (void)path, (void)mode, (void)off, (void)len, (void)fi;
    return -EOPNOTSUPP;
}

static const struct fuse_operations tap_ops = {
    .init = tap_init,
    .getattr = tap_getattr,
    .readdir = tap_readdir,
    .open = tap_open,
    .read = tap_read,
    .release = tap_release,
    .write = tap_write,
    .truncate = tap_truncate,
    .fallocate = tap_fallocate,
};

/* Start-up ---------------------------------------------------------------------- */

static void usage(FILE *out)
{
    (void)fputs("usage: memtap --server HOST:PORT --image NAME --cache FILE [--secret-file FILE]\n"
                "              [--prefetch PAGES] [--timeout SECONDS] [--ready-fd N] MOUNTPOINT\n"
                "\n"
                "Mounts MOUNTPOINT with two files: NAME, the memory image NAME of the memory\n"
                "server at HOST:PORT, fetched page by page on first read into the cache FILE;\n"
                "and .stats, the counters as JSON. Runs in the foreground; SIGTERM unmounts.\n"
                "  --prefetch PAGES   pages fetched beyond each missing read (default 8)\n"
                "  --timeout SECONDS  for each exchange with the server (default 10)\n"
                "  --ready-fd N       write a newline to descriptor N once mounted\n"
                "Exit status: 0 once unmounted, 100 misuse, 111 failure to start.\n",
                out);
}

static void misuse(const char *fmt, const char *arg)
{
    (void)fputs("memtap: ", stderr);
    (void)fprintf(stderr, fmt, arg);
    (void)fputs("\nTry 'memtap --help'.\n", stderr);
    exit(EXIT_USAGE);
}

static unsigned long number(const char *arg, unsigned long max, const char *what)
{
    char *end;
    unsigned long n;

    errno = 0;
    n = strtoul(arg, &end, 10);
    if (errno || end == arg || *end || arg[0] == '-' || n > max)
        misuse(what, arg);
    return n;
}

/* HOST:PORT, split at the last colon as sflib.memory.server.split_address does (so an
 * IPv6 address needs no brackets). Only characters that need no escaping in .stats. */
static void parse_server(struct tap *t, const char *arg)
{
    const char *colon = strrchr(arg, ':');

    if (strlen(arg) >= MAX_SERVER || !colon || colon == arg || strspn(arg,
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:") != strlen(arg))
        misuse("invalid --server %s: use HOST:PORT", arg);
    memcpy(t->host, arg, (size_t)(colon - arg));
    snprintf(t->port, sizeof t->port, "%lu", number(colon + 1, 65535, "invalid port in %s"));
    t->server = arg;
}

static void parse_image(struct tap *t, const char *arg)
{
    size_t len = strlen(arg);

    if (len == 0 || len > MP_MAX_NAME || arg[0] == '.' ||
        strspn(arg, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != len)
        misuse("invalid image name %s", arg);
    t->image = arg;
    snprintf(t->path, sizeof t->path, "/%s", arg);
}

static void parse_args(struct tap *t, int argc, char **argv)
{
    static const struct option options[] = {
        {"server", required_argument, NULL, 's'}, {"image", required_argument, NULL, 'i'},
        {"cache", required_argument, NULL, 'c'},  {"secret-file", required_argument, NULL, 'k'},
        {"prefetch", required_argument, NULL, 'p'}, {"timeout", required_argument, NULL, 't'},
        {"ready-fd", required_argument, NULL, 'r'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    double timeout = 10;
    char *end;
    int opt;

    opterr = 0; /* we say it ourselves, with the prefix */
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 's': parse_server(t, optarg); break;
        case 'i': parse_image(t, optarg); break;
        case 'c': t->cache_path = optarg; break;
        case 'k': t->secret_file = optarg; break;
        case 'p': t->prefetch = number(optarg, MAX_PREFETCH, "invalid --prefetch %s"); break;
        case 'r': t->ready_fd = (int)number(optarg, 65535, "invalid --ready-fd %s"); break;
        case 't':
            timeout = strtod(optarg, &end);
            if (end == optarg || *end || !(timeout > 0 && timeout <= MAX_TIMEOUT))
                misuse("invalid --timeout %s: use seconds, more than 0", optarg);
            break;
        case 'h': usage(stdout); exit(0);
        default: misuse("unknown or incomplete option %s", argv[optind - 1]);
        }
    }
    if (!t->server || !t->image || !t->cache_path || optind != argc - 1)
        misuse("%s", "--server, --image, --cache and one MOUNTPOINT are needed");
    t->mountpoint = argv[optind];
    t->timeout.tv_sec = (time_t)timeout;
    t->timeout.tv_nsec = (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (t->ready_fd >= 0 && fcntl(t->ready_fd, F_GETFD) < 0)
        misuse("--ready-fd: %s", strerror(errno));
}

/* The shared secret: the file's content, less the newline echo writes. */
static int read_secret(struct tap *t)
{
    char buf[MP_MAX_SECRET + 1]; /* one more: to see a secret too long */
    ssize_t n = 0;
    int fd;

    if (!t->secret_file)
        return 0;
    fd = open(t->secret_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || (n = read(fd, buf, sizeof buf)) < 0 || n > MP_MAX_SECRET) {
        warn("cannot read the secret file %s: %s", t->secret_file,
             n > MP_MAX_SECRET ? "over 1 KiB" : strerror(errno));
        n = -1;
    }
    if (fd >= 0)
        (void)close(fd); /* read-only: nothing to lose */
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0)
        memcpy(t->secret, buf, (size_t)n);
    t->secret_len = n > 0 ? (size_t)n : 0;
    return n < 0 ? -1 : 0;
}

/* Opens the cache, sparse at the image's size: a stale one (a killed memtap's) is
 * emptied first. */
static int open_cache(struct tap *t)
{
    t->cache_fd = open(t->cache_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (t->cache_fd < 0 || ftruncate(t->cache_fd, (off_t)t->size) < 0) {
        warn("cannot create the cache %s: %s", t->cache_path, strerror(errno));
        return -1;
    }
    t->present = calloc(t->pages / 8 + 1, 1);
    t->reply = malloc(READ_PAGES / 8 + MP_MAX_READ);
    if (!t->present || !t->reply) {
        warn("out of memory for the cache of %" PRIu64 " pages", t->pages);
        return -1;
    }
    return 0;
}

/* Connects, opens the cache at the image's size and learns its free pages. Returns
 * -1 once it has said why not. */
static int start_up(struct tap *t)
{
    char why[256];

    if (connect_server(t, why, sizeof why) < 0) {
        warn("memory server %s, image %s: %s", t->server, t->image, why);
        return -1;
    }
    if (open_cache(t) < 0)
        return -1;
    if (learn_free_pages(t) < 0) {
        warn("memory server %s, image %s: FREEMAP: %s", t->server, t->image, describe(errno));
        return -1;
    }
    return 0;
}

/* Mounts and serves until unmounted or signalled. Returns the exit status. */
static int serve(struct tap *t, char *argv0)
{
    char *fuse_argv[] = {argv0, "-o", "fsname=memtap,subtype=memtap", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fuse_argv);
    int res = EXIT_STARTUP;

    /* Not fuse_main: this way a failed mount is told apart (exit 111). Foreground,
     * single-threaded; no allow_other, default_permissions or ro (which would refuse
     * QEMU's O_RDWR open). */
    t->fuse = fuse_new(&args, &tap_ops, sizeof tap_ops, t);
    fuse_opt_free_args(&args); /* fuse_new copied what it kept */
    if (!t->fuse)
        return EXIT_STARTUP;
    /* SIGTERM, SIGINT, SIGHUP end the loop; SIGPIPE is ignored. */
    if (fuse_set_signal_handlers(fuse_get_session(t->fuse)) < 0)
        warn("cannot set the signal handlers");
    else if (fuse_mount(t->fuse, t->mountpoint) < 0)
        warn("cannot mount on %s", t->mountpoint);
    else /* > 0: the signal that stopped the loop, a normal end */
        res = fuse_loop(t->fuse) < 0 ? EXIT_FAILURE : 0;
    if (res != EXIT_STARTUP)
        fuse_unmount(t->fuse);
    fuse_remove_signal_handlers(fuse_get_session(t->fuse));
    fuse_destroy(t->fuse);
    t->fuse = NULL;
    return res;
}

int main(int argc, char **argv)
{
    struct tap t = {.prefetch = 8, .ready_fd = -1, .sock = -1, .alive = 1, .cache_fd = -1};
    int res = EXIT_STARTUP;

    fuse_set_log_func(fuse_logger);
    /* Those fuse_set_signal_handlers stops the loop on (it ignores SIGPIPE). Valid
     * signal numbers: these cannot fail. */
    (void)sigemptyset(&t.stop_signals);
    (void)sigaddset(&t.stop_signals, SIGTERM);
    (void)sigaddset(&t.stop_signals, SIGINT);
    (void)sigaddset(&t.stop_signals, SIGHUP);
    parse_args(&t, argc, argv);
    if (read_secret(&t) == 0 && start_up(&t) == 0)
        res = serve(&t, argv[0]);
    disconnect(&t);
    if (t.cache_fd >= 0 && (close(t.cache_fd) < 0 || unlink(t.cache_path) < 0))
        warn("cannot remove the cache %s: %s", t.cache_path, strerror(errno));
    free(t.present);
    free(t.reply);
    if (t.ready_fd >= 0)
        (void)close(t.ready_fd); /* unread: our exit tells the reader we failed */
    return res;
}

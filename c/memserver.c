/* memserver.c: serves frozen guest memory images to memtap clients (c/memproto.h).
 *
 * On a parent VM's host the images are plain files in one folder (on tmpfs); memtap
 * on a clone's host asks for the page ranges its clone faults on (DESIGN §2 step 4).
 *
 * One epoll loop serves every client on non-blocking sockets: hundreds of clones
 * mostly sit idle, so a thread each would only cost stacks. Each client has its own
 * input buffer (one request at most, MP_HEADER + MP_MAX_PAYLOAD bytes) and output
 * queue, and its requests are not read while too much output waits for it, so a slow
 * reader holds up nobody but itself.
 *
 * Images are mapped read-only and shared: the page cache keeps one copy however many
 * clients read, and a mapping outlives the file's unlinking.
 */
#define _GNU_SOURCE /* accept4, mempcpy */
#include "memproto.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXIT_USAGE 100              /* s6: wrong usage */
#define EXIT_SYSTEM 111             /* s6: a system call failed at start-up */
#define OUTPUT_HIGH (256 * 1024)    /* read no more requests while this much output waits */
#define OUTPUT_KEEP (64 * 1024)     /* an idle client keeps an output buffer up to this */
#define MAX_EVENTS 64
#define FDS_SPARE 16 /* fds not for clients: stdio, listener, epoll, signals, images */
#define PEER_LEN 64
#define NAME_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"

static const unsigned char zero_page[MP_PAGE];

struct image {
    char name[MP_MAX_NAME + 1];
    const unsigned char *data; /* size bytes, or NULL before OPEN */
    size_t size;
    const unsigned char *free; /* the free-page map, free_size bytes, or NULL */
    size_t free_size;
};

struct client {
    struct client *next, *prev;
    int fd, greeted;
    const char *refusal; /* why the server closes it once its output is sent */
    uint32_t events;     /* what epoll watches on fd */
    char peer[PEER_LEN];
    struct image image;
    unsigned char in[MP_HEADER + MP_MAX_PAYLOAD];
    size_t in_len;
    unsigned char *out;
    size_t out_head, out_len, out_cap;
    uint64_t requests, pages_sent, bytes_sent;
};

struct server {
    int epoll_fd, listen_fd, signal_fd, dir_fd; /* listen_fd's and signal_fd's addresses
                                                   tag their epoll events */
    unsigned char secret[MP_MAX_SECRET];
    size_t secret_len;
    int check_secret;
    unsigned long max_clients, nclients;
    struct client *clients;
    uint64_t requests, reads, freemaps, pages_sent, pages_zero, pages_free, bytes_sent, errors;
};

struct options {
    const char *dir, *secret_file;
    char host[256], port[8];
    int ready_fd;
    unsigned long max_clients;
};

__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs("memserver: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void close_fd(int fd)
{
    if (fd >= 0 && close(fd) < 0)
        say("close: %s", strerror(errno));
}

/* Images ---------------------------------------------------------------------------- */

static int valid_name(const unsigned char *name, size_t len)
{
    if (len == 0 || len > MP_MAX_NAME || name[0] == '.')
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!memchr(NAME_CHARS, name[i], sizeof NAME_CHARS - 1))
            return 0;
    return 1;
}

/* Maps the regular file dir/name; returns an mp_status. O_NONBLOCK: opening a FIFO
 * must not hang the whole server. */
static int map_file(int dir, const char *name, const unsigned char **data, size_t *size)
{
    int fd = openat(dir, name, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY), status = MP_OK;
    void *map = MAP_FAILED;
    struct stat st;

    if (fd < 0)
        return errno == ENOENT || errno == ENAMETOOLONG ? MP_ENOENT : MP_EIO;
    if (fstat(fd, &st) < 0)
        status = MP_EIO;
    else if (!S_ISREG(st.st_mode) || st.st_size <= 0)
        status = MP_EINVAL;
    else if ((map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0)) == MAP_FAILED)
        status = MP_EIO;
    close_fd(fd); /* a mapping keeps its file */
    if (status == MP_OK) {
        *data = map;
        *size = (size_t)st.st_size;
    }
    return status;
}

static void unmap_image(struct image *img)
{
    if (img->data && munmap((void *)img->data, img->size) < 0)
        say("munmap: %s", strerror(errno));
    if (img->free && munmap((void *)img->free, img->free_size) < 0)
        say("munmap: %s", strerror(errno));
    img->data = img->free = NULL;
}

/* Maps img->name and its free-page map NAME.free, if any; returns an mp_status. */
static int map_image(int dir, struct image *img)
{
    char free_name[MP_MAX_NAME + sizeof ".free"];
    int status = map_file(dir, img->name, &img->data, &img->size);
    size_t pages = img->size / MP_PAGE;

    if (status != MP_OK)
        return status;
    if (img->size % MP_PAGE || pages > UINT32_MAX) { /* READ replies count pages in a u32 */
        unmap_image(img);
        return MP_EINVAL;
    }
    snprintf(free_name, sizeof free_name, "%s.free", img->name);
    status = map_file(dir, free_name, &img->free, &img->free_size);
    if (status == MP_ENOENT)
        return MP_OK;
    if (status == MP_OK && img->free_size != (pages + 7) / 8)
        status = MP_EINVAL;
    if (status != MP_OK)
        unmap_image(img);
    return status;
}

static int page_is_free(const struct image *img, uint64_t page)
{
    return img->free && (img->free[page / 8] >> (page % 8) & 1);
}

/* The output queue ------------------------------------------------------------------ */

static size_t pending(const struct client *c)
{
    return c->out_len - c->out_head;
}

/* Room for n more bytes at the end of c's output, or NULL. */
static unsigned char *reserve(struct client *c, size_t n)
{
    if (c->out_head) {
        memmove(c->out, c->out + c->out_head, pending(c));
        c->out_len -= c->out_head;
        c->out_head = 0;
    }
    if (c->out_len + n > c->out_cap) {
        unsigned char *grown = realloc(c->out, c->out_len + n);
        if (!grown) {
            say("%s: out of memory", c->peer);
            return NULL;
        }
        c->out = grown;
        c->out_cap = c->out_len + n;
    }
    return c->out + c->out_len;
}

/* Queues a reply and room for its payload of length bytes. Returns where the payload
 * goes, or NULL if there is no memory for it (then c is to be dropped). */
static unsigned char *queue_reply(struct server *s, struct client *c, uint16_t op,
                                  uint16_t status, uint32_t length, uint32_t pages, uint64_t value)
{
    struct mp_reply r = {htole32(MP_MAGIC), htole16(op),    htole16(status),
                         htole32(length),   htole32(pages), htole64(value)};
    unsigned char *at = reserve(c, MP_HEADER + length);

    if (!at)
        return NULL;
    memcpy(at, &r, sizeof r);
    c->out_len += MP_HEADER + length;
    s->errors += status != MP_OK;
    return at + MP_HEADER;
}

/* Queues a reply without payload. Returns 0, or -1 if c is to be dropped. */
static int reply(struct server *s, struct client *c, uint16_t op, uint16_t status,
                 uint32_t pages, uint64_t value)
{
    return queue_reply(s, c, op, status, 0, pages, value) ? 0 : -1;
}

/* Sends what it can of c's output. Returns -1 if the connection failed. */
static int flush_output(struct server *s, struct client *c)
{
    while (pending(c)) {
        ssize_t n = send(c->fd, c->out + c->out_head, pending(c), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        c->out_head += (size_t)n;
        c->bytes_sent += (uint64_t)n;
        s->bytes_sent += (uint64_t)n;
    }
    c->out_head = c->out_len = 0;
    if (c->out_cap > OUTPUT_KEEP) { /* a READ's megabyte, not to be held by idle clients */
        free(c->out);
        c->out = NULL;
        c->out_cap = 0;
    }
    return 0;
}

/* Requests -------------------------------------------------------------------------- */

static int same_secret(const struct server *s, const unsigned char *p, size_t len)
{
    unsigned char diff = len != s->secret_len;

    /* Time independent of where the first difference lies. */
    for (size_t i = 0; i < len && i < s->secret_len; i++)
        diff |= p[i] ^ s->secret[i];
    return !diff;
}

/* status, for a refusal after which the server closes c. */
static uint16_t refuse(struct client *c, const char *why, uint16_t status)
{
    c->refusal = why;
    return status;
}

static int do_hello(struct server *s, struct client *c, const struct mp_request *r,
                    const unsigned char *secret, size_t len)
{
    uint16_t status = MP_OK;

    if (c->greeted)
        status = MP_ESTATE;
    else if (r->offset != MP_VERSION)
        status = refuse(c, "another protocol version", MP_EVERSION);
    else if (s->check_secret && !same_secret(s, secret, len))
        status = refuse(c, "wrong secret", MP_EACCES);
    else
        c->greeted = 1;
    return reply(s, c, MP_OP_HELLO, status, 0, MP_VERSION);
}

static int do_open(struct server *s, struct client *c, const unsigned char *name, size_t len)
{
    int status;

    if (c->image.data)
        return reply(s, c, MP_OP_OPEN, MP_ESTATE, 0, 0);
    if (!valid_name(name, len))
        return reply(s, c, MP_OP_OPEN, MP_EINVAL, 0, 0);
    memcpy(c->image.name, name, len);
    c->image.name[len] = '\0';
    status = map_image(s->dir_fd, &c->image);
    if (status != MP_OK)
        return reply(s, c, MP_OP_OPEN, (uint16_t)status, 0, 0);
    return reply(s, c, MP_OP_OPEN, MP_OK, (uint32_t)(c->image.size / MP_PAGE), c->image.size);
}

/* A READ reply: the bitmap, then the pages that are neither free nor all zero. A page
 * both free and zero counts as free (the cheaper test comes first). */
static int do_read(struct server *s, struct client *c, const struct mp_request *r)
{
    const struct image *img = &c->image;
    uint32_t pages = r->length / MP_PAGE, bitmap_len = (pages + 7) / 8, sent = 0;
    unsigned char bitmap[MP_MAX_READ / MP_PAGE / 8] = {0}, *out;
    const unsigned char *first;

    if (!img->data)
        return reply(s, c, MP_OP_READ, MP_ESTATE, 0, 0);
    if (!r->length || r->length % MP_PAGE || r->length > MP_MAX_READ || r->offset % MP_PAGE)
        return reply(s, c, MP_OP_READ, MP_EINVAL, 0, 0);
    if (r->offset > img->size || r->length > img->size - r->offset)
        return reply(s, c, MP_OP_READ, MP_ERANGE, 0, 0);
    first = img->data + r->offset;
    for (uint32_t i = 0; i < pages; i++) {
        if (page_is_free(img, r->offset / MP_PAGE + i))
            s->pages_free++;
        else if (memcmp(first + (size_t)i * MP_PAGE, zero_page, MP_PAGE) == 0)
            s->pages_zero++;
        else {
            bitmap[i / 8] |= (unsigned char)(1u << (i % 8));
            sent++;
        }
    }
    out = queue_reply(s, c, MP_OP_READ, MP_OK, bitmap_len + sent * MP_PAGE, pages, r->offset);
    if (!out)
        return -1;
    out = mempcpy(out, bitmap, bitmap_len);
    for (uint32_t i = 0; i < pages; i++)
        if (bitmap[i / 8] >> (i % 8) & 1)
            out = mempcpy(out, first + (size_t)i * MP_PAGE, MP_PAGE);
    s->reads++;
    s->pages_sent += sent;
    c->pages_sent += sent;
    return 0;
}

/* A FREEMAP reply: the free-page map as NAME.free holds it, bits past the last page
 * cleared; all zero without NAME.free. Queued whole, as a READ's megabyte is: one bit
 * a page, 512 KiB for a 16 GiB image. */
static int do_freemap(struct server *s, struct client *c)
{
    const struct image *img = &c->image;
    uint32_t pages = (uint32_t)(img->size / MP_PAGE), len = (pages + 7) / 8;
    unsigned char *out;

    if (!img->data)
        return reply(s, c, MP_OP_FREEMAP, MP_ESTATE, 0, 0);
    out = queue_reply(s, c, MP_OP_FREEMAP, MP_OK, len, pages, 0);
    if (!out)
        return -1;
    if (img->free)
        memcpy(out, img->free, len); /* map_image checked free_size == len */
    else
        memset(out, 0, len);
    if (pages % 8)
        out[len - 1] &= (unsigned char)((1u << (pages % 8)) - 1);
    s->freemaps++;
    return 0;
}

/* The counters as one JSON object (names need no escaping: valid_name), or NULL. */
static char *stats_json(const struct server *s, size_t *len)
{
    char *text = NULL;
    FILE *f = open_memstream(&text, len);
    int failed;

    if (!f)
        return NULL;
    fprintf(f,
            "{\"clients\": %lu, \"requests\": %" PRIu64 ", \"reads\": %" PRIu64
            ", \"freemaps\": %" PRIu64 ", \"pages_sent\": %" PRIu64 ", \"pages_zero\": %" PRIu64
            ", \"pages_free\": %" PRIu64 ", \"bytes_sent\": %" PRIu64 ", \"errors\": %" PRIu64
            ", \"per_client\": [",
            s->nclients, s->requests, s->reads, s->freemaps, s->pages_sent, s->pages_zero,
            s->pages_free, s->bytes_sent, s->errors);
    for (const struct client *c = s->clients; c; c = c->next) {
        const char *quote = c->image.data ? "\"" : "";
        fprintf(f,
                "%s{\"peer\": \"%s\", \"image\": %s%s%s, \"requests\": %" PRIu64
                ", \"pages_sent\": %" PRIu64 ", \"bytes_sent\": %" PRIu64 "}",
                c == s->clients ? "" : ", ", c->peer, quote,
                c->image.data ? c->image.name : "null", quote, c->requests, c->pages_sent,
                c->bytes_sent);
    }
    fputs("]}", f);
    failed = ferror(f);
    if (fclose(f) != 0 || failed) {
        free(text);
        return NULL;
    }
    return text;
}

static int do_stats(struct server *s, struct client *c)
{
    size_t len;
    char *json = stats_json(s, &len);
    unsigned char *out;

    if (!json)
        return reply(s, c, MP_OP_STATS, MP_EIO, 0, 0);
    out = queue_reply(s, c, MP_OP_STATS, MP_OK, (uint32_t)len, 0, 0);
    if (out)
        memcpy(out, json, len);
    free(json);
    return out ? 0 : -1;
}

/* Queues the answer to one request. Returns -1 if c must be dropped at once. */
static int answer(struct server *s, struct client *c, const struct mp_request *r,
                  const unsigned char *payload, size_t len)
{
    s->requests++;
    c->requests++;
    if (!c->greeted && r->op != MP_OP_HELLO)
        return reply(s, c, r->op, refuse(c, "request before HELLO", MP_EACCES), 0, 0);
    switch (r->op) {
    case MP_OP_HELLO:
        return do_hello(s, c, r, payload, len);
    case MP_OP_OPEN:
        return do_open(s, c, payload, len);
    case MP_OP_READ:
        return do_read(s, c, r);
    case MP_OP_STATS:
        return len ? reply(s, c, r->op, MP_EINVAL, 0, 0) : do_stats(s, c);
    case MP_OP_FREEMAP:
        return len ? reply(s, c, r->op, MP_EINVAL, 0, 0) : do_freemap(s, c);
    default:
        return reply(s, c, r->op, MP_EINVAL, 0, 0);
    }
}

/* Input ----------------------------------------------------------------------------- */

static struct mp_request decode_request(const unsigned char *in)
{
    struct mp_request r;

    memcpy(&r, in, sizeof r);
    r.magic = le32toh(r.magic);
    r.op = le16toh(r.op);
    r.length = le32toh(r.length);
    r.offset = le64toh(r.offset);
    return r;
}

/* Every op but READ carries length bytes of payload; READ's length is its range. */
static size_t payload_len(const struct mp_request *r)
{
    return r->op == MP_OP_READ ? 0 : r->length;
}

/* Whether c has a request to act on (a complete one, or a bad header) and room for
 * the answer. */
static int can_answer(const struct client *c)
{
    struct mp_request r;
    size_t len;

    if (c->refusal || pending(c) >= OUTPUT_HIGH || c->in_len < MP_HEADER)
        return 0;
    r = decode_request(c->in);
    len = payload_len(&r);
    return r.magic != MP_MAGIC || len > MP_MAX_PAYLOAD || c->in_len >= MP_HEADER + len;
}

/* Answers the requests in c's input while its output has room. -1: drop c at once. */
static int handle_input(struct server *s, struct client *c)
{
    while (can_answer(c)) {
        struct mp_request r = decode_request(c->in);
        size_t len = payload_len(&r);

        if (r.magic != MP_MAGIC) { /* not our protocol: no reply */
            refuse(c, "bad magic", MP_EINVAL);
            s->errors++;
            return 0;
        }
        if (len > MP_MAX_PAYLOAD)
            return reply(s, c, r.op, refuse(c, "request too long", MP_EINVAL), 0, 0);
        if (answer(s, c, &r, c->in + MP_HEADER, len) < 0)
            return -1;
        c->in_len -= MP_HEADER + len;
        memmove(c->in, c->in + MP_HEADER + len, c->in_len);
    }
    return 0;
}

static int wants_input(const struct client *c)
{
    return !c->refusal && pending(c) < OUTPUT_HIGH && c->in_len < sizeof c->in;
}

/* Reads what c sent. Returns -1 at its end of stream or on an error. */
static int read_input(struct client *c)
{
    ssize_t n = read(c->fd, c->in + c->in_len, sizeof c->in - c->in_len);

    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
    c->in_len += (size_t)n;
    return n == 0 ? -1 : 0;
}

/* Clients --------------------------------------------------------------------------- */

static int watch(struct server *s, struct client *c)
{
    uint32_t events = (wants_input(c) ? EPOLLIN : 0) | (pending(c) ? EPOLLOUT : 0);
    struct epoll_event ev = {.events = events, .data.ptr = c};

    if (events == c->events)
        return 0;
    if (epoll_ctl(s->epoll_fd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        say("%s: epoll_ctl: %s", c->peer, strerror(errno));
        return -1;
    }
    c->events = events;
    return 0;
}

/* Answers and sends until c waits for more input or for room. -1: drop c. */
static int pump(struct server *s, struct client *c)
{
    do {
        if (handle_input(s, c) < 0 || flush_output(s, c) < 0)
            return -1;
    } while (can_answer(c)); /* sending made room for more answers */
    if (c->refusal && !pending(c))
        return -1;
    return watch(s, c);
}

static int serve_client(struct server *s, struct client *c, uint32_t events)
{
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && wants_input(c) && read_input(c) < 0)
        return -1;
    return pump(s, c);
}

static void add_client(struct server *s, int fd, const char *peer)
{
    struct client *c = calloc(1, sizeof *c);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};

    if (!c || epoll_ctl(s->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        say("%s refused: %s", peer, strerror(errno));
        free(c);
        close_fd(fd);
        return;
    }
    c->fd = fd;
    c->events = EPOLLIN;
    snprintf(c->peer, sizeof c->peer, "%s", peer);
    c->next = s->clients;
    if (c->next)
        c->next->prev = c;
    s->clients = c;
    s->nclients++;
    say("%s connected", peer);
}

static void drop_client(struct server *s, struct client *c)
{
    if (c->refusal)
        say("%s closed: %s", c->peer, c->refusal);
    else
        say("%s disconnected", c->peer);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->clients = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nclients--;
    close_fd(c->fd); /* also takes it out of the epoll set */
    unmap_image(&c->image);
    free(c->out);
    free(c);
}

static void accept_clients(struct server *s)
{
    for (;;) {
        struct sockaddr_in addr;
        socklen_t len = sizeof addr;
        char ip[INET_ADDRSTRLEN], peer[PEER_LEN];
        int fd =
            accept4(s->listen_fd, (struct sockaddr *)&addr, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);

        if (fd < 0 && (errno == EINTR || errno == ECONNABORTED))
            continue;
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                say("accept: %s", strerror(errno));
            return;
        }
        if (!inet_ntop(AF_INET, &addr.sin_addr, ip, sizeof ip))
            snprintf(ip, sizeof ip, "?");
        snprintf(peer, sizeof peer, "%s:%u", ip, (unsigned)ntohs(addr.sin_port));
        if (s->nclients >= s->max_clients) {
            say("%s refused: too many clients", peer);
            close_fd(fd);
        } else {
            add_client(s, fd, peer);
        }
    }
}

/* Returns 1 once the server is to stop. */
static int on_signal(struct server *s)
{
    struct signalfd_siginfo si;
    ssize_t n = read(s->signal_fd, &si, sizeof si);
    size_t len;
    char *json;

    if (n != (ssize_t)sizeof si)
        return 0;
    if (si.ssi_signo != SIGUSR1)
        return 1;
    json = stats_json(s, &len);
    if (json)
        fprintf(stderr, "%s\n", json);
    else
        say("stats: out of memory");
    free(json);
    return 0;
}

static int run(struct server *s)
{
    struct epoll_event ev[MAX_EVENTS];

    for (;;) {
        int n = epoll_wait(s->epoll_fd, ev, MAX_EVENTS, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            say("epoll_wait: %s", strerror(errno));
            return EXIT_SYSTEM;
        }
        for (int i = 0; i < n; i++) {
            void *tag = ev[i].data.ptr;
            if (tag == &s->listen_fd) {
                accept_clients(s);
            } else if (tag == &s->signal_fd) {
                if (on_signal(s))
                    return 0;
            } else if (serve_client(s, tag, ev[i].events) < 0) {
                drop_client(s, tag); /* only at its own event: no stale pointer follows */
            }
        }
    }
}

/* Start-up -------------------------------------------------------------------------- */

static void usage(FILE *to)
{
    fputs("usage: memserver --dir DIR --listen ADDR:PORT [--secret-file FILE] [--ready-fd N]\n"
          "                 [--max-clients N] [--help]\n"
          "Serves the memory images in DIR to memtap clients over TCP (PORT 0: any free\n"
          "port). --ready-fd N: write the port and a newline to fd N once listening.\n"
          "--secret-file: clients must present its content (without a trailing newline).\n",
          to);
}

static int misuse(const char *what, const char *arg)
{
    fprintf(stderr, "memserver: %s%s%s\n", what, arg ? ": " : "", arg ? arg : "");
    usage(stderr);
    return EXIT_USAGE;
}

static int parse_number(const char *s, unsigned long low, unsigned long high, unsigned long *out)
{
    char *end;

    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    *out = strtoul(s, &end, 10);
    return *end || errno || *out < low || *out > high ? -1 : 0;
}

/* Splits ADDR:PORT at its last colon. */
static int parse_listen(const char *arg, struct options *o)
{
    const char *colon = strrchr(arg, ':');
    unsigned long port;

    if (!colon || colon == arg || (size_t)(colon - arg) >= sizeof o->host ||
        parse_number(colon + 1, 0, 65535, &port) < 0)
        return -1;
    memcpy(o->host, arg, (size_t)(colon - arg));
    o->host[colon - arg] = '\0';
    snprintf(o->port, sizeof o->port, "%lu", port);
    return 0;
}

/* Returns -1 to go on, or the exit status. */
static int parse_args(int argc, char **argv, struct options *o)
{
    static const struct option longs[] = {
        {"dir", required_argument, NULL, 'd'},         {"listen", required_argument, NULL, 'l'},
        {"secret-file", required_argument, NULL, 's'}, {"ready-fd", required_argument, NULL, 'r'},
        {"max-clients", required_argument, NULL, 'm'}, {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    unsigned long n = 0;
    int opt, bad = 0;

    *o = (struct options){.ready_fd = -1, .max_clients = 1024};
    opterr = 0; /* misuse() says it */
    while ((opt = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (opt) {
        case 'h':
            usage(stdout);
            return fflush(stdout) == 0 ? 0 : EXIT_SYSTEM;
        case 'd':
            o->dir = optarg;
            break;
        case 'l':
            bad = parse_listen(optarg, o) < 0;
            break;
        case 's':
            o->secret_file = optarg;
            break;
        case 'r':
            bad = parse_number(optarg, 0, INT32_MAX, &n) < 0;
            o->ready_fd = (int)n;
            break;
        case 'm':
            bad = parse_number(optarg, 1, 1u << 20, &n) < 0;
            o->max_clients = n;
            break;
        default:
            return misuse("unknown option or missing value", argv[optind - 1]);
        }
        if (bad)
            return misuse("bad value", optarg);
    }
    if (optind < argc)
        return misuse("unexpected argument", argv[optind]);
    if (!o->dir || !*o->dir || !o->host[0])
        return misuse(o->host[0] ? "--dir is required" : "--listen is required", NULL);
    return -1;
}

static int fail(const char *what, const char *arg)
{
    say("%s%s%s: %s", what, arg ? " " : "", arg ? arg : "", strerror(errno));
    return EXIT_SYSTEM;
}

/* The secret file's content, a trailing newline stripped. */
static int read_secret(struct server *s, const char *path)
{
    unsigned char buf[MP_MAX_SECRET + 2]; /* room to notice a secret too long */
    FILE *f = fopen(path, "re");
    size_t len;
    int failed;

    if (!f)
        return fail("cannot open", path);
    len = fread(buf, 1, sizeof buf, f);
    failed = ferror(f);
    if (fclose(f) != 0 || failed)
        return fail("cannot read", path);
    if (len && buf[len - 1] == '\n')
        len--;
    if (len > MP_MAX_SECRET) {
        say("%s: the secret is longer than %u bytes", path, MP_MAX_SECRET);
        return EXIT_USAGE;
    }
    memcpy(s->secret, buf, len);
    s->secret_len = len;
    s->check_secret = 1;
    return 0;
}

/* Binds a listening socket to host:port; returns the port it got, or -1. */
static int listen_on(struct server *s, const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *found;
    struct sockaddr_in bound;
    socklen_t len = sizeof bound;
    int one = 1, err, rc = getaddrinfo(host, port, &hints, &found);

    if (rc != 0) {
        say("cannot resolve %s: %s", host, gai_strerror(rc));
        return -1;
    }
    s->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    rc = s->listen_fd < 0 ||
         setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
         bind(s->listen_fd, found->ai_addr, found->ai_addrlen) < 0 ||
         listen(s->listen_fd, SOMAXCONN) < 0 ||
         getsockname(s->listen_fd, (struct sockaddr *)&bound, &len) < 0;
    err = errno;
    freeaddrinfo(found);
    if (rc) {
        say("cannot listen on %s:%s: %s", host, port, strerror(err));
        return -1;
    }
    return ntohs(bound.sin_port);
}

static int watch_fd(struct server *s, int *fd)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = fd};

    return epoll_ctl(s->epoll_fd, EPOLL_CTL_ADD, *fd, &ev);
}

static int announce(int fd, int port)
{
    char line[16];
    int len = snprintf(line, sizeof line, "%d\n", port);

    if (write(fd, line, (size_t)len) != len) /* a pipe takes 16 bytes at once */
        return fail("cannot write to --ready-fd", NULL);
    return close(fd) < 0 ? fail("cannot close --ready-fd", NULL) : 0;
}

/* One fd per client: allow as many as the hard limit does, and never more clients, or
 * accept() would fail with EMFILE at every turn of the loop. */
static int raise_fd_limit(struct server *s)
{
    struct rlimit lim;

    if (getrlimit(RLIMIT_NOFILE, &lim) < 0)
        return -1;
    lim.rlim_cur = lim.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &lim) < 0)
        return -1;
    if (s->max_clients + FDS_SPARE > lim.rlim_cur) {
        s->max_clients = lim.rlim_cur > FDS_SPARE ? lim.rlim_cur - FDS_SPARE : 1;
        say("at most %lu clients: the open files limit is %lu", s->max_clients,
            (unsigned long)lim.rlim_cur);
    }
    return 0;
}

/* Returns 0, or the exit status. */
static int start(struct server *s, const struct options *o)
{
    sigset_t mask;
    int port, rc;

    s->max_clients = o->max_clients;
    /* Else a closed --ready-fd could be taken by a socket, which would get the port. */
    if (o->ready_fd >= 0 && fcntl(o->ready_fd, F_GETFD) < 0)
        return fail("bad --ready-fd", NULL);
    if (raise_fd_limit(s) < 0)
        return fail("cannot raise the open files limit", NULL);
    s->dir_fd = open(o->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (s->dir_fd < 0)
        return fail("cannot open", o->dir);
    if (o->secret_file && (rc = read_secret(s, o->secret_file)) != 0)
        return rc;
    /* Signals arrive through signal_fd; SIGPIPE is ignored (MSG_NOSIGNAL covers sockets,
     * this covers --ready-fd and stderr). */
    if (sigemptyset(&mask) < 0 || sigaddset(&mask, SIGTERM) < 0 || sigaddset(&mask, SIGINT) < 0 ||
        sigaddset(&mask, SIGUSR1) < 0 || sigprocmask(SIG_BLOCK, &mask, NULL) < 0 ||
        signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        return fail("cannot set up signals", NULL);
    s->signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (s->signal_fd < 0)
        return fail("signalfd", NULL);
    port = listen_on(s, o->host, o->port);
    if (port < 0)
        return EXIT_SYSTEM;
    s->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (s->epoll_fd < 0 || watch_fd(s, &s->listen_fd) < 0 || watch_fd(s, &s->signal_fd) < 0)
        return fail("epoll", NULL);
    say("serving %s on %s:%d", o->dir, o->host, port);
    return o->ready_fd >= 0 ? announce(o->ready_fd, port) : 0;
}

static void stop(struct server *s)
{
    while (s->clients) {
        s->clients->refusal = "the server stops";
        drop_client(s, s->clients);
    }
    close_fd(s->epoll_fd);
    close_fd(s->listen_fd);
    close_fd(s->signal_fd);
    close_fd(s->dir_fd);
}

int main(int argc, char **argv)
{
    struct options o;
    struct server s = {.epoll_fd = -1, .listen_fd = -1, .signal_fd = -1, .dir_fd = -1};
    int rc = parse_args(argc, argv, &o);

    if (rc >= 0)
        return rc;
    rc = start(&s, &o);
    if (rc == 0)
        rc = run(&s);
    stop(&s);
    return rc;
}

/* sf-xs.c: XenStore's wire protocol over the agent's socket or the port (sf-xs.h). */
#define _GNU_SOURCE
#include "sf-xs.h"

#include "snowflock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define HEADER_SIZE 16

/* Xen's error strings (xs_wire.h's xsd_errors): the only ones a server sends. */
static const struct {
    const char *name;
    int err;
} ERRORS[] = {
    {"EINVAL", EINVAL}, {"EACCES", EACCES}, {"EEXIST", EEXIST},       {"EISDIR", EISDIR},
    {"ENOENT", ENOENT}, {"ENOMEM", ENOMEM}, {"ENOSPC", ENOSPC},       {"EIO", EIO},
    {"ENOTEMPTY", ENOTEMPTY}, {"ENOSYS", ENOSYS}, {"EROFS", EROFS},   {"EBUSY", EBUSY},
    {"EAGAIN", EAGAIN}, {"EISCONN", EISCONN}, {"E2BIG", E2BIG},       {"EPERM", EPERM},
};

int sfx_errno(const char *name)
{
    for (size_t k = 0; k < sizeof ERRORS / sizeof ERRORS[0]; k++)
        if (strcmp(ERRORS[k].name, name) == 0)
            return ERRORS[k].err;
    return EIO;
}

static int fail(int err)
{
    errno = err;
    return -SF_ESYSTEM;
}

/* Connects to the Unix socket at path; 0, or -1 with errno set. */
static int connect_unix(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int fd;

    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    while (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int err = errno;
        if (err == EINTR)
            continue;
        (void)close(fd); /* the connect's errno is the one to report */
        errno = err;
        return -1;
    }
    return fd;
}

/* Missing, refused or busy (another opener holds the port): no way to sfld. */
static int unreachable(int err)
{
    errno = err;
    if (err == ENOENT || err == ECONNREFUSED || err == EBUSY || err == ENXIO || err == EACCES ||
        err == ENOTDIR)
        return -SF_EUNREACHABLE;
    return -SF_ESYSTEM;
}

/* A socket is connected to (the agent, or a server in tests), anything else opened
 * as the port, a character device. Returns the fd or -1 (errno set). */
static int open_path(const char *path)
{
    struct stat st;

    if (stat(path, &st) < 0)
        return -1;
    if (S_ISSOCK(st.st_mode))
        return connect_unix(path);
    return open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
}

int sfx_open(struct sfx *x)
{
    const char *port = getenv("SF_XENBUS"), *agent = getenv("XENSTORED_PATH");

    memset(x, 0, sizeof *x);
    x->fd = -1;
    x->next_id = 1;
    /* As sflib.guest.bus: $SF_XENBUS bypasses the agent; else the agent if its
     * socket exists and answers (a dead agent's socket leaves the port free), else
     * the port. */
    agent = agent && *agent ? agent : SFX_AGENT_SOCKET;
    if (!(port && *port) && access(agent, F_OK) == 0) {
        x->where = agent;
        x->fd = open_path(agent);
        if (x->fd >= 0)
            return 0;
        if (errno != ECONNREFUSED && errno != ENOENT)
            return unreachable(errno);
    }
    x->where = port && *port ? port : SFX_PORT;
    x->direct = 1; /* no agent between: our watch stays unless we remove it */
    x->fd = open_path(x->where);
    if (x->fd >= 0)
        return 0;
    return unreachable(errno);
}

void sfx_close(struct sfx *x)
{
    char msg[sizeof x->path + sizeof x->token], ack[8];
    size_t n = strlen(x->path) + 1, t = strlen(x->token) + 1;

    if (x->fd >= 0 && x->direct && x->token[0]) {
        memcpy(msg, x->path, n);
        memcpy(msg + n, x->token, t);
        (void)sfx_request(x, SFX_UNWATCH, msg, n + t, ack, sizeof ack, NULL);
    }
    if (x->fd >= 0)
        (void)close(x->fd); /* nothing was written that a failed close could lose */
    x->fd = -1;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Reads exactly n bytes; -1 with errno set, ECONNRESET if the peer closed. */
static int read_all(int fd, char *p, size_t n)
{
    while (n) {
        ssize_t k = read(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -1;
        if (k == 0) {
            errno = ECONNRESET;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void put_u32(char *p, uint32_t v)
{
    for (int k = 0; k < 4; k++)
        p[k] = (char)(v >> (8 * k) & 0xff);
}

static uint32_t get_u32(const char *p)
{
    uint32_t v = 0;

    for (int k = 3; k >= 0; k--)
        v = v << 8 | (unsigned char)p[k];
    return v;
}

struct packet {
    uint32_t op, id, len;
    char payload[SFX_PAYLOAD_MAX + 1]; /* NUL-terminated for convenience */
};

static int recv_packet(struct sfx *x, struct packet *p)
{
    char head[HEADER_SIZE];

    if (read_all(x->fd, head, sizeof head) < 0)
        return -SF_ESYSTEM;
    p->op = get_u32(head);
    p->id = get_u32(head + 4);
    p->len = get_u32(head + 12);
    if (p->len > SFX_PAYLOAD_MAX)
        return fail(EPROTO);
    if (read_all(x->fd, p->payload, p->len) < 0)
        return -SF_ESYSTEM;
    p->payload[p->len] = '\0';
    return 0;
}

/* Counts an event of our watch: "path\0token\0". Others (none through the agent,
 * which routes events per client) are ignored. */
static void note_event(struct sfx *x, const struct packet *p)
{
    size_t path_len = strnlen(p->payload, p->len);

    if (path_len < p->len && strcmp(p->payload + path_len + 1, x->token) == 0)
        x->events++;
}

/* One write for the whole packet: the port's host end reads packets, not bytes. */
static int send_packet(struct sfx *x, uint32_t op, uint32_t id, const void *payload, size_t len)
{
    char buf[HEADER_SIZE + SFX_PAYLOAD_MAX];

    if (len > SFX_PAYLOAD_MAX)
        return fail(E2BIG);
    put_u32(buf, op);
    put_u32(buf + 4, id);
    put_u32(buf + 8, 0); /* no transaction */
    put_u32(buf + 12, (uint32_t)len);
    memcpy(buf + HEADER_SIZE, payload, len);
    return write_all(x->fd, buf, HEADER_SIZE + len) < 0 ? -SF_ESYSTEM : 0;
}

/* The payload of reply p to request op into out[cap]. */
static int take_reply(const struct packet *p, uint32_t op, char *out, size_t cap, size_t *out_len)
{
    if (p->op == SFX_ERROR)
        return fail(sfx_errno(p->payload));
    if (p->op != op)
        return fail(EPROTO);
    if (p->len >= cap)
        return fail(EMSGSIZE);
    memcpy(out, p->payload, p->len + 1);
    if (out_len)
        *out_len = p->len;
    return 0;
}

int sfx_request(struct sfx *x, uint32_t op, const void *payload, size_t len, char *out,
                size_t cap, size_t *out_len)
{
    uint32_t id = x->next_id++;
    struct packet p;
    int rc = send_packet(x, op, id, payload, len);

    while (rc == 0) {
        rc = recv_packet(x, &p);
        if (rc < 0)
            break;
        if (p.op == SFX_WATCH_EVENT)
            note_event(x, &p);
        else if (p.id == id) /* else a reply a killed earlier opener of the port left */
            return take_reply(&p, op, out, cap, out_len);
    }
    return rc;
}

int sfx_read(struct sfx *x, const char *path, char *out, size_t cap, size_t *out_len)
{
    int rc = sfx_request(x, SFX_READ, path, strlen(path) + 1, out, cap, out_len);

    if (rc < 0 && errno == ENOENT) {
        out[0] = '\0';
        *out_len = 0;
        return 0;
    }
    return rc;
}

int sfx_write(struct sfx *x, const char *path, const char *value, size_t len)
{
    char msg[SFX_PAYLOAD_MAX], ack[8];
    size_t n = strlen(path) + 1;

    if (n + len > sizeof msg)
        return fail(E2BIG);
    memcpy(msg, path, n);
    memcpy(msg + n, value, len);
    return sfx_request(x, SFX_WRITE, msg, n + len, ack, sizeof ack, NULL);
}

int sfx_list(struct sfx *x, const char *path, char *out, size_t cap, size_t *out_len)
{
    return sfx_request(x, SFX_DIRECTORY, path, strlen(path) + 1, out, cap, out_len);
}

int sfx_rm(struct sfx *x, const char *path)
{
    char ack[8];

    return sfx_request(x, SFX_RM, path, strlen(path) + 1, ack, sizeof ack, NULL);
}

int sfx_watch(struct sfx *x, const char *path, const char *token)
{
    char msg[SFX_PAYLOAD_MAX], ack[8];
    size_t n = strlen(path) + 1, t = strlen(token) + 1;

    if (t > sizeof x->token || n > sizeof x->path || n + t > sizeof msg)
        return fail(E2BIG);
    memcpy(x->token, token, t);
    memcpy(x->path, path, n);
    memcpy(msg, path, n);
    memcpy(msg + n, token, t);
    return sfx_request(x, SFX_WATCH, msg, n + t, ack, sizeof ack, NULL);
}

int sfx_wait_event(struct sfx *x)
{
    struct packet p;

    while (!x->events) {
        int rc = recv_packet(x, &p);
        if (rc < 0)
            return rc;
        if (p.op == SFX_WATCH_EVENT)
            note_event(x, &p);
        /* else: a stray reply (see sfx_request); nothing waits for it */
    }
    x->events--;
    return 0;
}

/* snowflock.c: the SnowFlock API for C, by running the guest tools (snowflock.h).
 *
 * Why not talk to sfld directly: the tools already speak the XenStore protocol and
 * run hooks.d in clones, and a process blocked on a tool is cloned with the VM like
 * any other, so every clone's copy of this library reads its own tool's answer.
 */
#define _GNU_SOURCE /* pipe2 */
#include "snowflock.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SMALL_OUTPUT 256         /* a ticket, an ID, a checkpoint */
#define LIST_OUTPUT (64 * 1024)  /* a line per clone: room for thousands */
#define EXEC_FAILED 127          /* the child's status when execvp failed, as in sh */

/* Running a tool ----------------------------------------------------------------- */

/* fd becomes target and stays open across exec (dup2 onto itself keeps O_CLOEXEC). */
static int move_fd(int fd, int target)
{
    return fd == target ? fcntl(fd, F_SETFD, 0) : dup2(fd, target);
}

/* In the child: stdout to the pipe, stdin from /dev/null, then the tool. Only
 * async-signal-safe calls here: the caller may have threads. */
static void exec_tool(const char *const argv[], int out)
{
    static const char msg[] = "snowflock: cannot run a SnowFlock tool: ";
    int null;

    if (move_fd(out, STDOUT_FILENO) < 0)
        _exit(EXEC_FAILED);
    null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || move_fd(null, STDIN_FILENO) < 0)
        _exit(EXEC_FAILED);
    execvp(argv[0], (char *const *)argv); /* execvp does not change them (POSIX says so) */
    if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0 ||
        write(STDERR_FILENO, argv[0], strlen(argv[0])) < 0 || write(STDERR_FILENO, "\n", 1) < 0) {
        /* nowhere left to complain to */
    }
    _exit(EXEC_FAILED);
}

/* Reads fd to its end into out[size] (NUL-terminated; size >= 1). Returns 0, or the
 * errno of a failed read, or EMSGSIZE if the output did not fit (it is drained
 * anyway, so the tool never blocks on a full pipe). */
static int read_all(int fd, char *out, size_t size)
{
    char scratch[512];
    size_t used = 0;
    int err = 0;

    for (;;) {
        int full = used + 1 >= size;
        ssize_t n = read(fd, full ? scratch : out + used, full ? sizeof scratch : size - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            err = n < 0 ? errno : err;
            break;
        }
        if (full)
            err = EMSGSIZE;
        else
            used += (size_t)n;
    }
    out[used] = '\0';
    return err;
}

static int wait_for(pid_t pid, int *status)
{
    while (waitpid(pid, status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return 0;
}

/* A failure that is not a system call's: errno says what kind. */
static int fail_with(int err)
{
    errno = err;
    return -SF_ESYSTEM;
}

/* Runs argv[0] from PATH with its stdout captured into out[size]. Returns the
 * tool's exit status (0-255), or -SF_ESYSTEM (errno EPROTO if the tool could not
 * be run or died of a signal). */
static int run_tool(const char *const argv[], char *out, size_t size)
{
    int fds[2], status = 0, err;
    pid_t pid;

    out[0] = '\0';
    /* Else every clone of this VM would write the buffered output again. */
    (void)fflush(NULL);
    if (pipe2(fds, O_CLOEXEC) < 0)
        return -SF_ESYSTEM;
    pid = fork();
    if (pid == 0)
        exec_tool(argv, fds[1]);
    err = pid < 0 ? errno : 0;
    if (close(fds[1]) < 0 && !err)
        err = errno;
    if (!err)
        err = read_all(fds[0], out, size);
    if (close(fds[0]) < 0 && !err)
        err = errno;
    if (pid > 0 && wait_for(pid, &status) < 0)
        return -SF_ESYSTEM;
    if (err)
        return fail_with(err);
    if (!WIFEXITED(status) || WEXITSTATUS(status) == EXEC_FAILED)
        return fail_with(EPROTO);
    return WEXITSTATUS(status);
}

/* The error a call returns for a tool's result rc (an exit status or -SF_ESYSTEM). */
static int tool_error(int rc)
{
    return rc < 0 ? rc : -rc;
}

/* Parsing the tools' output ------------------------------------------------------- */

static int protocol_error(void)
{
    return fail_with(EPROTO);
}

/* A decimal integer in [low, high] at s; returns the end, or NULL. */
static const char *parse_int(const char *s, long low, long high, int *out)
{
    char *end;
    long v;

    if ((*s < '0' || *s > '9') && *s != '-')
        return NULL;
    errno = 0;
    v = strtol(s, &end, 10);
    if (end == s || errno || v < low || v > high)
        return NULL;
    *out = (int)v;
    return end;
}

/* A word (up to a space, a newline or the end) at s into out[len]; returns the end,
 * or NULL if it is empty or does not fit. */
static const char *parse_word(const char *s, char *out, size_t len)
{
    size_t n = strcspn(s, " \n");

    if (n == 0 || n >= len)
        return NULL;
    memcpy(out, s, n);
    out[n] = '\0';
    return s + n;
}

/* Past the end of a line: its newline, or the end of the text. */
static const char *end_of_line(const char *s)
{
    return *s == '\n' ? s + 1 : *s == '\0' ? s : NULL;
}

/* Whether s is the end of a one-line output. */
static int at_end(const char *s)
{
    s = s ? end_of_line(s) : NULL;
    return s && *s == '\0';
}

/* The value of "key": in a flat JSON object, or NULL. */
static const char *json_value(const char *json, const char *key)
{
    size_t n = strlen(key);

    for (const char *s = strchr(json, '"'); s; s = strchr(s + 1, '"')) {
        if (strncmp(s + 1, key, n) == 0 && s[n + 1] == '"' && s[n + 2] == ':')
            return s + n + 3 + strspn(s + n + 3, " ");
    }
    return NULL;
}

/* A JSON string without escapes (IDs need none) into out[len]; 0 or -1. */
static int json_string(const char *json, const char *key, char *out, size_t len)
{
    const char *s = json_value(json, key);
    size_t n;

    if (!s || *s++ != '"')
        return -1;
    n = strcspn(s, "\"\\\n");
    if (s[n] != '"' || n == 0 || n >= len)
        return -1;
    memcpy(out, s, n);
    out[n] = '\0';
    return 0;
}

static int json_int(const char *json, const char *key, int *out)
{
    const char *s = json_value(json, key);

    return s && parse_int(s, 0, INT_MAX, out) ? 0 : -1;
}

int sf_parse_ticket(const char *text, sf_ticket_t *out)
{
    sf_ticket_t t;

    /* sf-ticket --json prints {"ticket", "granted", "requested"}. */
    if (json_string(text, "ticket", t.id, sizeof t.id) < 0 ||
        json_int(text, "granted", &t.granted) < 0 || json_int(text, "requested", &t.requested) < 0)
        return protocol_error();
    *out = t;
    return 0;
}

int sf_parse_id(const char *text)
{
    int id;

    return at_end(parse_int(text, 0, INT_MAX, &id)) ? id : protocol_error();
}

int sf_parse_checkpoint(const char *text, char *checkpoint, size_t len)
{
    char name[SF_ID_MAX];
    const char *s = parse_word(text, name, sizeof name);
    int id;

    if (!s || *s++ != ' ' || !at_end(parse_int(s, 0, INT_MAX, &id)))
        return protocol_error();
    if (strlen(name) >= len)
        return -SF_EUSAGE;
    memcpy(checkpoint, name, strlen(name) + 1);
    return id;
}

/* One "ID STATE STATUS" line of sf-join (STATUS "-" if the clone did not exit). */
static const char *parse_join_line(const char *s, sf_clone_status_t *c)
{
    s = parse_int(s, 1, INT_MAX, &c->id);
    if (!s || *s++ != ' ')
        return NULL;
    s = parse_word(s, c->state, sizeof c->state);
    if (!s || *s++ != ' ')
        return NULL;
    if (*s == '-' && (s[1] == '\n' || s[1] == '\0')) {
        c->status = -1;
        s++;
    } else {
        s = parse_int(s, 0, 255, &c->status);
    }
    return s ? end_of_line(s) : NULL;
}

int sf_parse_join(const char *text, sf_clone_status_t *out, int max)
{
    int n = 0;

    while (*text) {
        sf_clone_status_t c;
        text = parse_join_line(text, &c);
        if (!text)
            return protocol_error();
        if (n < max)
            out[n] = c;
        n++;
    }
    return n;
}

int sf_parse_kill(const char *text)
{
    int n = 0, id;

    for (; *text && *text != '\n'; n++) {
        if (n > 0 && *text++ != ' ')
            return protocol_error();
        text = parse_int(text, 1, INT_MAX, &id);
        if (!text)
            return protocol_error();
    }
    return at_end(text) ? n : protocol_error();
}

/* The calls ----------------------------------------------------------------------- */

/* Whether t holds a ticket ID at all (the tools judge the rest). */
static int ticket_ok(const sf_ticket_t *t)
{
    return t && t->id[0] && memchr(t->id, '\0', sizeof t->id);
}

int sf_request_ticket(int n, sf_ticket_t *out)
{
    char num[16], text[SMALL_OUTPUT];
    const char *argv[] = {"sf-ticket", "--json", "--", num, NULL};
    int rc;

    if (!out)
        return -SF_EUSAGE;
    snprintf(num, sizeof num, "%d", n);
    rc = run_tool(argv, text, sizeof text);
    return rc ? tool_error(rc) : sf_parse_ticket(text, out);
}

int sf_clone(const sf_ticket_t *t)
{
    char text[SMALL_OUTPUT];
    const char *argv[] = {"sf-clone", "--", t ? t->id : NULL, NULL};
    int rc;

    if (!ticket_ok(t))
        return -SF_EUSAGE;
    rc = run_tool(argv, text, sizeof text);
    return rc ? tool_error(rc) : sf_parse_id(text);
}

int sf_checkpoint_parent(char *checkpoint, size_t len)
{
    char text[SMALL_OUTPUT];
    const char *argv[] = {"sf-checkpoint", NULL};
    int rc;

    if (!checkpoint)
        return -SF_EUSAGE;
    rc = run_tool(argv, text, sizeof text);
    return rc ? tool_error(rc) : sf_parse_checkpoint(text, checkpoint, len);
}

int sf_create_clones(const char *checkpoint, const sf_ticket_t *t)
{
    char text[SMALL_OUTPUT];
    const char *argv[] = {"sf-clone", "--from", checkpoint, "--", t ? t->id : NULL, NULL};
    int rc;

    if (!checkpoint || !*checkpoint || !ticket_ok(t))
        return -SF_EUSAGE;
    rc = run_tool(argv, text, sizeof text);
    rc = rc ? tool_error(rc) : sf_parse_id(text);
    return rc > 0 ? protocol_error() : rc; /* the parent's ID is 0 */
}

void sf_exit(int status)
{
    char num[16], text[SMALL_OUTPUT];
    const char *argv[] = {"sf-exit", "--", num, NULL};
    int rc;

    snprintf(num, sizeof num, "%d", status);
    /* sf-exit returns only if it failed: else it waits for sfld to end this VM. */
    rc = run_tool(argv, text, sizeof text);
    if (rc < 0)
        fprintf(stderr, "sf_exit: %s: %s\n", sf_strerror(rc), strerror(errno));
    exit(rc < 0 ? SF_ESYSTEM : rc ? rc : status);
}

int sf_join(const sf_ticket_t *t, sf_clone_status_t *out, int max)
{
    const char *argv[] = {"sf-join", "--", t ? t->id : NULL, NULL};
    char *text;
    int rc, err;

    if (!ticket_ok(t) || max < 0 || (max > 0 && !out))
        return -SF_EUSAGE;
    text = malloc(LIST_OUTPUT);
    if (!text)
        return -SF_ESYSTEM;
    rc = run_tool(argv, text, LIST_OUTPUT);
    /* Exit status 1 with a list: the join worked, some clone did not exit 0. */
    if (rc == 0 || (rc == SF_EFAILED && text[0]))
        rc = sf_parse_join(text, out, max);
    else
        rc = tool_error(rc);
    err = errno;
    free(text);
    errno = err;
    return rc;
}

int sf_kill(const sf_ticket_t *t)
{
    const char *argv[] = {"sf-kill", "--", t ? t->id : NULL, NULL};
    char *text;
    int rc, err;

    if (!ticket_ok(t))
        return -SF_EUSAGE;
    text = malloc(LIST_OUTPUT);
    if (!text)
        return -SF_ESYSTEM;
    rc = run_tool(argv, text, LIST_OUTPUT);
    rc = rc ? tool_error(rc) : sf_parse_kill(text);
    err = errno;
    free(text);
    errno = err;
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
        return "a system call or a SnowFlock tool failed";
    default:
        return "unknown SnowFlock error";
    }
}

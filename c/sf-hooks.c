/* sf-hooks.c: the reseed and hooks.d/clone-post.d after a fork (sf-hooks.h).
 *
 * The hooks run as sflib.guest.hooks runs them, so a clone made by a C program
 * gets the same identity (hostname, MAC, address) as one made by sf-clone.
 */
#define _GNU_SOURCE
#include "sf-hooks.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SEED_MAX 256 /* bytes; sfld sends 32 */
#define TAIL_MAX 1024 /* of a hook's stderr, for its failure's message */
#define OUTPUT_MAX 16384 /* of each of a hook's stdout and stderr, logged line by line */

/* Reseeding ---------------------------------------------------------------------- */

static int hex_digit(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* The bytes of hex into out[SEED_MAX]: their count, or -1 if it is not hex. */
static int unhex(const char *hex, unsigned char *out)
{
    size_t n = strlen(hex);

    if (n % 2 || n / 2 > SEED_MAX)
        return -1;
    for (size_t k = 0; k < n / 2; k++) {
        int hi = hex_digit(hex[2 * k]), lo = hex_digit(hex[2 * k + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[k] = (unsigned char)(hi << 4 | lo);
    }
    return (int)(n / 2);
}

void sfh_reseed(const char *seed)
{
    unsigned char bytes[SEED_MAX];
    int n = seed ? unhex(seed, bytes) : -1, fd, ok;

    if (n < 0) {
        if (seed)
            fprintf(stderr, "snowflock: cannot reseed the kernel's RNG: the seed is not hex\n");
        return;
    }
    fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    /* Into the input pool, uncredited; then a new CRNG key now (root only). */
    ok = fd >= 0 && write(fd, bytes, (size_t)n) == n && ioctl(fd, RNDRESEEDCRNG) == 0;
    if (!ok)
        fprintf(stderr, "snowflock: cannot reseed the kernel's RNG: %m\n");
    if (fd >= 0 && close(fd) < 0 && ok)
        fprintf(stderr, "snowflock: cannot reseed the kernel's RNG: %m\n");
}

/* The environment ---------------------------------------------------------------- */

int sfh_name_ok(const char *name)
{
    return *name && strspn(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                 "0123456789_-") == strlen(name);
}

/* Adds "name=value" to env[*n] (room made by the caller), replacing an entry of the
 * same name; 0, or -1 on ENOMEM. */
static int set_var(char **env, size_t *n, const char *name, const char *value)
{
    size_t len = strlen(name);
    char *entry;

    if (asprintf(&entry, "%s=%s", name, value) < 0)
        return -1;
    for (size_t k = 0; k < *n; k++) {
        if (strncmp(env[k], name, len) == 0 && env[k][len] == '=') {
            free(env[k]);
            env[k] = entry;
            return 0;
        }
    }
    env[(*n)++] = entry;
    return 0;
}

/* A member's value as Python's str() gives it (sflib.guest.hooks); nested values as
 * compact JSON. Returns a malloc'd string or NULL. */
static char *identity_value(const struct sfj *v)
{
    static const char *const words[] = {"None", "False", "True"};
    char buf[4096];
    struct sfj_out o;

    if (v->type <= SFJ_TRUE)
        return strdup(words[v->type]);
    if (v->type != SFJ_ARRAY && v->type != SFJ_OBJECT)
        return strdup(v->str); /* a string, or a number's text */
    sfj_out_init(&o, buf, sizeof buf);
    sfj_value(&o, v);
    return o.failed ? NULL : strdup(buf);
}

/* SF_<KEY>=value for each member of identity into env. */
static int add_identity(char **env, size_t *n, const struct sfj *identity)
{
    for (size_t k = 0; identity && identity->type == SFJ_OBJECT && k < identity->n; k++) {
        const struct sfj *m = &identity->kids[k];
        char *name, *value = identity_value(m);
        int rc = -1;
        if (value && asprintf(&name, "SF_%s", m->key) >= 0) {
            for (char *c = name; *c; c++)
                *c = (char)(*c >= 'a' && *c <= 'z' ? *c - 'a' + 'A' : *c);
            rc = set_var(env, n, name, value);
            free(name);
        }
        free(value);
        if (rc < 0)
            return -1;
    }
    return 0;
}

char **sfh_environment(char **environ_, const char *event, const char *phase,
                       const struct sfj *identity)
{
    size_t count = 0, n = 0;
    char **env;

    while (environ_ && environ_[count])
        count++;
    env = calloc(count + 4 + (identity ? identity->n : 0), sizeof *env);
    if (!env)
        return NULL;
    for (size_t k = 0; k < count; k++) {
        if (strncmp(environ_[k], "SF_", 3) != 0 || !strchr(environ_[k], '='))
            continue;
        env[n] = strdup(environ_[k]);
        if (!env[n++])
            goto fail;
    }
    if (set_var(env, &n, "PATH", SFH_PATH) < 0 || set_var(env, &n, "SF_HOOKS_EVENT", event) < 0 ||
        set_var(env, &n, "SF_HOOKS_PHASE", phase) < 0 || add_identity(env, &n, identity) < 0)
        goto fail;
    return env;
fail:
    sfh_free_env(env);
    return NULL;
}

void sfh_free_env(char **env)
{
    for (size_t k = 0; env && env[k]; k++)
        free(env[k]);
    free(env);
}

/* Running one hook --------------------------------------------------------------- */

/* In the child: stdin /dev/null, stdout and stderr to the pipes, nothing else open,
 * default signal handling, then the hook. Async-signal-safe calls only: the caller
 * may have threads. */
static void exec_hook(const char *path, char **env, int out, int err)
{
    char *const argv[] = {(char *)path, NULL};
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigset_t none;
    int null = open("/dev/null", O_RDONLY);

    if (null < 0 || dup2(null, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 ||
        dup2(err, STDERR_FILENO) < 0)
        _exit(127);
    (void)syscall(SYS_close_range, 3u, ~0u, 0u); /* as Python's close_fds; best effort */
    sigemptyset(&none);
    (void)sigprocmask(SIG_SETMASK, &none, NULL);
    (void)sigaction(SIGPIPE, &dfl, NULL);
    execve(path, argv, env);
    _exit(127);
}

struct hook_run {
    char tail[TAIL_MAX + 1]; /* the end of its stderr */
    size_t tail_len;
    char output[2][OUTPUT_MAX]; /* the start of its stdout and stderr, when logged */
    size_t output_len[2];
    int logged;
    int timed_out;
    int status; /* waitpid's */
};

static long long now_ms(void)
{
    struct timespec ts;

    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Keeps the last TAIL_MAX bytes of what fd gives (its stderr: keep), and when
 * its output is logged, the first OUTPUT_MAX of stream k (0 stdout, 1 stderr).
 * Returns 0 at its end, 1 for more, -1 on error. */
static int drain(int fd, struct hook_run *r, int keep)
{
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);

    if (n < 0)
        return errno == EINTR || errno == EAGAIN ? 1 : -1;
    if (n == 0)
        return 0;
    if (r->logged) {
        size_t room = OUTPUT_MAX - r->output_len[keep], k = (size_t)n < room ? (size_t)n : room;
        memcpy(r->output[keep] + r->output_len[keep], buf, k);
        r->output_len[keep] += k;
    }
    if (keep) {
        size_t k = (size_t)n > TAIL_MAX ? TAIL_MAX : (size_t)n;
        size_t drop = r->tail_len + k > TAIL_MAX ? r->tail_len + k - TAIL_MAX : 0;
        memmove(r->tail, r->tail + drop, r->tail_len - drop);
        r->tail_len -= drop;
        memcpy(r->tail + r->tail_len, buf + n - k, k);
        r->tail_len += k;
    }
    return 1;
}

/* Reads both pipes until they close or the deadline passes (r->timed_out). */
static int collect(int out, int err, struct hook_run *r, long long deadline)
{
    struct pollfd fds[2] = {{out, POLLIN, 0}, {err, POLLIN, 0}};
    int open_fds = 2;

    while (open_fds) {
        long long left = deadline - now_ms();
        int rc;
        if (left <= 0) {
            r->timed_out = 1;
            return 0;
        }
        rc = poll(fds, 2, left > INT_MAX ? INT_MAX : (int)left);
        if (rc < 0 && errno != EINTR)
            return -1;
        for (int k = 0; k < 2 && rc > 0; k++) {
            if (fds[k].fd < 0 || !fds[k].revents)
                continue;
            rc = drain(fds[k].fd, r, k == 1);
            if (rc < 0)
                return -1;
            if (rc == 0) {
                fds[k].fd = -1;
                open_fds--;
            }
            rc = 1;
        }
    }
    return 0;
}

/* waitpid, with SIGTERM then SIGKILL after SFH_GRACE_MS if the hook timed out. */
static int reap(pid_t pid, struct hook_run *r)
{
    long long deadline = now_ms() + SFH_GRACE_MS;
    pid_t got;

    if (r->timed_out && kill(pid, SIGTERM) < 0)
        return -1;
    for (;;) {
        got = waitpid(pid, &r->status, r->timed_out ? WNOHANG : 0);
        if (got == pid)
            return 0;
        if (got < 0 && errno != EINTR)
            return -1;
        if (got == 0 && now_ms() > deadline) {
            if (kill(pid, SIGKILL) < 0)
                return -1;
            r->timed_out = 2; /* blocking now: SIGKILL always ends it */
            continue;
        }
        if (got == 0)
            (void)nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
}

static void close_pair(int fds[2])
{
    (void)close(fds[0]); /* pipes: closing them loses nothing */
    (void)close(fds[1]);
}

/* Starts the hook with its stdout on pipes[0], its stderr on pipes[1]; the
 * parent's ends stay open on success, none on failure (0 or -1). */
static int spawn(const char *path, char **env, int pipes[2][2], pid_t *pid)
{
    if (pipe2(pipes[0], O_CLOEXEC) < 0)
        return -1;
    if (pipe2(pipes[1], O_CLOEXEC) < 0) {
        close_pair(pipes[0]);
        return -1;
    }
    *pid = fork();
    if (*pid == 0)
        exec_hook(path, env, pipes[0][1], pipes[1][1]);
    if (*pid < 0) {
        int err = errno;
        close_pair(pipes[0]);
        close_pair(pipes[1]);
        errno = err;
        return -1;
    }
    (void)close(pipes[0][1]); /* the child's ends, which it holds now */
    (void)close(pipes[1][1]);
    return 0;
}

/* The last line of a hook's stderr, as sflib.errors.CommandFailed quotes it. */
static const char *last_line(struct hook_run *r)
{
    char *end;

    r->tail[r->tail_len] = '\0';
    end = r->tail + r->tail_len;
    while (end > r->tail && (end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t' ||
                             end[-1] == '\r'))
        *--end = '\0';
    if (end == r->tail)
        return "no error output";
    end = strrchr(r->tail, '\n');
    return end ? end + 1 : r->tail;
}

/* NULL if the hook succeeded, else why not, in sflib.run's words. */
static const char *describe(const char *path, struct hook_run *r, int timeout_ms, char *why,
                            size_t size)
{
    if (r->timed_out) {
        snprintf(why, size, "%s did not finish within %g s", path, timeout_ms / 1000.0);
        return why;
    }
    if (WIFEXITED(r->status) && WEXITSTATUS(r->status) == 0)
        return NULL;
    snprintf(why, size, "%s failed with %s %d: %s", path,
             WIFEXITED(r->status) ? "status" : "signal",
             WIFEXITED(r->status) ? WEXITSTATUS(r->status) : WTERMSIG(r->status), last_line(r));
    return why;
}

/* Logs each line of what the hook (named name) wrote, stdout first, as
 * sflib.guest.hooks does: "NAME: line". */
static void log_output(const struct hook_run *r, const char *name, sfh_log_fn log)
{
    char line[512];

    for (int k = 0; k < 2; k++)
        for (size_t at = 0; at < r->output_len[k];) {
            const char *start = r->output[k] + at;
            const char *nl = memchr(start, '\n', r->output_len[k] - at);
            size_t len = nl ? (size_t)(nl - start) : r->output_len[k] - at;
            snprintf(line, sizeof line, "%s: %.*s", name, (int)len, start);
            log(0, line);
            at += len + 1;
        }
}

/* Runs one hook to its end; NULL if it exited 0, else why not into why[size]. Its
 * output goes to log unless that is NULL. */
static const char *run_hook(const char *path, char **env, int timeout_ms, char *why, size_t size,
                            sfh_log_fn log)
{
    static __thread struct hook_run r; /* too big for small stacks; one hook a thread */
    int pipes[2][2];
    pid_t pid;

    memset(&r, 0, sizeof r);
    r.logged = log != NULL;
    if (spawn(path, env, pipes, &pid) < 0) {
        snprintf(why, size, "cannot run it: %m");
        return why;
    }
    if (collect(pipes[0][0], pipes[1][0], &r, now_ms() + timeout_ms) < 0)
        r.timed_out = 1; /* its output cannot be read: end it as if it had timed out */
    (void)close(pipes[0][0]);
    (void)close(pipes[1][0]);
    if (reap(pid, &r) < 0) {
        snprintf(why, size, "cannot wait for it: %m");
        return why;
    }
    if (log)
        log_output(&r, strrchr(path, '/') + 1, log);
    return describe(path, &r, timeout_ms, why, size);
}

/* The hooks folder ---------------------------------------------------------------- */

static int hook_name(const struct dirent *d)
{
    return sfh_name_ok(d->d_name);
}

/* Byte order, as Python's sorted(), whatever the locale. */
static int by_bytes(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

/* Whether path is an executable regular file (symbolic links followed). */
static int runnable(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* Runs the listed hooks of dir; how many failed. */
static int run_listed(const char *dir, struct dirent **names, int count, char **env,
                      int timeout_ms, sfh_log_fn log)
{
    char path[PATH_MAX], why[PATH_MAX + TAIL_MAX + 64], said[2 * PATH_MAX + TAIL_MAX + 96];
    int failed = 0;

    for (int k = 0; k < count; k++) {
        const char *err;
        if (snprintf(path, sizeof path, "%s/%s", dir, names[k]->d_name) >= (int)sizeof path ||
            !runnable(path))
            continue;
        err = run_hook(path, env, timeout_ms, why, sizeof why, log);
        if (!err)
            continue;
        failed++;
        if (log) {
            snprintf(said, sizeof said, "hook %s failed: %s", path, err);
            log(1, said);
        } else {
            fprintf(stderr, "snowflock: hook %s failed: %s\n", path, err);
        }
    }
    return failed;
}

int sfh_run_hooks(const char *hooks_dir, const char *event, const char *phase,
                  const struct sfj *identity, int timeout_ms)
{
    return sfh_run_hooks_logged(hooks_dir, event, phase, identity, timeout_ms, NULL);
}

int sfh_run_hooks_logged(const char *hooks_dir, const char *event, const char *phase,
                         const struct sfj *identity, int timeout_ms, sfh_log_fn log)
{
    const char *root = hooks_dir ? hooks_dir : getenv("SF_HOOKS_DIR");
    char dir[PATH_MAX];
    struct dirent **names;
    char **env;
    int count, failed = -1;

    root = root && *root ? root : SFH_DEFAULT_DIR;
    snprintf(dir, sizeof dir, "%s/%s-%s.d", root, event, phase);
    count = scandir(dir, &names, hook_name, by_bytes);
    if (count < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return 0;
        fprintf(stderr, "snowflock: cannot list the hooks in %s: %m\n", dir);
        return -1;
    }
    env = sfh_environment(environ, event, phase, identity);
    if (env)
        failed = run_listed(dir, names, count, env, timeout_ms, log);
    else
        fprintf(stderr, "snowflock: cannot run the hooks in %s: %m\n", dir);
    sfh_free_env(env);
    for (int k = 0; k < count; k++)
        free(names[k]);
    free(names);
    return failed;
}

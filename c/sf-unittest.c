/* sf-unittest: the C API without a VM. The parsers on sample output, then every call
 * against fake sf-* tools (shell scripts in a temporary PATH directory), which
 * exercises fork, exec, the pipe, waitpid and the mapping of exit codes.
 * Run under valgrind by `make test-c`. Prints "N failed" and exits 1 on failure.
 */
#define _GNU_SOURCE
#include "snowflock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(failures, cond) check((cond), #cond, __LINE__, (failures))

static void check(int ok, const char *what, int line, int *failures)
{
    if (!ok) {
        fprintf(stderr, "sf-unittest.c:%d: FAILED: %s\n", line, what);
        ++*failures;
    }
}

/* The fakes: what the real tools print and how they exit, for a few tickets. */
static const struct {
    const char *name;
    const char *script;
} FAKES[] = {
    {"sf-ticket", "[ \"$1 $2\" = '--json --' ] || exit 2\n"
                  "case $3 in\n"
                  "2) echo '{\"ticket\": \"t1-abc\", \"granted\": 2, \"requested\": 3}' ;;\n"
                  "9) echo garbage ;;\n"
                  "*) exit 2 ;;\n"
                  "esac\n"},
    {"sf-clone", "if [ \"$1\" = --from ]; then [ \"$2 $3 $4\" = 'c1-x -- t1-abc' ] || exit 3; "
                 "echo 0; exit 0; fi\n"
                 "case $2 in t1-abc) echo 0 ;; t-clone) echo 7 ;; *) exit 3 ;; esac\n"},
    {"sf-checkpoint", "echo 'c1-x 0'\n"},
    {"sf-exit", "[ \"$2\" = 5 ] && exit 0\nexit 4\n"},
    {"sf-join", "case $2 in\n"
                "t1-abc) printf '1 exited 11\\n2 crashed -\\n3 exited 0\\n'; exit 1 ;;\n"
                "t-big) yes '1 exited 0' | head -n 20000 ;;\n"
                "t-sig) kill -9 $$ ;;\n"
                "*) exit 3 ;;\n"
                "esac\n"},
    {"sf-kill", "case $2 in t1-abc) echo '1 2' ;; t-none) echo ;; *) exit 4 ;; esac\n"},
};
#define NFAKES (sizeof FAKES / sizeof FAKES[0])

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
    size_t len = strlen(text);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = write(fd, text, len);
    if (close(fd) < 0 || n != (ssize_t)len)
        return -1;
    return 0;
}

/* Writes the fakes into dir (from mkdtemp). 0 or -1 (errno set). */
static int make_fakes(const char *dir)
{
    char path[256], text[1024];

    for (size_t i = 0; i < NFAKES; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, FAKES[i].name);
        snprintf(text, sizeof text, "#!/bin/sh\n%s", FAKES[i].script);
        if (write_file(path, text) < 0)
            return -1;
    }
    return 0;
}

static int remove_fakes(const char *dir)
{
    char path[256];

    for (size_t i = 0; i < NFAKES; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, FAKES[i].name);
        if (unlink(path) < 0)
            return -1;
    }
    return rmdir(dir);
}

static void test_parsers(int *f)
{
    sf_ticket_t t;
    sf_clone_status_t c[2];
    char ckpt[SF_ID_MAX], tiny[4];

    CHECK(f, sf_parse_ticket("{\"ticket\": \"t1-abc\", \"granted\": 2, \"requested\": 3}\n", &t) == 0);
    CHECK(f, strcmp(t.id, "t1-abc") == 0 && t.granted == 2 && t.requested == 3);
    CHECK(f, sf_parse_ticket("{\"ticket\": \"t2-x\", \"granted\": 1, \"requested\": 1}", &t) == 0);
    CHECK(f, strcmp(t.id, "t2-x") == 0);
    CHECK(f, sf_parse_ticket("{\"ticket\": \"t\\\"\", \"granted\": 1, \"requested\": 1}", &t) < 0);
    CHECK(f, sf_parse_ticket("{\"id\": \"t1\", \"granted\": -1, \"requested\": 1}", &t) < 0);
    CHECK(f, sf_parse_ticket("t1-abc\n", &t) == -SF_ESYSTEM && errno == EPROTO);

    CHECK(f, sf_parse_id("0\n") == 0);
    CHECK(f, sf_parse_id("12\n") == 12);
    CHECK(f, sf_parse_id("12") == 12);
    CHECK(f, sf_parse_id("") < 0 && sf_parse_id("1 2\n") < 0 && sf_parse_id("x\n") < 0);
    CHECK(f, sf_parse_id("99999999999\n") < 0 && sf_parse_id("-1\n") < 0);

    CHECK(f, sf_parse_checkpoint("c1-abc 0\n", ckpt, sizeof ckpt) == 0);
    CHECK(f, strcmp(ckpt, "c1-abc") == 0);
    CHECK(f, sf_parse_checkpoint("c1-abc 3\n", ckpt, sizeof ckpt) == 3);
    CHECK(f, sf_parse_checkpoint("c1-abc 3\n", tiny, sizeof tiny) == -SF_EUSAGE);
    CHECK(f, sf_parse_checkpoint("c1-abc\n", ckpt, sizeof ckpt) < 0);

    CHECK(f, sf_parse_join("1 exited 11\n2 crashed -\n3 exited 0\n", c, 2) == 3);
    CHECK(f, c[0].id == 1 && strcmp(c[0].state, "exited") == 0 && c[0].status == 11);
    CHECK(f, c[1].id == 2 && strcmp(c[1].state, "crashed") == 0 && c[1].status == -1);
    CHECK(f, sf_parse_join("", c, 2) == 0);
    CHECK(f, sf_parse_join("1 exited 256\n", c, 2) < 0);
    CHECK(f, sf_parse_join("1 exited\n", c, 2) < 0);
    CHECK(f, sf_parse_join("1 a-state-too-long-for-it 0\n", c, 2) < 0);
    CHECK(f, sf_parse_join("1 exited 0\njunk\n", c, 2) < 0);

    CHECK(f, sf_parse_kill("1 2 3\n") == 3);
    CHECK(f, sf_parse_kill("\n") == 0 && sf_parse_kill("") == 0);
    CHECK(f, sf_parse_kill("1  2\n") < 0 && sf_parse_kill("1,2\n") < 0);

    CHECK(f, strcmp(sf_strerror(-SF_ENOTFOUND), sf_strerror(SF_ENOTFOUND)) == 0);
    CHECK(f, strstr(sf_strerror(-SF_EUNREACHABLE), "daemon") != NULL);
    CHECK(f, strcmp(sf_strerror(-12345), "unknown SnowFlock error") == 0);
}

/* The lowest free file descriptor: the same before and after the calls, if none leaked. */
static int lowest_free_fd(void)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

    if (fd >= 0 && close(fd) < 0)
        return -1;
    return fd;
}

/* sf_exit in a child process; returns its exit status, or -1. */
static int exit_status_of_sf_exit(int status)
{
    int wstatus;
    pid_t pid = fork();

    if (pid == 0)
        sf_exit(status);
    if (pid < 0 || waitpid(pid, &wstatus, 0) < 0)
        return -1;
    return WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
}

static void test_calls(int *f)
{
    sf_ticket_t t, other = {"t-clone", 1, 1}, none = {"t-none", 1, 1};
    sf_ticket_t big = {"t-big", 1, 1}, sig = {"t-sig", 1, 1}, bad = {"t-bad", 1, 1};
    sf_clone_status_t c[3];
    char ckpt[SF_ID_MAX];

    CHECK(f, sf_request_ticket(2, &t) == 0);
    CHECK(f, strcmp(t.id, "t1-abc") == 0 && t.granted == 2 && t.requested == 3);
    CHECK(f, sf_request_ticket(0, &t) == -SF_EUSAGE);
    CHECK(f, sf_request_ticket(9, &t) == -SF_ESYSTEM && errno == EPROTO);
    CHECK(f, sf_clone(&t) == 0);
    CHECK(f, sf_clone(&other) == 7);
    CHECK(f, sf_clone(&bad) == -SF_ENOTFOUND);
    CHECK(f, sf_clone(NULL) == -SF_EUSAGE);
    CHECK(f, sf_checkpoint_parent(ckpt, sizeof ckpt) == 0 && strcmp(ckpt, "c1-x") == 0);
    CHECK(f, sf_create_clones("c1-x", &t) == 0);
    CHECK(f, sf_create_clones("c9-y", &t) == -SF_ENOTFOUND);
    CHECK(f, sf_join(&t, c, 3) == 3);
    CHECK(f, c[0].status == 11 && c[1].status == -1 && c[2].status == 0);
    CHECK(f, sf_join(&t, NULL, 0) == 3);
    CHECK(f, sf_join(&bad, c, 3) == -SF_ENOTFOUND);
    CHECK(f, sf_join(&big, c, 3) == -SF_ESYSTEM && errno == EMSGSIZE);
    CHECK(f, sf_join(&sig, c, 3) == -SF_ESYSTEM && errno == EPROTO);
    CHECK(f, sf_kill(&t) == 2);
    CHECK(f, sf_kill(&none) == 0);
    CHECK(f, sf_kill(&bad) == -SF_EWRONGSTATE);
    CHECK(f, exit_status_of_sf_exit(3) == SF_EWRONGSTATE); /* the fake says: a parent */
    CHECK(f, exit_status_of_sf_exit(5) == 5);               /* the tool returned: exit anyway */
}

/* With no tools on PATH: the tools cannot run, so every call fails with EPROTO. */
static void test_without_tools(int *f)
{
    sf_ticket_t t = {"t1-abc", 1, 1};

    fprintf(stderr, "sf-unittest: a complaint about sf-kill not running is expected:\n");
    CHECK(f, setenv("PATH", "/nonexistent", 1) == 0);
    CHECK(f, sf_kill(&t) == -SF_ESYSTEM && errno == EPROTO);
}

int main(void)
{
    char dir[] = "/tmp/sf-unittest-XXXXXX", path[512];
    const char *old_path = getenv("PATH");
    int failures = 0, fd = lowest_free_fd();

    test_parsers(&failures);
    if (!mkdtemp(dir) || make_fakes(dir) < 0) {
        perror("sf-unittest: cannot write the fake tools");
        return 1;
    }
    snprintf(path, sizeof path, "%s:%s", dir, old_path ? old_path : "/usr/bin:/bin");
    CHECK(&failures, setenv("PATH", path, 1) == 0);
    test_calls(&failures);
    test_without_tools(&failures);
    CHECK(&failures, fd >= 0 && lowest_free_fd() == fd); /* no descriptor leaked */
    if (remove_fakes(dir) < 0) {
        perror("sf-unittest: cannot remove the fake tools");
        failures++;
    }
    printf(failures ? "sf-unittest: %d failed\n" : "sf-unittest: all passed\n", failures);
    return failures ? 1 : 0;
}

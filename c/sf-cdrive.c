/* sf-cdrive: each call of libsnowflock from the command line, for tests without a
 * VM (tests/integration/test_c_agent.py drives it against the real agent and a
 * fake sfld). Linked to libsnowflock.so. Prints one line per result:
 *
 *   sf-cdrive ticket N            TICKET ID GRANTED REQUESTED
 *   sf-cdrive clone TICKET        ID N
 *   sf-cdrive checkpoint          CKPT NAME ID
 *   sf-cdrive create CKPT TICKET  CREATED
 *   sf-cdrive join TICKET         CLONE ID STATE STATUS ..., then COUNT N
 *   sf-cdrive kill TICKET         KILLED N
 *   sf-cdrive exit STATUS         (never returns; exits with the error's code)
 *   sf-cdrive threads N           N threads at once, each: a ticket for 1, then join
 *                                 it; THREAD K TICKET COUNT per thread
 *   sf-cdrive bench N [TICKET]    N tickets in a row (or N joins of TICKET, whatever
 *                                 their outcome: one round trip each); MEAN-MS X
 *
 * or "ERR CODE ERRNO" (CODE the exit code, ERRNO for SF_ESYSTEM) and exits with CODE.
 * Exits 2 for a bad command line.
 */
#define _GNU_SOURCE
#include "snowflock.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define THREADS_MAX 64

static int report(int rc)
{
    if (rc >= 0)
        return 0;
    printf("ERR %d %d\n", -rc, rc == -SF_ESYSTEM ? errno : 0);
    return -rc;
}

static sf_ticket_t ticket_named(const char *id)
{
    sf_ticket_t t = {"", 1, 1};

    snprintf(t.id, sizeof t.id, "%s", id);
    return t;
}

static int do_ticket(const char *n)
{
    sf_ticket_t t;
    int rc = sf_request_ticket(atoi(n), &t);

    if (rc == 0)
        printf("TICKET %s %d %d\n", t.id, t.granted, t.requested);
    return report(rc);
}

static int do_join(const char *id)
{
    sf_ticket_t t = ticket_named(id);
    sf_clone_status_t c[16];
    int n = sf_join(&t, c, 16);

    for (int k = 0; k < n && k < 16; k++)
        printf("CLONE %d %s %d\n", c[k].id, c[k].state, c[k].status);
    if (n >= 0)
        printf("COUNT %d\n", n);
    return report(n);
}

static int do_checkpoint(void)
{
    char name[SF_ID_MAX];
    int id = sf_checkpoint_parent(name, sizeof name);

    if (id >= 0)
        printf("CKPT %s %d\n", name, id);
    return report(id);
}

struct worker {
    pthread_t thread;
    int k, rc;
    sf_ticket_t t;
};

static void *work(void *arg)
{
    struct worker *w = arg;
    sf_clone_status_t c[1];

    w->rc = sf_request_ticket(1, &w->t);
    if (w->rc == 0)
        w->rc = sf_join(&w->t, c, 1);
    return NULL;
}

static int do_threads(int n)
{
    struct worker w[THREADS_MAX];
    int failed = 0;

    if (n < 1 || n > THREADS_MAX)
        return 2;
    for (int k = 0; k < n; k++) {
        w[k].k = k;
        if (pthread_create(&w[k].thread, NULL, work, &w[k]) != 0)
            return report(-SF_ESYSTEM);
    }
    for (int k = 0; k < n; k++) {
        if (pthread_join(w[k].thread, NULL) != 0)
            return report(-SF_ESYSTEM);
        printf("THREAD %d %s %d\n", k, w[k].rc >= 0 ? w[k].t.id : "-", w[k].rc);
        failed += w[k].rc < 0;
    }
    return failed ? 1 : 0;
}

static double now(void)
{
    struct timespec ts;

    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int do_bench(int n, const char *ticket)
{
    double start = now();
    sf_ticket_t t = ticket_named(ticket ? ticket : "");

    for (int k = 0; k < n; k++) {
        int rc = ticket ? sf_join(&t, NULL, 0) : sf_request_ticket(1, &t);
        if (rc < 0 && !ticket)
            return report(rc);
    }
    printf("MEAN-MS %.3f\n", (now() - start) * 1000 / (n > 0 ? n : 1));
    return 0;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    sf_ticket_t t = ticket_named(argc > 2 ? argv[2] : "");
    int rc;

    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(cmd, "ticket") == 0 && argc == 3)
        return do_ticket(argv[2]);
    if (strcmp(cmd, "clone") == 0 && argc == 3) {
        rc = sf_clone(&t);
        if (rc >= 0)
            printf("ID %d\n", rc);
        return report(rc);
    }
    if (strcmp(cmd, "checkpoint") == 0 && argc == 2)
        return do_checkpoint();
    if (strcmp(cmd, "create") == 0 && argc == 4) {
        t = ticket_named(argv[3]);
        rc = sf_create_clones(argv[2], &t);
        if (rc == 0)
            printf("CREATED\n");
        return report(rc);
    }
    if (strcmp(cmd, "join") == 0 && argc == 3)
        return do_join(argv[2]);
    if (strcmp(cmd, "kill") == 0 && argc == 3) {
        rc = sf_kill(&t);
        if (rc >= 0)
            printf("KILLED %d\n", rc);
        return report(rc);
    }
    if (strcmp(cmd, "exit") == 0 && argc == 3)
        sf_exit(atoi(argv[2]));
    if (strcmp(cmd, "threads") == 0 && argc == 3)
        return do_threads(atoi(argv[2]));
    if (strcmp(cmd, "bench") == 0 && (argc == 3 || argc == 4))
        return do_bench(atoi(argv[2]), argc == 4 ? argv[3] : NULL);
    fprintf(stderr, "usage: sf-cdrive ticket|clone|checkpoint|create|join|kill|exit|threads|bench ...\n");
    return 2;
}

/* sf-ctest: the C API on a real VM (tests/integration/test_c_api.py runs it in a guest).
 *
 * 1. Error paths: sf_join with a made-up ticket, sf_request_ticket(0).
 * 2. sf_clone with a ticket for 2: each clone prints "C-CLONE ID" and ends with
 *    sf_exit(ID + 10); the parent joins and prints "C-JOIN ID STATE STATUS" lines.
 * 3. sf_checkpoint_parent, then sf_create_clones from it with a ticket for 2: the
 *    clones return from sf_checkpoint_parent, print "C-CKPT-CLONE ID" and end with
 *    sf_exit(ID + 20); the parent joins ("C-CKPT-JOIN ID STATE STATUS").
 * 4. sf_clone with a ticket for 1 whose clone waits forever: sf_kill at once, while
 *    sfld is still starting the clone, kills it (sfld waits for it to start).
 * Then the verdict: "C-TEST PASS", or "C-TEST FAIL: reason" at the first failure.
 * Exits 0 on PASS, 1 on FAIL.
 *
 * sf_exit in the parent is not tried: it ends the calling process by design
 * (sf-unittest covers that path against a fake XenStore peer).
 */
#include "snowflock.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define CLONES 2

static int fail(const char *what, int rc)
{
    printf("C-TEST FAIL: %s returned %d (%s)\n", what, rc, sf_strerror(rc));
    return 1;
}

static int ticket(int n, sf_ticket_t *t)
{
    int rc = sf_request_ticket(n, t);

    if (rc < 0)
        return fail("sf_request_ticket", rc);
    if (t->granted != n) {
        printf("C-TEST FAIL: granted %d of %d clones\n", t->granted, n);
        return 1;
    }
    return 0;
}

/* Joins t, prints "<tag> ID STATE STATUS" lines; 0 if clone k exited k + base. */
static int join(const sf_ticket_t *t, const char *tag, int base)
{
    sf_clone_status_t c[CLONES + 2];
    int n = sf_join(t, c, CLONES + 2), ok = n == CLONES;

    if (n < 0)
        return fail("sf_join", n);
    for (int i = 0; i < n && i < CLONES + 2; i++) {
        printf("%s %d %s %d\n", tag, c[i].id, c[i].state, c[i].status);
        ok = ok && c[i].id == i + 1 && strcmp(c[i].state, "exited") == 0 &&
             c[i].status == i + 1 + base;
    }
    if (!ok) {
        printf("C-TEST FAIL: %s: clones 1 and 2 should exit %d and %d\n", tag, base + 1,
               base + 2);
        return 1;
    }
    return 0;
}

/* Before any clone: an unknown ticket and a bad request are refused. */
static int check_errors(void)
{
    sf_ticket_t made_up = {"t999-nosuch", 1, 1}, t;
    int rc;

    rc = sf_join(&made_up, NULL, 0);
    if (rc != -SF_ENOTFOUND)
        return fail("sf_join with a made-up ticket", rc);
    rc = sf_request_ticket(0, &t);
    if (rc != -SF_EUSAGE)
        return fail("sf_request_ticket(0)", rc);
    return 0;
}

static int check_clone_and_join(void)
{
    sf_ticket_t t;
    int id;

    if (ticket(CLONES, &t))
        return 1;
    id = sf_clone(&t);
    if (id < 0)
        return fail("sf_clone", id);
    if (id > 0) {
        printf("C-CLONE %d\n", id);
        sf_exit(id + 10);
    }
    return join(&t, "C-JOIN", 10);
}

static int check_checkpoint(void)
{
    char checkpoint[SF_ID_MAX];
    sf_ticket_t t;
    int id, rc;

    id = sf_checkpoint_parent(checkpoint, sizeof checkpoint);
    if (id < 0)
        return fail("sf_checkpoint_parent", id);
    if (id > 0) { /* a clone made from the checkpoint, later */
        printf("C-CKPT-CLONE %d\n", id);
        sf_exit(id + 20);
    }
    if (ticket(CLONES, &t))
        return 1;
    rc = sf_create_clones(checkpoint, &t);
    if (rc < 0)
        return fail("sf_create_clones", rc);
    return join(&t, "C-CKPT-JOIN", 20);
}

static int check_kill(void)
{
    sf_ticket_t t;
    int id, killed;

    if (ticket(1, &t))
        return 1;
    id = sf_clone(&t);
    if (id < 0)
        return fail("sf_clone", id);
    if (id > 0) {
        printf("C-KILL-CLONE %d waits\n", id);
        for (;;)
            pause();
    }
    killed = sf_kill(&t); /* sf_clone returned before sfld started the clone */
    if (killed < 0)
        return fail("sf_kill", killed);
    printf("C-KILLED %d\n", killed);
    if (killed != 1) {
        printf("C-TEST FAIL: sf_kill killed %d clones, not 1\n", killed);
        return 1;
    }
    return 0;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0); /* whole lines on the console, in order */
    if (check_errors() || check_clone_and_join() || check_checkpoint() || check_kill())
        return 1;
    printf("C-TEST PASS\n");
    return 0;
}

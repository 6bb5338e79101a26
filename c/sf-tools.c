/* sf-tools.c: the guest tools in C, one executable named as each of them (sf-ticket,
 * sf-clone, sf-checkpoint, sf-join, sf-kill, sf-exit, sf-share; or "sf-tools TOOL
 * ARGS"), over libsnowflock's core (sf-call.h): no Python, so each takes
 * milliseconds where a Python process takes a third of a second in a TCG guest.
 *
 * They behave as the Python tools of sflib/cli do, which are their spec (sf-cli.h):
 * the same options, output, messages and exit codes (sflib/exitcodes.py).
 */
#define _GNU_SOURCE
#include "sf-call.h"
#include "sf-cli.h"
#include "sf-freepages.h"
#include "sf-share.h"

#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEBUG_OPT {"--debug", 0, NULL, NULL, "Log debug messages and show tracebacks on errors."}
#define QUIET_OPT {"--quiet", 'q', NULL, NULL, "Log only warnings and errors."}
#define HOOKS_OPT                                                                              \
    {"--hooks-dir", 0, "TEXT", "SF_HOOKS_DIR",                                                 \
     "hooks.d to run in clones [default: /etc/snowflock/hooks.d]."}
#define AVOIDANCE_OPT                                                                          \
    {"--avoidance/--no-avoidance", 0, NULL, "SF_AVOIDANCE",                                    \
     "Report the guest's free pages so clones never fetch them.  [default: avoidance]"}
#define TICKET_ARG {"TICKET", 0, "The ticket the clones were made with."}

/* Common --------------------------------------------------------------------------- */

/* Parses the line and sets up logging (--debug, --quiet). */
static void start(const struct sfa_cmd *cmd, int argc, char **argv, struct sfa_line *line)
{
    sfa_parse(cmd, argc, argv, line);
    sfa_log_setup(cmd->name, sfa_flag(line, "--debug", 0), sfa_flag(line, "--quiet", 0));
}

/* One request; a failure is the tool's error and exit code. */
static void call(const char *op, const struct sfp_arg *args, size_t nargs, struct sfj *result)
{
    char why[SFC_WHY_MAX];
    int rc = sfc_request(op, args, nargs, result, why, sizeof why);

    if (rc < 0)
        sfa_fail(-rc, "%s", why);
}

static void protocol_error(const char *what)
{
    sfa_fail(111, "sfld's reply to %s is not what sfld sends", what);
}

/* Prints a result as Python's json.dumps(result, indent=2). */
static void print_json(const struct sfj *v, int indent)
{
    static char buf[1 << 16];
    struct sfj_out o;

    sfj_out_init(&o, buf, sizeof buf);
    if (indent)
        sfj_value_indented(&o, v, indent);
    else
        sfj_value(&o, v);
    if (o.failed)
        sfa_fail(111, "the result does not fit %zu bytes", sizeof buf);
    puts(buf);
}

/* sf-ticket ------------------------------------------------------------------------ */

static const struct sfa_cmd TICKET = {
    "sf-ticket", "Reserve resources for N clones of this VM; print the ticket.", NULL,
    {{"--json", 0, NULL, NULL, "Print ticket, granted, requested."}, DEBUG_OPT, QUIET_OPT},
    {{"N", 0, "How many clones to ask for."}}, NULL};

static int ticket_main(int argc, char **argv)
{
    struct sfa_line line;
    struct sfj result;
    sf_ticket_t t;

    start(&TICKET, argc, argv, &line);
    struct sfp_arg args[] = {{"n", NULL, sfa_int_arg(&line, 0, -SFA_NO_LIMIT, SFA_NO_LIMIT)}};
    call("ticket", args, 1, &result);
    if (sfp_ticket(&result, &t) < 0)
        protocol_error("ticket");
    if (t.granted < t.requested)
        sfa_log(SFA_WARNING, "granted %d of %d clones", t.granted, t.requested);
    if (sfa_flag(&line, "--json", 0))
        printf("{\"ticket\": \"%s\", \"granted\": %d, \"requested\": %d}\n", t.id, t.granted,
               t.requested);
    else
        puts(t.id);
    sfj_free(&result);
    return 0;
}

/* sf-clone and sf-checkpoint --------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;

    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static const struct sfa_cmd CLONE = {
    "sf-clone", "Clone this VM with TICKET; print 0 in the parent, the clone's ID in clones.",
    "With --from, the clones resume inside sf-checkpoint instead, and this prints 0.",
    {{"--from", 0, "TEXT", NULL, "Make the clones from this checkpoint (sf-checkpoint)."},
     HOOKS_OPT, AVOIDANCE_OPT, {"--json", 0, NULL, NULL, "Print {\"id\": N}."}, DEBUG_OPT,
     QUIET_OPT},
    {{"TICKET", 0, "A ticket from sf-ticket."}}, NULL};

static const struct sfa_cmd CHECKPOINT = {
    "sf-checkpoint", "Checkpoint this VM; print \"CHECKPOINT 0\". Clones made from it later "
                     "with sf-clone --from resume here and print \"CHECKPOINT ID\".", NULL,
    {HOOKS_OPT, AVOIDANCE_OPT, {"--json", 0, NULL, NULL, "Print checkpoint and id."},
     DEBUG_OPT, QUIET_OPT},
    {{NULL, 0, NULL}}, NULL};

/* What a hook did, in the tool's log. */
static void hook_said(int warning, const char *message)
{
    sfa_log(warning ? SFA_WARNING : SFA_INFO, "%s", message);
}

/* A fork (op "clone" with the ticket, or "checkpoint"): the free pages taken and
 * reported first unless --no-avoidance; then the reseed and, in a clone, the hooks.
 * Returns the ID (0 in the parent); *checkpoint gets a checkpoint's name. */
static int fork_vm(const struct sfa_line *line, const char *op, const char *ticket,
                   char *checkpoint, size_t size)
{
    char why[SFC_WHY_MAX] = "";
    struct sff_held held = {.lock_fd = -1};
    struct sfp_arg args[2];
    struct sfj result;
    const char *seed, *name;
    size_t nargs = 0;
    int rc;

    if (sfc_reachable(why, sizeof why) < 0) /* before the free pages are taken */
        sfa_fail(5, "%s", why);
    if (ticket)
        args[nargs++] = (struct sfp_arg){"ticket", ticket, 0};
    if (sfa_flag(line, "--avoidance", 1)) {
        if (sff_take(&held, why, sizeof why) < 0)
            sfa_log(SFA_WARNING, "no free-page report: %s", why);
        else if (held.key[0])
            sfa_log(SFA_DEBUG, "free pages: %zu taken in %.0f ms, %zu runs in %zu chunks "
                    "encoded in %.0f ms, written in %.0f ms", held.pages, held.took_ms,
                    held.nruns, held.chunks, held.encoded_ms, held.written_ms);
        else
            sfa_log(SFA_DEBUG, "no free-page report: little free memory, or another "
                               "process holds the guest's free pages");
        if (held.key[0])
            args[nargs++] = (struct sfp_arg){"freepages", held.key, 0};
    }
    (void)fflush(NULL); /* else every clone would write the buffered output again */
    double asked = now_ms();
    rc = sfc_request(op, args, nargs, &result, why, sizeof why);
    sfa_log(SFA_DEBUG, "sfld answered in %.0f ms", now_ms() - asked);
    if (rc >= 0)
        held.key[0] = '\0'; /* sfld took the report: no round trip to remove it */
    sff_release(&held); /* in the parent and in every clone */
    if (held.pages)
        sfa_log(SFA_DEBUG, "free pages given back in %.0f ms", held.released_ms);
    if (rc < 0)
        sfa_fail(-rc, "%s", why);
    rc = sfp_fork(&result, &seed, checkpoint ? &name : NULL);
    if (rc < 0)
        protocol_error(op);
    if (checkpoint)
        snprintf(checkpoint, size, "%s", name);
    double forked = now_ms();
    sfc_after_fork(seed, rc, sfa_get(line, "--hooks-dir"), hook_said);
    sfa_log(SFA_DEBUG, "reseeded%s in %.0f ms", rc > 0 ? " and ran the hooks" : "",
            now_ms() - forked);
    sfj_free(&result);
    return rc;
}

static int clone_main(int argc, char **argv)
{
    struct sfa_line line;
    const char *from;
    int id;

    start(&CLONE, argc, argv, &line);
    from = sfa_get(&line, "--from");
    if (from) {
        struct sfp_arg args[] = {{"checkpoint", from, 0}, {"ticket", line.arg[0], 0}};
        struct sfj result;
        const char *seed;
        call("create_clones", args, 2, &result);
        id = sfp_fork(&result, &seed, NULL);
        if (id < 0)
            protocol_error("create_clones");
        sfj_free(&result);
    } else {
        id = fork_vm(&line, "clone", line.arg[0], NULL, 0);
    }
    if (sfa_flag(&line, "--json", 0))
        printf("{\"id\": %d}\n", id);
    else
        printf("%d\n", id);
    return 0;
}

static int checkpoint_main(int argc, char **argv)
{
    char name[SF_ID_MAX];
    struct sfa_line line;
    int id;

    start(&CHECKPOINT, argc, argv, &line);
    id = fork_vm(&line, "checkpoint", NULL, name, sizeof name);
    if (sfa_flag(&line, "--json", 0))
        printf("{\"checkpoint\": \"%s\", \"id\": %d}\n", name, id);
    else
        printf("%s %d\n", name, id);
    return 0;
}

/* sf-join, sf-kill, sf-exit -------------------------------------------------------- */

static const struct sfa_cmd JOIN = {
    "sf-join", "Wait until every clone of TICKET has exited; print \"ID STATE STATUS\" per clone.",
    "Exits 0 if every clone called sf-exit 0, else 1.",
    {{"--json", 0, NULL, NULL, "Print the ticket as JSON."}, DEBUG_OPT, QUIET_OPT},
    {TICKET_ARG}, NULL};

static const struct sfa_cmd KILL = {
    "sf-kill", "Kill every clone of TICKET and invalidate it; print the IDs killed.", NULL,
    {{"--json", 0, NULL, NULL, "Print the ticket as JSON."}, DEBUG_OPT, QUIET_OPT},
    {TICKET_ARG}, NULL};

static const struct sfa_cmd EXIT = {
    "sf-exit", "End this clone; its parent's sf-join reports STATUS. Does not return.", NULL,
    {DEBUG_OPT, QUIET_OPT}, {{"STATUS", 1, "Exit status, 0-255."}}, NULL};

#define CLONES_MAX 1024

/* The clones of a join's or kill's result, sorted by ID, and how many. */
static int clones_of(const struct sfj *result, sf_clone_status_t *out, const char *op)
{
    int n = sfp_clones(result, out, CLONES_MAX, 0);

    if (n < 0)
        protocol_error(op);
    return n < CLONES_MAX ? n : CLONES_MAX;
}

static int join_main(int argc, char **argv)
{
    static sf_clone_status_t clones[CLONES_MAX];
    struct sfa_line line;
    struct sfj result;
    int n, failed = 0;

    start(&JOIN, argc, argv, &line);
    struct sfp_arg args[] = {{"ticket", line.arg[0], 0}};
    call("join", args, 1, &result);
    n = clones_of(&result, clones, "join");
    if (sfa_flag(&line, "--json", 0))
        print_json(&result, 2);
    for (int k = 0; k < n; k++) {
        failed |= strcmp(clones[k].state, "exited") != 0 || clones[k].status != 0;
        if (sfa_flag(&line, "--json", 0))
            continue;
        if (clones[k].status < 0)
            printf("%d %s -\n", clones[k].id, clones[k].state);
        else
            printf("%d %s %d\n", clones[k].id, clones[k].state, clones[k].status);
    }
    sfj_free(&result);
    return failed;
}

static int kill_main(int argc, char **argv)
{
    static sf_clone_status_t clones[CLONES_MAX];
    struct sfa_line line;
    struct sfj result;
    int n, first = 1;

    start(&KILL, argc, argv, &line);
    struct sfp_arg args[] = {{"ticket", line.arg[0], 0}};
    call("kill", args, 1, &result);
    n = clones_of(&result, clones, "kill");
    if (sfa_flag(&line, "--json", 0)) {
        print_json(&result, 2);
    } else {
        for (int k = 0; k < n; k++)
            if (strcmp(clones[k].state, "killed") == 0) {
                printf(first ? "%d" : " %d", clones[k].id);
                first = 0;
            }
        putchar('\n');
    }
    sfj_free(&result);
    return 0;
}

static int exit_main(int argc, char **argv)
{
    struct sfa_line line;
    struct sfj result;

    start(&EXIT, argc, argv, &line);
    struct sfp_arg args[] = {{"status", NULL, line.nargs ? sfa_int_arg(&line, 0, 0, 255) : 0}};
    (void)fflush(NULL); /* sfld stops the VM: nothing buffered would ever be written */
    call("exit", args, 1, &result);
    for (;;)
        pause(); /* until sfld stops this clone */
    return 0; /* not reached */
}

/* Dispatch ------------------------------------------------------------------------- */

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
} TOOLS[] = {
    {"sf-ticket", ticket_main}, {"sf-clone", clone_main}, {"sf-checkpoint", checkpoint_main},
    {"sf-join", join_main},     {"sf-kill", kill_main},   {"sf-exit", exit_main},
    {"sf-share", share_main},
};

int main(int argc, char **argv)
{
    const char *name = basename(argv[0]);

    if (strcmp(name, "sf-tools") == 0 && argc > 1) {
        argv++;
        argc--;
        name = argv[0];
    }
    for (size_t k = 0; k < sizeof TOOLS / sizeof TOOLS[0]; k++)
        if (strcmp(TOOLS[k].name, name) == 0)
            return TOOLS[k].run(argc, argv);
    fprintf(stderr, "sf-tools: error: no tool named %s (run as sf-ticket, sf-clone, "
                    "sf-checkpoint, sf-join, sf-kill, sf-exit or sf-share)\n", name);
    return 2;
}

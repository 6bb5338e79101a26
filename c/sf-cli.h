/* sf-cli.h: the command lines of the guest tools in C (sf-tools.c).
 *
 * The Python tools' click commands (sflib/cli/<tool>.py) are the tools' spec: the
 * man pages and the completion scripts are generated from them, and
 * tests/unit/test_guest_tools.py checks that each tool here takes the same options
 * and arguments. The syntax is click's too: options before, between or after the
 * arguments, --name=value or --name value, "--" ending the options, -h and --help;
 * a usage error is said as click says it, with exit status 2.
 */
#ifndef SF_CLI_H
#define SF_CLI_H

#include <stddef.h>

#define SFA_OPTS_MAX 8
#define SFA_ARGS_MAX 4

struct sfa_opt {
    const char *name;    /* "--json"; a flag pair is "--avoidance/--no-avoidance" */
    char letter;         /* a short name, as -q, or 0 */
    const char *metavar; /* what its value is, as TEXT; NULL for a flag */
    const char *env;     /* the environment variable that sets it, or NULL */
    const char *help;
};

struct sfa_arg {
    const char *metavar; /* N, TICKET */
    int optional;
    const char *help;
};

struct sfa_cmd {
    const char *name;    /* "sf-ticket"; a group's command: "put" */
    const char *summary; /* the first line of its help */
    const char *details; /* more paragraphs, or NULL */
    struct sfa_opt opts[SFA_OPTS_MAX];
    struct sfa_arg args[SFA_ARGS_MAX];
    const struct sfa_cmd *subs; /* a group's commands (sf-share), NULL-named last */
};

/* What a command line said: per option of the spec (by index) its value, "1" or
 * "0" for a flag ("0": the --no- side), NULL if neither given nor in the
 * environment; the arguments in order. */
struct sfa_line {
    const char *prog;    /* "sf-share put": for messages */
    const char *opt[SFA_OPTS_MAX];
    const char *arg[SFA_ARGS_MAX];
    int nargs;
    const struct sfa_cmd *cmd; /* the command parsed (a group's: its subcommand) */
    const struct sfa_cmd *group; /* the group of cmd, or NULL */
    const char *group_opt[SFA_OPTS_MAX]; /* the group's options, as opt */
};

/* Parses argv[1..argc) per cmd (and, for a group, its subcommand's). Prints the
 * help and exits 0 for -h or --help; says a usage error and exits 2. */
void sfa_parse(const struct sfa_cmd *cmd, int argc, char **argv, struct sfa_line *line);

/* The value of the option named name ("--json"), as in sfa_line.opt; a group's
 * options too. */
const char *sfa_get(const struct sfa_line *line, const char *name);
/* Whether flag name is on: "1", or unset and on by default (dflt). */
int sfa_flag(const struct sfa_line *line, const char *name, int dflt);

/* Says a usage error about line ("Error: ..." after the usage line) and exits 2. */
void sfa_usage_error(const struct sfa_line *line, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

#define SFA_NO_LIMIT __LONG_MAX__
/* An integer argument (index) in [low, high] (SFA_NO_LIMIT: no upper bound), or a
 * usage error as click's. */
long sfa_int_arg(const struct sfa_line *line, int index, long low, long high);

/* The tools' logging, as sflib.log: "prog: LEVEL: message" on stderr; debug only
 * with --debug, info not with --quiet. */
enum sfa_level { SFA_DEBUG, SFA_INFO, SFA_WARNING };
void sfa_log_setup(const char *prog, int debug, int quiet);
void sfa_log(enum sfa_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "prog: error: message" on stderr, and exit with code (sflib/exitcodes.py). */
void sfa_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

#endif

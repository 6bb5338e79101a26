/* sf-cli.c: the guest tools' command lines, parsed and shown as click does (sf-cli.h). */
#define _GNU_SOURCE
#include "sf-cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define WIDTH 79 /* the help's lines, as click's at 80 columns */

/* Showing ------------------------------------------------------------------------ */

static void usage_line(FILE *out, const char *prog, const struct sfa_cmd *cmd)
{
    fprintf(out, "Usage: %s [OPTIONS]", prog);
    for (int k = 0; k < SFA_ARGS_MAX && cmd->args[k].metavar; k++)
        fprintf(out, cmd->args[k].optional ? " [%s]" : " %s", cmd->args[k].metavar);
    if (cmd->subs)
        fputs(" COMMAND [ARGS]...", out);
    fputc('\n', out);
}

/* text from column col on, wrapped at WIDTH, later lines indented by indent. */
static void wrapped(const char *text, int col, int indent)
{
    const char *p = text;

    while (*p) {
        const char *end = p;
        const char *cut = NULL;
        while (*end && col + (end - p) < WIDTH) {
            if (*end == ' ')
                cut = end;
            end++;
        }
        if (!*end || !cut)
            cut = end;
        printf("%.*s\n", (int)(cut - p), p);
        p = *cut == ' ' ? cut + 1 : cut;
        if (*p)
            printf("%*s", indent, "");
        col = indent;
    }
}

static int opt_label(char *out, size_t size, const struct sfa_opt *o)
{
    char pair[64];
    const char *slash = strchr(o->name, '/');

    if (slash)
        snprintf(pair, sizeof pair, "%.*s / %s", (int)(slash - o->name), o->name, slash + 1);
    else
        snprintf(pair, sizeof pair, "%s", o->name);
    if (o->letter)
        return snprintf(out, size, "-%c, %s%s%s", o->letter, pair, o->metavar ? " " : "",
                        o->metavar ? o->metavar : "");
    return snprintf(out, size, "%s%s%s", pair, o->metavar ? " " : "",
                    o->metavar ? o->metavar : "");
}

static void two_columns(const char *label, int width, const char *help)
{
    printf("  %-*s", width, label);
    if (2 + (int)strlen(label) > 2 + width) {
        printf("\n%*s", width + 4, "");
    } else {
        printf("  ");
    }
    wrapped(help, width + 4, width + 4);
}

static void help(const char *prog, const struct sfa_cmd *cmd)
{
    char label[96], text[512];
    int width = (int)strlen("-h, --help");

    usage_line(stdout, prog, cmd);
    printf("\n  ");
    wrapped(cmd->summary, 2, 2);
    if (cmd->details) {
        printf("\n  ");
        wrapped(cmd->details, 2, 2);
    }
    for (int k = 0; k < SFA_OPTS_MAX && cmd->opts[k].name; k++) {
        int n = opt_label(label, sizeof label, &cmd->opts[k]);
        width = n > width && n < 30 ? n : width;
    }
    for (int k = 0; k < SFA_ARGS_MAX && cmd->args[k].metavar; k++) {
        int n = (int)strlen(cmd->args[k].metavar) + 2 * cmd->args[k].optional;
        width = n > width ? n : width;
    }
    if (cmd->args[0].metavar) {
        printf("\nArguments:\n");
        for (int k = 0; k < SFA_ARGS_MAX && cmd->args[k].metavar; k++) {
            const struct sfa_arg *a = &cmd->args[k];
            snprintf(label, sizeof label, a->optional ? "[%s]" : "%s", a->metavar);
            snprintf(text, sizeof text, "%s%s", a->help, a->optional ? "" : "  [required]");
            two_columns(label, width, text);
        }
    }
    printf("\nOptions:\n");
    for (int k = 0; k < SFA_OPTS_MAX && cmd->opts[k].name; k++) {
        const struct sfa_opt *o = &cmd->opts[k];
        opt_label(label, sizeof label, o);
        if (o->env)
            snprintf(text, sizeof text, "%s  [env var: %s]", o->help, o->env);
        else
            snprintf(text, sizeof text, "%s", o->help);
        two_columns(label, width, text);
    }
    two_columns("-h, --help", width, "Show this message and exit.");
    if (cmd->subs) {
        printf("\nCommands:\n");
        for (const struct sfa_cmd *s = cmd->subs; s->name; s++)
            two_columns(s->name, 5, s->summary);
    }
}

void sfa_usage_error(const struct sfa_line *line, const char *fmt, ...)
{
    va_list ap;

    usage_line(stderr, line->prog, line->cmd);
    fprintf(stderr, "Try '%s --help' for help.\n\nError: ", line->prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

/* Parsing ------------------------------------------------------------------------ */

/* The option of cmd named name (either side of a pair); *negative for a --no-. */
static int find_opt(const struct sfa_cmd *cmd, const char *name, size_t len, int *negative)
{
    for (int k = 0; k < SFA_OPTS_MAX && cmd->opts[k].name; k++) {
        const char *n = cmd->opts[k].name, *slash = strchr(n, '/');
        size_t first = slash ? (size_t)(slash - n) : strlen(n);
        if (len == first && strncmp(n, name, len) == 0) {
            *negative = 0;
            return k;
        }
        if (slash && strlen(slash + 1) == len && strncmp(slash + 1, name, len) == 0) {
            *negative = 1;
            return k;
        }
    }
    return -1;
}

static int find_letter(const struct sfa_cmd *cmd, char letter)
{
    for (int k = 0; k < SFA_OPTS_MAX && cmd->opts[k].name; k++)
        if (cmd->opts[k].letter == letter)
            return k;
    return -1;
}

/* A boolean from the environment, as click reads one: "1" or "0", NULL if unset. */
static const char *env_bool(const struct sfa_line *line, const struct sfa_opt *o, const char *v)
{
    static const char *const yes[] = {"1", "true", "t", "yes", "y", "on"};
    static const char *const no[] = {"0", "false", "f", "no", "n", "off"};

    for (size_t k = 0; k < sizeof yes / sizeof yes[0]; k++) {
        if (strcasecmp(v, yes[k]) == 0)
            return "1";
        if (strcasecmp(v, no[k]) == 0)
            return "0";
    }
    if (!*v)
        return NULL;
    sfa_usage_error(line, "Invalid value for '%s': '%s' is not a valid boolean.", o->name, v);
}

/* argv[*i], a long option: its value into line; may take argv[*i + 1]. */
static void long_opt(struct sfa_line *line, int argc, char **argv, int *i)
{
    const char *a = argv[*i], *eq = strchr(a, '=');
    size_t len = eq ? (size_t)(eq - a) : strlen(a);
    int negative, k = find_opt(line->cmd, a, len, &negative);

    if (k < 0)
        sfa_usage_error(line, "No such option: %.*s", (int)len, a);
    const struct sfa_opt *o = &line->cmd->opts[k];
    if (!o->metavar) {
        if (eq)
            sfa_usage_error(line, "Option '%.*s' does not take a value.", (int)len, a);
        line->opt[k] = negative ? "0" : "1";
    } else if (eq) {
        line->opt[k] = eq + 1;
    } else if (*i + 1 < argc) {
        line->opt[k] = argv[++*i];
    } else {
        sfa_usage_error(line, "Option '%s' requires an argument.", a);
    }
}

/* argv[*i], short options (-q, -qh): flags only, or one taking the rest or the next. */
static void short_opts(struct sfa_line *line, int argc, char **argv, int *i)
{
    for (const char *p = argv[*i] + 1; *p; p++) {
        int k = find_letter(line->cmd, *p);
        if (k < 0)
            sfa_usage_error(line, "No such option: -%c", *p);
        if (!line->cmd->opts[k].metavar) {
            line->opt[k] = "1";
            continue;
        }
        if (p[1])
            line->opt[k] = p + 1;
        else if (*i + 1 < argc)
            line->opt[k] = argv[++*i];
        else
            sfa_usage_error(line, "Option '-%c' requires an argument.", *p);
        return;
    }
}

static int is_help(const char *a)
{
    return strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0;
}

/* Parses argv[from..argc) per line->cmd; for a group, stops at its command's name
 * and returns its index in argv (else argc). */
static int parse_part(struct sfa_line *line, int from, int argc, char **argv)
{
    int options = 1;

    for (int i = from; i < argc; i++) {
        const char *a = argv[i];
        if (options && is_help(a)) {
            help(line->prog, line->cmd);
            exit(0);
        }
        if (options && strcmp(a, "--") == 0) {
            options = 0;
        } else if (options && strncmp(a, "--", 2) == 0) {
            long_opt(line, argc, argv, &i);
        } else if (options && a[0] == '-' && a[1]) {
            short_opts(line, argc, argv, &i);
        } else if (line->cmd->subs) {
            return i;
        } else if (line->nargs < SFA_ARGS_MAX && line->cmd->args[line->nargs].metavar) {
            line->arg[line->nargs++] = a;
        } else {
            sfa_usage_error(line, "Got unexpected extra argument (%s)", a);
        }
    }
    return argc;
}

/* The environment's values of the options not given; then the arguments' count. */
static void finish_part(struct sfa_line *line)
{
    const struct sfa_cmd *cmd = line->cmd;

    for (int k = 0; k < SFA_OPTS_MAX && cmd->opts[k].name; k++) {
        const char *v = cmd->opts[k].env ? getenv(cmd->opts[k].env) : NULL;
        if (line->opt[k] || !v)
            continue;
        line->opt[k] = cmd->opts[k].metavar ? (*v ? v : NULL) : env_bool(line, &cmd->opts[k], v);
    }
    if (line->nargs < SFA_ARGS_MAX && cmd->args[line->nargs].metavar &&
        !cmd->args[line->nargs].optional)
        sfa_usage_error(line, "Missing argument '%s'.", cmd->args[line->nargs].metavar);
}

void sfa_parse(const struct sfa_cmd *cmd, int argc, char **argv, struct sfa_line *line)
{
    static char prog[96];
    int at;

    memset(line, 0, sizeof *line);
    line->prog = cmd->name;
    line->cmd = cmd;
    at = parse_part(line, 1, argc, argv);
    finish_part(line);
    if (!cmd->subs)
        return;
    if (at >= argc)
        sfa_usage_error(line, "Missing command.");
    for (const struct sfa_cmd *s = cmd->subs; s->name; s++)
        if (strcmp(s->name, argv[at]) == 0) {
            memcpy(line->group_opt, line->opt, sizeof line->opt);
            memset(line->opt, 0, sizeof line->opt);
            snprintf(prog, sizeof prog, "%s %s", cmd->name, s->name);
            line->prog = prog;
            line->group = cmd;
            line->cmd = s;
            parse_part(line, at + 1, argc, argv);
            finish_part(line);
            return;
        }
    sfa_usage_error(line, "No such command '%s'.", argv[at]);
}

const char *sfa_get(const struct sfa_line *line, const char *name)
{
    int negative, k = find_opt(line->cmd, name, strlen(name), &negative);

    if (k >= 0)
        return line->opt[k];
    if (line->group) {
        k = find_opt(line->group, name, strlen(name), &negative);
        if (k >= 0)
            return line->group_opt[k];
    }
    return NULL;
}

int sfa_flag(const struct sfa_line *line, const char *name, int dflt)
{
    const char *v = sfa_get(line, name);

    return v ? strcmp(v, "1") == 0 : dflt;
}

long sfa_int_arg(const struct sfa_line *line, int index, long low, long high)
{
    const struct sfa_arg *a = &line->cmd->args[index];
    const char *text = line->arg[index];
    char *end;
    long v;

    errno = 0;
    v = strtol(text, &end, 10);
    if (!*text || *end || errno)
        sfa_usage_error(line, "Invalid value for '%s%s%s': '%s' is not a valid integer.",
                        a->optional ? "[" : "", a->metavar, a->optional ? "]" : "", text);
    if (v < low || v > high) {
        if (high == SFA_NO_LIMIT)
            sfa_usage_error(line, "Invalid value for '%s%s%s': %ld is not in the range x>=%ld.",
                            a->optional ? "[" : "", a->metavar, a->optional ? "]" : "", v, low);
        sfa_usage_error(line, "Invalid value for '%s%s%s': %ld is not in the range %ld<=x<=%ld.",
                        a->optional ? "[" : "", a->metavar, a->optional ? "]" : "", v, low,
                        high);
    }
    return v;
}

/* Saying ------------------------------------------------------------------------- */

static const char *log_prog = "sf-tools";
static enum sfa_level log_level = SFA_INFO;

void sfa_log_setup(const char *prog, int debug, int quiet)
{
    log_prog = prog;
    log_level = debug ? SFA_DEBUG : quiet ? SFA_WARNING : SFA_INFO;
}

void sfa_log(enum sfa_level level, const char *fmt, ...)
{
    static const char *const names[] = {"DEBUG", "INFO", "WARNING"};
    va_list ap;

    if (level < log_level)
        return;
    fprintf(stderr, "%s: %s: ", log_prog, names[level]);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void sfa_fail(int code, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: error: ", log_prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

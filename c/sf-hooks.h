/* sf-hooks.h: what a member of a family does after a fork, before sf_clone returns
 * (internal to libsnowflock): as sflib.guest.api.reseed and sflib.guest.hooks. */
#ifndef SF_HOOKS_H
#define SF_HOOKS_H

#include "sf-json.h"

#define SFH_DEFAULT_DIR "/etc/snowflock/hooks.d"
#define SFH_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define SFH_TIMEOUT_MS 120000 /* per hook, as sflib.guest.hooks.TIMEOUT */
#define SFH_GRACE_MS 3000     /* from SIGTERM to SIGKILL, as sflib.run.KILL_GRACE */

/* Mixes the hex seed of a fork's reply into the kernel's RNG and reseeds it now
 * (write to /dev/urandom, then RNDRESEEDCRNG, which needs root). A failure is
 * only a warning on stderr; a seed that is no hex string is ignored. */
SF_INTERNAL void sfh_reseed(const char *seed);

/* Whether name may be a hook's: ^[A-Za-z0-9_-]+$. */
SF_INTERNAL int sfh_name_ok(const char *name);

/* The environment of a hook: SF_* of environ, PATH, SF_HOOKS_EVENT, SF_HOOKS_PHASE,
 * and SF_<KEY>=value per member of identity (an object, or NULL), later entries
 * replacing earlier ones. A NULL-terminated malloc'd array of malloc'd strings, or
 * NULL (ENOMEM); free it with sfh_free_env. */
SF_INTERNAL char **sfh_environment(char **environ_, const char *event, const char *phase,
                                   const struct sfj *identity);
SF_INTERNAL void sfh_free_env(char **env);

/* Runs the hooks in <hooks_dir>/<event>-<phase>.d in order, each with timeout_ms; hooks_dir
 * NULL means $SF_HOOKS_DIR or SFH_DEFAULT_DIR. Each failure is reported on stderr
 * ("snowflock: hook PATH failed: ...") and the rest still run. Returns how many
 * failed, or -1 if the folder could not be listed or memory ran out (said on
 * stderr too). A missing folder has no hooks. */
SF_INTERNAL int sfh_run_hooks(const char *hooks_dir, const char *event, const char *phase,
                              const struct sfj *identity, int timeout_ms);

/* Where a tool's hooks say what they did: each line of a hook's output ("NAME:
 * line", warning 0) and each failure ("hook PATH failed: why", warning 1). */
typedef void (*sfh_log_fn)(int warning, const char *message);

/* sfh_run_hooks, saying it all through log (NULL: as sfh_run_hooks, which says only
 * the failures, and not what the hooks wrote), as sflib.guest.hooks logs. */
SF_INTERNAL int sfh_run_hooks_logged(const char *hooks_dir, const char *event, const char *phase,
                                     const struct sfj *identity, int timeout_ms, sfh_log_fn log);

#endif

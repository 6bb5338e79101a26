/* sf-call.h: one request to sfld, and what follows a fork; the core of the calls of
 * snowflock.h, internal to libsnowflock and shared with the tools (sf-tools.c),
 * which say errors in their own words. */
#ifndef SF_CALL_H
#define SF_CALL_H

#include <stddef.h>

#include "sf-hooks.h"
#include "sf-json.h"
#include "sf-proto.h"

#define SFC_WHY_MAX 1024

/* Sends op with args to sfld and waits for its reply: 0 and the result into *result
 * (to sfj_free), or a negative SF_E* code with why[size] saying it: sfld's message
 * ("message (hint)"), where no XenStore was found, or the failed system call. */
SF_INTERNAL int sfc_request(const char *op, const struct sfp_arg *args, size_t nargs,
                            struct sfj *result, char *why, size_t size);

/* Whether sfld can be reached at all: 0, or as sfc_request. Connects and closes. */
SF_INTERNAL int sfc_reachable(char *why, size_t size);

/* What every member of a family does after a fork, before the call returns: reseed
 * the kernel's RNG with seed (NULL: none); in a clone (id > 0) run the clone-post
 * hooks of hooks_dir (NULL: $SF_HOOKS_DIR or the default), saying what they did
 * through log (sfh_run_hooks_logged; NULL: failures on stderr). */
SF_INTERNAL void sfc_after_fork(const char *seed, int id, const char *hooks_dir, sfh_log_fn log);

#endif

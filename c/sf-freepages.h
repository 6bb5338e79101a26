/* sf-freepages.h: the avoidance heuristic's guest half in C (internal), as
 * sflib/guest/freepages.py: take most of the guest's free memory, pin it, and report
 * its frames, so that clones never fetch those pages. The report's format is that
 * module's (zlib of little-endian uint64 (first, count) runs, base64 in chunks). */
#ifndef SF_FREEPAGES_H
#define SF_FREEPAGES_H

#include <stddef.h>
#include <stdint.h>

#include "sf-json.h"

#define SFF_LOCK "/run/snowflock/avoidance.lock" /* one free-page holder at a time */
#define SFF_KEY_MAX 48

struct sff_held {
    void *region;  /* the memory taken, or NULL */
    size_t size;
    uint64_t *runs; /* (first, count) pairs, sorted */
    size_t nruns, pages;
    int lock_fd;   /* holding SFF_LOCK, or -1 */
    char key[SFF_KEY_MAX]; /* the report's XenStore key once written, else "" */
    double took_ms, encoded_ms, written_ms, released_ms; /* for --debug */
    size_t chunks;
};

/* Takes the pages and writes their report: 0 with h->key set; 0 with h->key ""
 * when there is no report to make (little free memory, or another process holds
 * the lock); or -1 with why[size] saying what failed (a warning: the fork goes on
 * without a report). Whatever it returns, sff_release(h) afterwards. */
SF_INTERNAL int sff_take(struct sff_held *h, char *why, size_t size);

/* Gives the pages back, drops the lock, and removes the report if h->key is still
 * set: the caller clears it once sfld has answered (sfld removes every report it
 * is sent, whatever its answer). */
SF_INTERNAL void sff_release(struct sff_held *h);

/* The pure parts, for sf-unittest.c: (first, count) runs of n sorted-or-not frame
 * numbers into runs (room for 2n), returning how many runs; the margin of free
 * memory left to a guest of total bytes; base64 of in[n] into out (4*ceil(n/3)+1). */
SF_INTERNAL size_t sff_runs(uint64_t *pfns, size_t n, uint64_t *runs);
SF_INTERNAL uint64_t sff_margin(uint64_t total);
SF_INTERNAL size_t sff_base64(const unsigned char *in, size_t n, char *out);

#endif

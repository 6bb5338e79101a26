/* sf-freepages.c: the avoidance heuristic's guest half (sf-freepages.h). Why each
 * step is there is told in sflib/guest/freepages.py, whose behaviour this is. */
#define _GNU_SOURCE
#include "sf-freepages.h"

#include "sf-xs.h"
#include "snowflock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define PAGE 4096u
#define CHUNK 1536u                /* base64 makes 2048 of it: a guest's largest value */
#define MIN_MARGIN (24ull << 20)   /* free memory left to the guest, at least... */
#define MARGIN_PERMILLE 100        /* ...or this share of its memory */
#define PFN_MASK ((1ull << 55) - 1)
#define PRESENT (1ull << 63)
#define FREEPAGES "snowflock/freepages"
#define UNEVICTABLE_COMPACTION "/proc/sys/vm/compact_unevictable_allowed"

static double now_ms(void)
{
    struct timespec ts;

    (void)clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int failed(char *why, size_t size, const char *what)
{
    snprintf(why, size, "%s: %s", what, strerror(errno));
    return -1;
}

/* The pure parts ------------------------------------------------------------------ */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return (x > y) - (x < y);
}

size_t sff_runs(uint64_t *pfns, size_t n, uint64_t *runs)
{
    size_t k = 0;

    qsort(pfns, n, sizeof *pfns, cmp_u64);
    for (size_t i = 0; i < n; i++) {
        if (k && runs[2 * k - 2] + runs[2 * k - 1] == pfns[i])
            runs[2 * k - 1]++;
        else if (!k || runs[2 * k - 2] + runs[2 * k - 1] < pfns[i]) {
            runs[2 * k] = pfns[i];
            runs[2 * k + 1] = 1;
            k++;
        } /* else a duplicate, inside the last run */
    }
    return k;
}

uint64_t sff_margin(uint64_t total)
{
    uint64_t share = total / 1000 * MARGIN_PERMILLE;

    return share > MIN_MARGIN ? share : MIN_MARGIN;
}

size_t sff_base64(const unsigned char *in, size_t n, char *out)
{
    static const char ABC[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;

    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = ABC[v >> 18 & 63];
        out[o++] = ABC[v >> 12 & 63];
        out[o++] = i + 1 < n ? ABC[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? ABC[v & 63] : '=';
    }
    out[o] = '\0';
    return o;
}

/* Taking the pages ---------------------------------------------------------------- */

/* How much to take: MemFree less the margin, in whole pages; 0 if there is little. */
static int wanted(size_t *out, char *why, size_t size)
{
    unsigned long long total = 0, free_kb = 0, kb;
    char line[256], name[64];
    FILE *info = fopen("/proc/meminfo", "re");

    if (!info)
        return failed(why, size, "cannot read /proc/meminfo");
    while (fgets(line, sizeof line, info))
        if (sscanf(line, "%63[^:]: %llu kB", name, &kb) == 2) {
            if (strcmp(name, "MemTotal") == 0)
                total = kb << 10;
            else if (strcmp(name, "MemFree") == 0)
                free_kb = kb << 10;
        }
    (void)fclose(info); /* read-only: nothing to lose */
    uint64_t margin = sff_margin(total);
    *out = free_kb > margin ? (size_t)((free_kb - margin) / PAGE * PAGE) : 0;
    return 0;
}

/* One holder at a time: two that each took most of the free memory would run the
 * guest out of it. 1 with the lock held, 0 if another process holds it, -1. */
static int lock(struct sff_held *h, char *why, size_t size)
{
    if (mkdir("/run/snowflock", 0755) < 0 && errno != EEXIST)
        return failed(why, size, "cannot make /run/snowflock");
    h->lock_fd = open(SFF_LOCK, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (h->lock_fd < 0)
        return failed(why, size, "cannot open " SFF_LOCK);
    while (flock(h->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EINTR)
            continue;
        if (errno != EWOULDBLOCK)
            return failed(why, size, "cannot lock " SFF_LOCK);
        (void)close(h->lock_fd); /* nothing written */
        h->lock_fd = -1;
        return 0;
    }
    return 1;
}

/* Maps and takes the pages: huge ones where the guest's THP setting lets a region
 * ask for them (one fault each, not 512: under TCG a fault costs some 10 us), and
 * mlock() faults in what it locks. Where the kernel zeroes pages when they are
 * freed (init_on_free=1, as SnowFlock's VMs boot), taking them writes nothing: no
 * page of guest RAM the host has not backed gets backed now. */
static int populate(struct sff_held *h, char *why, size_t size)
{
    h->region = mmap(NULL, h->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (h->region == MAP_FAILED) {
        h->region = NULL;
        return failed(why, size, "cannot map the free memory");
    }
    if (madvise(h->region, h->size, MADV_HUGEPAGE) < 0 && errno != EINVAL)
        return failed(why, size, "madvise(MADV_HUGEPAGE)"); /* EINVAL: no THP here */
    if (mlock(h->region, h->size) < 0)
        return failed(why, size, "cannot lock the free pages taken");
    return 0;
}

/* Keeps the kernel from moving the pages to other frames while they are held
 * (freepages._pin): khugepaged, which copies small pages into a new huge page, is
 * kept off by MADV_NOHUGEPAGE (the huge pages taken stay); compaction, by the lock
 * and vm.compact_unevictable_allowed=0. */
static int pin(struct sff_held *h, char *why, size_t size)
{
    char value[8] = "";
    int fd;

    if (madvise(h->region, h->size, MADV_NOHUGEPAGE) < 0)
        return failed(why, size, "madvise(MADV_NOHUGEPAGE)");
    fd = open(UNEVICTABLE_COMPACTION, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, value, sizeof value - 1);
        if (n > 0 && value[0] != '0' && pwrite(fd, "0\n", 2, 0) != 2) {
            (void)close(fd);
            return failed(why, size, "cannot set " UNEVICTABLE_COMPACTION " to 0");
        }
        (void)close(fd);
    }
    return 0;
}

/* The frames behind the region, from /proc/self/pagemap, as sorted runs. */
static int frames(struct sff_held *h, char *why, size_t size)
{
    size_t pages = h->size / PAGE, n = 0, got = 0;
    uint64_t *entries = malloc(pages * sizeof *entries);
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

    h->runs = malloc(2 * pages * sizeof *h->runs);
    if (!entries || !h->runs || fd < 0) {
        int rc = failed(why, size, fd < 0 ? "cannot open /proc/self/pagemap" : "malloc");
        free(entries);
        if (fd >= 0)
            (void)close(fd);
        return rc;
    }
    off_t at = (off_t)((uintptr_t)h->region / PAGE * 8);
    while (got < pages * 8) {
        ssize_t r = pread(fd, (char *)entries + got, pages * 8 - got, at + (off_t)got);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            if (r == 0)
                errno = EIO;
            (void)close(fd);
            free(entries);
            return failed(why, size, "cannot read /proc/self/pagemap");
        }
        got += (size_t)r;
    }
    (void)close(fd);
    for (size_t i = 0; i < pages; i++)
        if (entries[i] & PRESENT && entries[i] & PFN_MASK)
            entries[n++] = entries[i] & PFN_MASK;
    h->pages = n;
    h->nruns = sff_runs(entries, n, h->runs);
    free(entries);
    return 0;
}

/* Writing the report -------------------------------------------------------------- */

static int write_chunks(struct sff_held *h, const unsigned char *packed, size_t len, char *why,
                        size_t size)
{
    char path[SFF_KEY_MAX + 24], value[2 * CHUNK + 8];
    struct sfx x;
    int rc = sfx_open(&x);

    for (size_t i = 0; rc == 0 && i * CHUNK < len; i++, h->chunks++) {
        size_t n = len - i * CHUNK < CHUNK ? len - i * CHUNK : CHUNK;
        size_t vlen = sff_base64(packed + i * CHUNK, n, value);
        snprintf(path, sizeof path, "%s/%zu", h->key, i);
        rc = sfx_write(&x, path, value, vlen);
    }
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/chunks", h->key);
        snprintf(value, sizeof value, "%zu", h->chunks);
        rc = sfx_write(&x, path, value, strlen(value));
    }
    int err = errno;
    if (x.fd >= 0)
        sfx_close(&x);
    errno = err;
    return rc < 0 ? failed(why, size, "cannot write the free-page report") : 0;
}

static int report(struct sff_held *h, char *why, size_t size)
{
    unsigned char rnd[4];
    size_t raw_len = h->nruns * 16;
    uLongf len = compressBound(raw_len);
    unsigned char *packed = malloc(len);

    if (!packed)
        return failed(why, size, "malloc");
    /* x86-64 is little-endian: the runs are the report's uint64 array as they lie. */
    if (compress2(packed, &len, (const Bytef *)h->runs, raw_len, 9) != Z_OK) {
        free(packed);
        errno = ENOMEM;
        return failed(why, size, "cannot compress the free-page report");
    }
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        free(packed);
        return failed(why, size, "getrandom");
    }
    snprintf(h->key, sizeof h->key, "%s/%02x%02x%02x%02x", FREEPAGES, rnd[0], rnd[1], rnd[2],
             rnd[3]);
    h->encoded_ms = now_ms();
    int rc = write_chunks(h, packed, len, why, size);
    free(packed);
    h->written_ms = now_ms();
    return rc;
}

int sff_take(struct sff_held *h, char *why, size_t size)
{
    double start = now_ms();
    int rc;

    memset(h, 0, sizeof *h);
    h->lock_fd = -1;
    rc = lock(h, why, size);
    if (rc <= 0)
        return rc;
    if (wanted(&h->size, why, size) < 0)
        return -1;
    if (h->size == 0)
        return 0; /* little free memory: nothing worth reporting */
    if (populate(h, why, size) < 0 || pin(h, why, size) < 0 || frames(h, why, size) < 0)
        return -1;
    h->took_ms = now_ms() - start;
    start = now_ms();
    if (report(h, why, size) < 0)
        return -1; /* h->key stays: sff_release removes what was written */
    h->written_ms -= h->encoded_ms;
    h->encoded_ms -= start;
    return 0;
}

void sff_release(struct sff_held *h)
{
    double start = now_ms();
    struct sfx x;

    if (h->region && munmap(h->region, h->size) < 0)
        perror("snowflock: munmap of the free pages"); /* they stay taken until exit */
    h->region = NULL;
    h->released_ms = now_ms() - start;
    if (h->key[0] && sfx_open(&x) == 0) { /* a report sfld did not take (it refused early) */
        if (sfx_rm(&x, h->key) < 0 && errno != ENOENT)
            fprintf(stderr, "snowflock: free-page report %s not removed: %s\n", h->key,
                    strerror(errno));
        sfx_close(&x);
    }
    h->key[0] = '\0';
    if (h->lock_fd >= 0)
        (void)close(h->lock_fd); /* drops the lock */
    h->lock_fd = -1;
    free(h->runs);
    h->runs = NULL;
}

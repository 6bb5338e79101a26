/* wptrack.c: an LD_PRELOAD shim that has the kernel note which pages of guest RAM
 * QEMU writes, so that sfld can copy them into a fork's image before the pause
 * instead of in it (sflib.fork.images).
 *
 * How: when the program maps the file named by SF_WPTRACK, the mapping is
 * registered with a userfaultfd in asynchronous write-protect mode (Linux 6.7:
 * UFFD_FEATURE_WP_ASYNC) and write-protected whole. A write then only clears the
 * page's protection, in the kernel: nobody reads the userfaultfd. sfld reads and
 * re-arms the protection from outside, with PAGEMAP_SCAN on /proc/PID/pagemap
 * (PAGE_IS_WRITTEN, PM_SCAN_WP_MATCHING).
 *
 * Where the kernel lacks it, the mapping is left as it is and one line says why
 * on stderr; sfld's scan then finds the mapping untracked and falls back to the
 * pages QEMU has its own copies of.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux 6.7's <linux/userfaultfd.h>; Debian 12's headers are older. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#define ENV "SF_WPTRACK"

static void say(const char *what)
{
    fprintf(stderr, "wptrack: %s: %s; RAM writes not tracked\n", what, strerror(errno));
}

/* Whether descriptor fd is the file SF_WPTRACK names. */
static int is_tracked_file(int fd)
{
    const char *path = getenv(ENV);
    struct stat want, got;

    if (fd < 0 || path == NULL || *path == '\0')
        return 0;
    if (stat(path, &want) != 0 || fstat(fd, &got) != 0)
        return 0;
    return want.st_dev == got.st_dev && want.st_ino == got.st_ino;
}

/* Register [addr, addr + length) for asynchronous write protection and protect
 * it. The userfaultfd stays open for the life of the process: closing it would
 * end the registration. */
static void track(void *addr, size_t length)
{
    struct uffdio_api api = {
        .api = UFFD_API,
        .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
                    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    };
    struct uffdio_register reg = {
        .range = {.start = (unsigned long)addr, .len = length},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    struct uffdio_writeprotect protect = {
        .range = {.start = (unsigned long)addr, .len = length},
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };
    int saved = errno;
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

    if (uffd < 0) {
        say("userfaultfd");
    } else if (ioctl(uffd, UFFDIO_API, &api) != 0) {
        say("UFFDIO_API (asynchronous write protection)");
        close(uffd);
    } else if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
        say("UFFDIO_REGISTER");
        close(uffd);
    } else if (ioctl(uffd, UFFDIO_WRITEPROTECT, &protect) != 0) {
        say("UFFDIO_WRITEPROTECT");
        close(uffd); /* unregisters: a half-armed mapping would report every page */
    }
    errno = saved; /* the caller's mmap succeeded */
}

void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    void *mapped = (void *)syscall(SYS_mmap, addr, length, prot, flags, fd, offset);

    if (mapped != MAP_FAILED && (flags & MAP_PRIVATE) && is_tracked_file(fd))
        track(mapped, length);
    return mapped;
}

/* What QEMU calls (off_t is 64 bits on x86-64 either way). */
void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    return mmap(addr, length, prot, flags, fd, offset);
}

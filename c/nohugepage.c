/* nohugepage.c: an LD_PRELOAD shim that keeps a program from asking for transparent
 * huge pages with madvise(MADV_HUGEPAGE); every other madvise goes through.
 *
 * Why: QEMU 7.2 advises MADV_HUGEPAGE on all guest RAM. On a private mapping of a
 * file, the kernel then reads 4 MiB around every page fault, even with readahead
 * off. A clone whose RAM is a memtap file (fetched over the network on first touch)
 * would pull 1024 pages for each page it touches. sfld preloads this into those
 * QEMUs only.
 */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int madvise(void *addr, size_t length, int advice)
{
    if (advice == MADV_HUGEPAGE)
        return 0; /* a hint: declining it is always allowed */
    return (int)syscall(SYS_madvise, addr, length, advice);
}

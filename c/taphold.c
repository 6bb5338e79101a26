/* taphold.c: an LD_PRELOAD shim that lets a QEMU share its VM's tap with another
 * QEMU of the same VM without touching what the other one uses (sflib.net.tap).
 *
 * A VM's next QEMU starts while the VM still runs in its current one, on the same
 * tap (sflib.fork.standby). Left alone, the new QEMU would
 *   - poll the tap and read the first frame that arrives, which it cannot deliver
 *     to a guest it does not run yet: the running guest never sees that frame;
 *   - set the tap's virtio-net header size to its new card's, and every frame
 *     would be cut wrong both ways until someone set it back;
 *   - turn the tap's offloads off.
 * The header size and the offloads belong to the tap, not to a descriptor.
 *
 * SF_TAPHOLD="FD:FILE" names the tap's descriptor and a flag file that sfld writes.
 * While the file's first byte is '1', the tap is held: poll() and ppoll() leave
 * the descriptor's events out (frames wait in the tap's queue for whichever QEMU
 * reads next), and TUNSETVNETHDRSZ and TUNSETOFFLOAD on it succeed without doing
 * anything. sfld releases a new QEMU's hold as it loads the VM's state, and holds
 * the old one's as it stops it, so no frame is read by a QEMU that drops it.
 *
 * The file is mapped shared once, at start-up: checking it costs a memory read,
 * not a system call. Without SF_TAPHOLD, or where the file cannot be mapped (one
 * line on stderr says why), the shim does nothing.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define ENV "SF_TAPHOLD"

static int tap_fd = -1;
static const volatile unsigned char *flag; /* the flag file's first byte, mapped */

static void say(const char *what, const char *why)
{
    fprintf(stderr, "taphold: %s: %s; the tap is never held\n", what, why);
}

__attribute__((constructor)) static void map_flag(void)
{
    const char *spec = getenv(ENV);
    char *path = NULL;
    long fd;
    int file;
    void *mapped;
    int saved = errno;

    if (spec == NULL || *spec == '\0')
        return;
    errno = 0;
    fd = strtol(spec, &path, 10);
    if (errno != 0 || path == spec || *path != ':' || fd < 0 || fd > 65535) {
        say(ENV, "not DESCRIPTOR:FILE");
        errno = saved;
        return;
    }
    path++;
    file = open(path, O_RDONLY | O_CLOEXEC);
    if (file < 0) {
        say(path, strerror(errno));
        errno = saved;
        return;
    }
    mapped = mmap(NULL, 1, PROT_READ, MAP_SHARED, file, 0);
    if (mapped == MAP_FAILED)
        say(path, strerror(errno));
    if (close(file) != 0)
        say(path, strerror(errno));
    if (mapped != MAP_FAILED) {
        flag = mapped;
        tap_fd = (int)fd;
    }
    errno = saved;
}

static int held(int fd)
{
    return flag != NULL && fd == tap_fd && *flag == '1';
}

/* The tap's entry, if it is in fds and held: its events are cleared, and *saved
 * has them, for put_back. */
static struct pollfd *leave_out(struct pollfd *fds, nfds_t nfds, short *saved)
{
    nfds_t i;

    if (flag == NULL || *flag != '1')
        return NULL;
    for (i = 0; i < nfds; i++) {
        if (fds[i].fd == tap_fd) {
            *saved = fds[i].events;
            fds[i].events = 0; /* errors and hang-ups are still reported */
            return &fds[i];
        }
    }
    return NULL;
}

static void put_back(struct pollfd *entry, short saved)
{
    if (entry != NULL)
        entry->events = saved;
}

int ppoll(struct pollfd *fds, nfds_t nfds, const struct timespec *timeout,
          const sigset_t *sigmask)
{
    static int (*real)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
    short saved = 0;
    struct pollfd *entry;
    int ready, error;

    if (real == NULL)
        real = dlsym(RTLD_NEXT, "ppoll");
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    entry = leave_out(fds, nfds, &saved);
    ready = real(fds, nfds, timeout, sigmask);
    error = errno;
    put_back(entry, saved);
    errno = error;
    return ready;
}

int poll(struct pollfd *fds, nfds_t nfds, int timeout)
{
    static int (*real)(struct pollfd *, nfds_t, int);
    short saved = 0;
    struct pollfd *entry;
    int ready, error;

    if (real == NULL)
        real = dlsym(RTLD_NEXT, "poll");
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    entry = leave_out(fds, nfds, &saved);
    ready = real(fds, nfds, timeout);
    error = errno;
    put_back(entry, saved);
    errno = error;
    return ready;
}

int ioctl(int fd, unsigned long request, ...)
{
    static int (*real)(int, unsigned long, ...);
    va_list args;
    void *argument;

    va_start(args, request);
    argument = va_arg(args, void *);
    va_end(args);
    if ((request == TUNSETVNETHDRSZ || request == TUNSETOFFLOAD) && held(fd))
        return 0; /* the running QEMU's settings stay */
    if (real == NULL)
        real = dlsym(RTLD_NEXT, "ioctl");
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    return real(fd, request, argument);
}

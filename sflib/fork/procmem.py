"""Another process's memory, read the fast way (DESIGN §2, 5): the two system
calls that keep the pause of a later fork short.

- PAGEMAP_SCAN (an ioctl on /proc/PID/pagemap, Linux 6.7) has the kernel itself
  return the runs of pages that are the process's own copies, instead of 8 bytes
  per page of RAM read and decoded here (12 ms at 256 MiB, 18 ms at 2 GiB).
- process_vm_readv copies up to IOV_MAX runs of QEMU's pages straight into a
  shared mapping of the image file, in one call, instead of a seek, a read and a
  write per run through /proc/PID/mem (about 6 us a page).

Each raises Unsupported where the kernel lacks it; sflib.fork.images then falls
back to the portable way. Everything here blocks: callers run it in a thread.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os
from pathlib import Path

PAGE = 4096
IOV_MAX = 1024  # iovecs per process_vm_readv
SCAN_REGIONS = 4096  # page_region entries per PAGEMAP_SCAN call

# <linux/fs.h>: _IOWR('f', 16, struct pm_scan_arg), and the page categories.
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16
PAGE_IS_WRITTEN = 1 << 1  # not write-protected: written since the last protection
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages found, in the same walk
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.process_vm_readv.restype = ctypes.c_ssize_t
_LIBC.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]  # fmt: skip
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


class Unsupported(Exception):
    """The kernel lacks the call (or refuses it for this process)."""


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]  # fmt: skip


def own_runs(pid: int, start: int, end: int,
             within: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:  # fmt: skip
    """(first, count) page runs, relative to start, of process pid's mapping
    [start, end) that are its own copies: present and not file pages, or swapped
    (as sflib.fork.images.own_page_runs reads them from the page map). within:
    only those page runs (relative to start, in order) are looked at; the walk
    costs about 100 ns a mapped page. Swapped means swapped only where the host
    has swap: the write-protection markers of a mapping that tracks writes (every
    page not faulted in) read as swapped too. Raises Unsupported or OSError."""
    regions = (ctypes.c_uint64 * (3 * SCAN_REGIONS))()
    anyof = PAGE_IS_PRESENT | (PAGE_IS_SWAPPED if _has_swap() else 0)
    arg = _ScanArg(size=ctypes.sizeof(_ScanArg), vec=ctypes.addressof(regions),
                   vec_len=SCAN_REGIONS,
                   category_inverted=PAGE_IS_FILE, category_mask=PAGE_IS_FILE,
                   category_anyof_mask=anyof)  # fmt: skip
    ranges = [(0, (end - start) // PAGE)] if within is None else within
    runs: list[tuple[int, int]] = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for first, count in ranges:
            arg.start, arg.end = start + first * PAGE, start + (first + count) * PAGE
            _scan(fd, arg, regions, start, runs)
    finally:
        os.close(fd)
    return runs


def tracks_writes(pid: int) -> bool:
    """Whether process pid has the kernel track its writes to guest RAM: c/wptrack.c
    holds a userfaultfd open once it armed it, and closes it if it could not."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fds}/{name}") == "anon_inode:[userfaultfd]":
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def written_runs(pid: int, start: int, end: int, protect: bool) -> list[tuple[int, int]]:
    """(first, count) page runs, relative to start, of process pid's mapping
    [start, end) written since they were last write-protected, where the process
    tracks its writes to it (c/wptrack.c); protect: write-protect them again in the
    same walk, so that the next call finds only what is written after it. Only
    for a process that tracks_writes: an untracked mapping reads as written all
    over, or, with protect, as not written at all. Raises Unsupported or OSError."""
    regions = (ctypes.c_uint64 * (3 * SCAN_REGIONS))()
    arg = _ScanArg(size=ctypes.sizeof(_ScanArg), flags=PM_SCAN_WP_MATCHING if protect else 0,
                   start=start, end=end, vec=ctypes.addressof(regions),
                   vec_len=SCAN_REGIONS, category_mask=PAGE_IS_WRITTEN,
                   return_mask=PAGE_IS_WRITTEN)  # fmt: skip
    runs: list[tuple[int, int]] = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        _scan(fd, arg, regions, start, runs)
    finally:
        os.close(fd)
    return runs


def _has_swap() -> bool:
    """Whether any swap is on (/proc/swaps lists more than its heading)."""
    try:
        with open("/proc/swaps", "rb") as swaps:
            return len(swaps.read().splitlines()) > 1
    except OSError:
        return True  # unknown: count swapped pages, a superset


def _scan(fd: int, arg: _ScanArg, regions: ctypes.Array[ctypes.c_uint64], start: int,
          runs: list[tuple[int, int]]) -> None:  # fmt: skip
    end = arg.end
    while arg.start < end:
        found = _LIBC.ioctl(fd, ctypes.c_ulong(PAGEMAP_SCAN), ctypes.byref(arg))
        if found < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOTTY, errno.EINVAL):
                raise Unsupported(os.strerror(err))
            raise OSError(err, os.strerror(err))
        flat = regions[: 3 * found]
        for region_start, region_end in zip(flat[0::3], flat[1::3], strict=True):
            _append(runs, (region_start - start) // PAGE, (region_end - region_start) // PAGE)
        arg.start = arg.walk_end


def _append(runs: list[tuple[int, int]], first: int, count: int) -> None:
    """Add a region the scan found after the last. A call that fills its vector
    can end its walk (walk_end) before regions it already returned, and the next
    call returns them again (Linux 6.18: hundreds of pages in 256 MiB): a page is
    kept once, or it would be copied twice in the pause."""
    if runs:
        last_first, last_count = runs[-1]
        last_end = last_first + last_count
        if first < last_end:  # seen already, in part or whole
            count -= last_end - first
            first = last_end
            if count <= 0:
                return
        if first == last_end:  # a run cut where a call stopped
            runs[-1] = (last_first, last_count + count)
            return
    runs.append((first, count))


class SharedMapping:
    """A shared mapping of a whole image file, for copy_runs. Its pages that a fork
    will write can be made present first, before the pause (populate): a write to a
    page not yet mapped here costs a page fault, 2 us, more than copying it."""

    def __init__(self, image: Path) -> None:
        """Raises OSError."""
        self.size = os.stat(image).st_size
        fd = os.open(image, os.O_RDWR)
        try:
            base = _LIBC.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED, fd, 0)  # fmt: skip
            if base == _MAP_FAILED or base is None:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            self.base: int = base
        finally:
            os.close(fd)

    def populate(self, runs: list[tuple[int, int]]) -> None:
        """Make those pages present and writable here (holes become zero pages: the
        content does not change). Where the kernel lacks MADV_POPULATE_WRITE (Linux
        5.14) copy_runs faults them in instead. Raises OSError."""
        for first, count in runs:
            if _LIBC.madvise(ctypes.c_void_p(self.base + first * PAGE), count * PAGE,
                             _MADV_POPULATE_WRITE) != 0:  # fmt: skip
                err = ctypes.get_errno()
                if err == errno.EINVAL:
                    return
                raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.base:
            _LIBC.munmap(self.base, self.size)
            self.base = 0


def copy_runs(pid: int, start: int, runs: list[tuple[int, int]], image: Path,
              mapping: SharedMapping | None = None) -> None:  # fmt: skip
    """Copy those pages of process pid's mapping at start into the same offsets of
    file image, through a shared mapping of it (mapping, or one made for the call).
    Raises Unsupported or OSError."""
    own = mapping is None
    target = SharedMapping(image) if mapping is None else mapping
    try:
        for i in range(0, len(runs), IOV_MAX):
            _read_batch(pid, start, target.base, runs[i : i + IOV_MAX])
    finally:
        if own:
            target.close()


def _read_batch(pid: int, start: int, base: int, runs: list[tuple[int, int]]) -> None:
    local, remote = array.array("Q"), array.array("Q")
    for first, count in runs:
        local.extend((base + first * PAGE, count * PAGE))
        remote.extend((start + first * PAGE, count * PAGE))
    want = sum(count for _, count in runs) * PAGE
    local_address, _ = local.buffer_info()
    remote_address, _ = remote.buffer_info()
    got = _LIBC.process_vm_readv(pid, local_address, len(runs), remote_address, len(runs), 0)
    if got < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):
            raise Unsupported(os.strerror(err))
        raise OSError(err, os.strerror(err))
    if got != want:
        raise OSError(errno.EIO, f"short read of process memory ({got} of {want} bytes)")

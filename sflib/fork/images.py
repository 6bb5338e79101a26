"""Frozen memory images, and how the next one is made from the last (DESIGN §2, 5).

A VM's first fork freezes its own RAM file: a rename, nothing copied. After it,
the VM runs in a QEMU that maps that image privately, so what the guest writes
lives in QEMU's own (anonymous) pages, which /proc/PID/pagemap tells apart from
the image's file pages. The next image is therefore the last one plus exactly
those pages (dirty_runs, write_runs):

- written into the last image itself when nothing but the parent maps it: a
  pwrite changes what a private mapping shows for file pages only, never for its
  own copies, so the parent's view stays intact while the file catches up;
- written into a copy of it (copy_image, made before the pause, off the event
  loop) when clones or checkpoints still map the last one.

Either way the cost in the pause is that of the pages the guest changed since the
last fork, never that of its RAM (sflib.fork.procmem makes it a few system calls).
Pages written as zeros become holes after the pause (punch_zeros), so images stay
sparse. Everything here blocks: callers run it in a thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sflib.errors import SystemFailure
from sflib.fork import procmem

log = logging.getLogger(__name__)

PAGE = 4096
COPY_CHUNK = 1 << 20  # bytes per read when copying; zero chunks stay holes
_ZEROS = bytes(COPY_CHUNK)

# Byte 7 of a pagemap entry holds bits 56-63: 63 present, 62 swapped, 61 file or
# shared. A page of the image's private mapping is QEMU's own copy when it is
# present and not a file page, or swapped out (swap only ever holds anonymous pages).
_OWN_PAGE = bytes(1 if (b & 0x80 and not b & 0x20) or b & 0x40 else 0 for b in range(256))
_RUN = re.compile(b"\x01+")


@dataclass
class MemoryImage:
    """A frozen guest RAM file and the VMs and checkpoints that map it."""

    path: Path
    users: set[str] = field(default_factory=set)
    owned: bool = True  # False: another host's image, seen through memtap
    settling: asyncio.Task[None] | None = None  # its free and zero pages punched

    def use(self, user: str) -> None:
        self.users.add(user)

    @property
    def free_map(self) -> Path:
        """Its free-page map, for the memory server (c/memproto.h)."""
        return self.path.with_name(self.path.name + ".free")

    def only_for(self, user: str) -> bool:
        """Nobody but user maps it: it may be brought up to date in place."""
        return self.owned and self.users <= {user}

    def mark_free(self, free_map: bytes) -> None:
        """Write the free-page map (the memory server answers those pages with zeros,
        memtap never asks for them). Raises SystemFailure."""
        partial = self.free_map.with_suffix(".free-new")
        try:
            partial.write_bytes(free_map)
            partial.rename(self.free_map)  # whole or not at all: the server checks its size
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise SystemFailure(f"cannot write {self.free_map}: {e.strerror}") from e
        if not self.path.exists():  # released meanwhile: its map goes with it
            self.free_map.unlink(missing_ok=True)

    def punch_runs(self, page_runs: list[tuple[int, int]]) -> int:
        """Punch those pages out of the file: a hole costs no memory. Returns how many
        pages (0 if the file is gone). Raises SystemFailure."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return 0  # its last user left
        except OSError as e:
            raise SystemFailure(f"cannot open {self.path}: {e.strerror}") from e
        try:
            for first, count in page_runs:
                punch(fd, first * PAGE, count * PAGE)
        except OSError as e:
            raise SystemFailure(f"cannot punch free pages out of {self.path}: "
                                f"{e.strerror}") from e  # fmt: skip
        finally:
            os.close(fd)
        return sum(count for _, count in page_runs)

    async def settled(self) -> None:
        """Until its last fork's free pages are marked and punched: pages written
        into it later must not be punched after them. Never raises."""
        if self.settling is not None:
            await asyncio.wait([self.settling])

    def release(self, user: str) -> None:
        """Forget a user; the last one out removes the file (if it is ours)."""
        self.users.discard(user)
        if not self.users and self.owned:
            self.path.unlink(missing_ok=True)
            self.free_map.unlink(missing_ok=True)
            log.debug("memory image %s removed", self.path)


# Which pages are QEMU's own (pure) ----------------------------------------------


def own_page_runs(pagemap: bytes) -> list[tuple[int, int]]:
    """(first, count) runs of the pages a pagemap extract marks as the process's
    own copies (see _OWN_PAGE); one 8-byte entry per page."""
    marks = pagemap[7::8].translate(_OWN_PAGE)
    return [(m.start(), m.end() - m.start()) for m in _RUN.finditer(marks)]


def subtract(runs: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pages of sorted runs that are in none of minus's runs (any order)."""
    cuts = sorted(minus)
    out: list[tuple[int, int]] = []
    i = 0
    for run_first, count in runs:
        first, end = run_first, run_first + count
        while i < len(cuts) and cuts[i][0] + cuts[i][1] <= first:
            i += 1  # cuts wholly before this run: none of the later runs reaches them
        j = i
        while first < end and j < len(cuts) and cuts[j][0] < end:
            cut_first, cut_end = cuts[j][0], cuts[j][0] + cuts[j][1]
            if cut_first > first:
                out.append((first, cut_first - first))
            first = max(first, cut_end)
            j += 1
        if first < end:
            out.append((first, end - first))
    return out


# Reading a QEMU's mappings --------------------------------------------------------


def mapping_of(pid: int, mapped: Path) -> tuple[int, int]:
    """Where process pid maps the whole of file mapped: (start, end) addresses.
    Raises SystemFailure."""
    target = os.fspath(mapped)
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as e:
        raise SystemFailure(f"cannot read QEMU {pid}'s mappings: {e.strerror}") from e
    for line in maps:
        fields = line.split(maxsplit=5)
        # A renamed file keeps its mapping; maps then shows the new name.
        if len(fields) == 6 and fields[5] == target and fields[2] == "00000000":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            return start, end
    raise SystemFailure(f"QEMU {pid} does not map {mapped}")


def dirty_runs(pid: int, mapped: Path) -> tuple[int, list[tuple[int, int]]]:
    """The page runs of mapped that QEMU pid has its own copies of (what the guest
    wrote since it mapped the image), and the mapping's start. Raises SystemFailure."""
    start, end = mapping_of(pid, mapped)
    try:
        try:
            return start, procmem.own_runs(pid, start, end)
        except procmem.Unsupported as e:
            log.debug("no PAGEMAP_SCAN (%s): reading the whole page map", e)
        with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(start // PAGE * 8)
            entries = _read_exactly(pagemap, (end - start) // PAGE * 8)
    except OSError as e:
        raise SystemFailure(f"cannot read QEMU {pid}'s page map: {e.strerror}") from e
    return start, own_page_runs(entries)


def write_runs(pid: int, start: int, runs: list[tuple[int, int]], image: Path) -> int:
    """Copy those pages of QEMU pid's guest RAM (mapped at start) into image, at
    the same offsets. Returns the pages written. Pages written as zeros take memory
    until punch_zeros. Raises SystemFailure."""
    try:
        try:
            procmem.copy_runs(pid, start, runs, image)
        except procmem.Unsupported as e:
            log.debug("no process_vm_readv (%s): copying through /proc/%d/mem", e, pid)
            _copy_through_mem(pid, start, runs, image)
    except OSError as e:
        raise SystemFailure(f"cannot copy QEMU {pid}'s pages into {image}: "
                            f"{e.strerror}") from e  # fmt: skip
    return sum(count for _, count in runs)


def _copy_through_mem(pid: int, start: int, runs: list[tuple[int, int]], image: Path) -> None:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        fd = os.open(image, os.O_RDWR)
        try:
            for first, count in runs:
                offset, end = first * PAGE, (first + count) * PAGE
                while offset < end:
                    size = min(end - offset, COPY_CHUNK)
                    mem.seek(start + offset)
                    os.pwrite(fd, _read_exactly(mem, size), offset)
                    offset += size
        finally:
            os.close(fd)


def punch_zeros(image: Path, runs: list[tuple[int, int]]) -> int:
    """Punch the pages of those runs of image that hold only zeros: a hole reads
    the same and costs no memory. Nothing else may write those pages meanwhile
    (MemoryImage.settled). Returns how many (0 if the file is gone). Raises
    SystemFailure."""
    punched = 0
    try:
        fd = os.open(image, os.O_RDWR)
    except FileNotFoundError:
        return 0  # its last user left
    except OSError as e:
        raise SystemFailure(f"cannot open {image}: {e.strerror}") from e
    try:
        for first, count in runs:
            offset, end = first * PAGE, (first + count) * PAGE
            while offset < end:
                data = os.pread(fd, min(end - offset, COPY_CHUNK), offset)
                punched += _punch_zero_pages(fd, offset, data)
                offset += len(data) or end
    except OSError as e:
        raise SystemFailure(f"cannot punch zero pages out of {image}: {e.strerror}") from e
    finally:
        os.close(fd)
    return punched


def _punch_zero_pages(fd: int, offset: int, data: bytes) -> int:
    if data == _ZEROS[: len(data)]:
        punch(fd, offset, len(data))
        return len(data) // PAGE
    punched = 0
    for at in range(0, len(data), PAGE):
        if data[at : at + PAGE] == _ZEROS[:PAGE]:
            punch(fd, offset + at, PAGE)
            punched += 1
    return punched


def copy_image(src: Path, dst: Path) -> None:
    """A sparse copy of image src at dst: holes and zero chunks stay holes. On
    failure dst is removed. Raises SystemFailure."""
    try:
        size = src.stat().st_size
        with src.open("rb", buffering=0) as s, dst.open("wb", buffering=0) as d:
            d.truncate(size)
            for offset, length in _data_regions(s.fileno(), size):
                _copy_region(s.fileno(), d.fileno(), offset, length)
    except OSError as e:
        dst.unlink(missing_ok=True)
        raise SystemFailure(f"cannot copy memory image {src}: {e.strerror}") from e


def _data_regions(fd: int, size: int) -> list[tuple[int, int]]:
    regions, offset = [], 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        regions.append((data, hole - data))
        offset = hole
    return regions


def _copy_region(src: int, dst: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        data = os.pread(src, min(end - offset, COPY_CHUNK), offset)
        if not data:
            break
        if data != _ZEROS[: len(data)]:
            os.pwrite(dst, data, offset)
        offset += len(data)


def _read_exactly(f: object, size: int) -> bytes:
    data = f.read(size)  # type: ignore[attr-defined]
    if len(data) != size:
        raise OSError(errno.EIO, "short read")
    return bytes(data)


_LIBC = ctypes.CDLL(None, use_errno=True)
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch(fd: int, offset: int, length: int) -> None:
    """Make a hole (zeros, no memory) of the file's bytes there. Raises OSError."""
    if _LIBC.fallocate(fd, _PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

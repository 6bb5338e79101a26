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
Where the kernel tracks QEMU's writes (c/wptrack.c, preloaded into the QEMU a
parent goes on in: tracking_environment), most of them are copied before the
pause (prepare_write), and the pause copies only what the guest wrote since.
Pages written as zeros become holes after the pause, and the zero pages its users'
faults fill are punched again when a user ends (sflib.fork.holes), so images stay
sparse. Everything here blocks, but MemoryImage's coroutines: callers run it in a
thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sflib.errors import SystemFailure
from sflib.fork import holes, pageruns, procmem
from sflib.fork.pageruns import Runs
from sflib.paths import BUILD_DIR

log = logging.getLogger(__name__)

PAGE = 4096
COPY_CHUNK = 1 << 20  # bytes per read through /proc/PID/mem

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
    # Page runs it holds as zeros (holes once), known once it settled; faults on
    # them refill them (sflib.fork.holes), trim punches them again.
    zeros: Runs = field(default_factory=list)
    trimming: asyncio.Task[None] | None = None
    frozen: bool = False  # a fork writes into it: never trimmed again
    _trim_again: bool = False

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

    def punch_runs(self, page_runs: Runs) -> int:
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
                holes.punch(fd, first * PAGE, count * PAGE)
        except OSError as e:
            raise SystemFailure(f"cannot punch free pages out of {self.path}: "
                                f"{e.strerror}") from e  # fmt: skip
        finally:
            os.close(fd)
        return pageruns.count(page_runs)

    def trim(self) -> None:
        """Punch again, in the background, its zero pages that faults filled (its
        users' reads of holes, their writes to pages the guest had freed). Call it
        when a user ends; a trim asked for while one runs runs once more after."""
        if not self.owned or self.frozen:
            return
        if self.trimming is not None and not self.trimming.done():
            self._trim_again = True
            return
        self.trimming = asyncio.create_task(self._trim(), name=f"trim-{self.path.name}")

    async def _trim(self) -> None:
        await self.settled()  # its zeros are known then
        self._trim_again = True
        while self._trim_again and not self.frozen and self.zeros:
            self._trim_again = False
            try:
                refilled = await asyncio.to_thread(holes.punch_refilled, self.path, self.zeros)
            except SystemFailure as e:
                log.warning("%s: refilled zero pages kept: %s", self.path.name, e)
                return
            log.debug("%s: %d refilled zero pages punched again", self.path.name,
                      pageruns.count(refilled))  # fmt: skip

    async def settled(self) -> None:
        """Until its last fork's free and zero pages are punched, and any trim has
        ended: pages written into it later must not be punched after them. Set
        frozen first where the next fork writes into it. Never raises."""
        if self.settling is not None:
            await asyncio.wait([self.settling])
        if self.trimming is not None and self.trimming is not asyncio.current_task():
            await asyncio.wait([self.trimming])

    def release(self, user: str) -> None:
        """Forget a user; the last one out removes the file (if it is ours)."""
        self.users.discard(user)
        if not self.users and self.owned:
            self.path.unlink(missing_ok=True)
            self.free_map.unlink(missing_ok=True)
            log.debug("memory image %s removed", self.path)


# Which pages are QEMU's own (pure) ----------------------------------------------


def own_page_runs(pagemap: bytes) -> Runs:
    """(first, count) runs of the pages a pagemap extract marks as the process's
    own copies (see _OWN_PAGE); one 8-byte entry per page."""
    marks = pagemap[7::8].translate(_OWN_PAGE)
    return [(m.start(), m.end() - m.start()) for m in _RUN.finditer(marks)]


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


def dirty_runs(pid: int, mapped: Path, known: Runs | None = None) -> tuple[int, Runs]:
    """The page runs of mapped that QEMU pid has its own copies of (what the guest
    wrote since it mapped the image), and the mapping's start. known: runs found
    its own before (prepare_write), not looked at again: a page QEMU has its own
    copy of stays so, and the walk is the cost (the give-back of a reservation
    leaves most of a parent's RAM its own, zeroed). Raises SystemFailure."""
    start, end = mapping_of(pid, mapped)
    within = None if not known else pageruns.complement(known, (end - start) // PAGE)
    try:
        try:
            found = procmem.own_runs(pid, start, end, within)
        except procmem.Unsupported as e:
            log.debug("no PAGEMAP_SCAN (%s): reading the whole page map", e)
            with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
                pagemap.seek(start // PAGE * 8)
                entries = _read_exactly(pagemap, (end - start) // PAGE * 8)
            found = own_page_runs(entries)
    except OSError as e:
        raise SystemFailure(f"cannot read QEMU {pid}'s page map: {e.strerror}") from e
    return start, pageruns.union(known, found) if known else found


WPTRACK = BUILD_DIR / "libwptrack.so"
AHEAD_ROUNDS = 3  # copies before the pause, each of what was written during the last
AHEAD_ENOUGH = 256  # pages: a round that copied fewer is the last


def tracking_environment(memory: Path) -> dict[str, str] | None:
    """The environment of a parent's next QEMU, mapping memory: the kernel tracks
    its writes to it (c/wptrack.c). None without the shim (forks then copy in the
    pause all that the guest wrote)."""
    if not WPTRACK.is_file():
        log.warning("%s is missing (run make c): forks copy every page in the pause", WPTRACK)
        return None
    return {**os.environ, "LD_PRELOAD": str(WPTRACK), "SF_WPTRACK": os.fspath(memory)}


class Prepared(NamedTuple):
    """What prepare_write did before the pause."""

    mapping: procmem.SharedMapping | None  # of the target; None: the pause maps it
    own: Runs  # the pages QEMU had its own copies of then, for dirty_runs
    copied: Runs | None = None  # QEMU tracks writes: the pages copied already


def prepare_write(pid: int, mapped: Path, image: Path, free: Runs) -> Prepared:
    """Before the pause: a shared mapping of image in which the pages the pause
    will write, the free ones left out, are present already, so the pause only
    copies. Where QEMU pid tracks its writes, the pages it wrote are copied now
    (copy_ahead), and the pause writes only those it writes after; else the pages
    it has its own copies of are found now, so the pause scans only the others.
    Never raises."""
    try:
        mapping = procmem.SharedMapping(image)
    except OSError as e:
        log.warning("cannot map %s before the pause: %s", image, e.strerror)
        return Prepared(None, [])
    if procmem.tracks_writes(pid):
        try:
            return Prepared(mapping, [], copy_ahead(pid, mapped, image, free, mapping))
        except (OSError, SystemFailure, procmem.Unsupported) as e:  # the pause copies all
            log.warning("pages of %s not copied before the pause: %s", image, e)
    runs: Runs = []
    try:
        _, runs = dirty_runs(pid, mapped)
        mapping.populate(pageruns.subtract(runs, free))
    except (OSError, SystemFailure) as e:  # the pause faults them in instead
        log.warning("pages of %s not made present before the pause: %s", image, e)
    return Prepared(mapping, runs)


def copy_ahead(pid: int, mapped: Path, image: Path, free: Runs,
               mapping: procmem.SharedMapping) -> Runs:  # fmt: skip
    """While QEMU pid runs: copy the pages it wrote into image, write-protecting
    them again as they are found, then what it wrote meanwhile, a few rounds.
    Returns the pages copied. Raises SystemFailure, Unsupported or OSError."""
    start, end = mapping_of(pid, mapped)
    copied: Runs = []
    for _ in range(AHEAD_ROUNDS):
        runs = pageruns.subtract(procmem.written_runs(pid, start, end, protect=True), free)
        mapping.populate(runs)
        write_runs(pid, start, runs, image, mapping)
        copied = pageruns.union(copied, runs)
        if pageruns.count(runs) < AHEAD_ENOUGH:
            break
    return copied


def written_since(pid: int, mapped: Path) -> tuple[int, Runs]:
    """In the pause, after copy_ahead: the pages QEMU pid wrote since, and the
    mapping's start. Raises SystemFailure, Unsupported or OSError."""
    start, end = mapping_of(pid, mapped)
    return start, procmem.written_runs(pid, start, end, protect=False)


def write_runs(pid: int, start: int, runs: Runs, image: Path,
               mapping: procmem.SharedMapping | None = None) -> int:  # fmt: skip
    """Copy those pages of QEMU pid's guest RAM (mapped at start) into image, at
    the same offsets. Returns the pages written. Pages written as zeros take memory
    until they are punched (sflib.fork.holes). Raises SystemFailure."""
    try:
        try:
            procmem.copy_runs(pid, start, runs, image, mapping)
        except procmem.Unsupported as e:
            log.debug("no process_vm_readv (%s): copying through /proc/%d/mem", e, pid)
            _copy_through_mem(pid, start, runs, image)
    except OSError as e:
        raise SystemFailure(f"cannot copy QEMU {pid}'s pages into {image}: "
                            f"{e.strerror}") from e  # fmt: skip
    return sum(count for _, count in runs)


def _copy_through_mem(pid: int, start: int, runs: Runs, image: Path) -> None:
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


def _read_exactly(f: object, size: int) -> bytes:
    data = f.read(size)  # type: ignore[attr-defined]
    if len(data) != size:
        raise OSError(errno.EIO, "short read")
    return bytes(data)

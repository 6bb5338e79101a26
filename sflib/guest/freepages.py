"""The avoidance heuristic (DESIGN §1): clones never fetch the pages their guest
had free when it was cloned.

The guest cannot name its free pages safely: the kernel's free lists change under
any reader. So sf-clone takes them: just before asking for the clone it maps
(and so the kernel zeroes and hands it) most of the guest's free memory, and
reports the frames it got. Those pages belong to sf-clone until its answer comes,
in the parent and in every clone, and nobody ever reads them: when sf-clone ends
they go back to the kernel, which overwrites a page before anyone reads it. So
their content does not matter, and at the checkpoint sfld writes the image's
free-page map (the memory server never sends those pages, memtap never asks) and
punches them out of the frozen image (they were zeros: the host gets the memory
back).

Guest side: reserve(). Both sides: the codec of the report (pure).
"""

from __future__ import annotations

import array
import base64
import contextlib
import ctypes
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
CHUNK = 1536  # base64 makes 2048 of it: a guest's largest XenStore value
MIN_MARGIN = 24 << 20  # free memory left to the guest, at least...
MARGIN_SHARE = 0.10  # ...or this share of its memory
_PFN_MASK = (1 << 55) - 1
_UNEVICTABLE_COMPACTION = Path("/proc/sys/vm/compact_unevictable_allowed")
_LIBC = ctypes.CDLL(None, use_errno=True)
_PRESENT = 1 << 63


# The report (pure) --------------------------------------------------------------


def runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Sorted (first, count) runs of consecutive page frame numbers."""
    out: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pfn, 1))
    return out


def encode(page_runs: list[tuple[int, int]]) -> list[bytes]:
    """The runs as base64 chunks for XenStore values."""
    flat = array.array("Q", [n for run in page_runs for n in run])
    packed = zlib.compress(flat.tobytes(), 9)
    return [base64.b64encode(packed[i : i + CHUNK]) for i in range(0, len(packed), CHUNK)]


def decode(chunks: list[bytes]) -> list[tuple[int, int]]:
    """Raises ValueError for a report that is not one."""
    try:
        raw = zlib.decompress(b"".join(base64.b64decode(c, validate=True) for c in chunks))
    except (zlib.error, ValueError) as e:
        raise ValueError(f"malformed free-page report: {e}") from None
    if len(raw) % 16:
        raise ValueError("malformed free-page report: not (first, count) pairs")
    flat = array.array("Q")
    flat.frombytes(raw)
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def ram_offset(pfn: int, ram_bytes: int) -> int | None:
    """Where guest frame pfn lies in a q35 VM's RAM file, or None if outside it.

    q35 puts all RAM below 4 GiB when it is under 2.75 GiB, else 2 GiB below and
    the rest from 4 GiB up.
    """
    below = ram_bytes if ram_bytes < 0xB0000000 else 0x80000000
    address = pfn * PAGE
    if address < below:
        return address
    if address >= 1 << 32 and address - (1 << 32) < ram_bytes - below:
        return address - (1 << 32) + below
    return None


def file_runs(page_runs: list[tuple[int, int]], ram_bytes: int) -> list[tuple[int, int]]:
    """The frame runs as (first page, count) runs of a q35 VM's RAM file (see
    ram_offset), clipped to it; a run across the hole below 4 GiB is split."""
    below = ram_bytes if ram_bytes < 0xB0000000 else 0x80000000
    above = (1 << 32) // PAGE
    regions = [(0, below // PAGE, 0), (above, (ram_bytes - below) // PAGE, below // PAGE)]
    out = []
    for first, count in page_runs:
        for base, size, file_base in regions:  # frames base.. base+size are file pages
            lo, hi = max(first, base), min(first + count, base + size)
            if lo < hi:
                out.append((lo - base + file_base, hi - lo))
    return out


def bitmap(runs_in_file: list[tuple[int, int]], pages: int) -> bytes:
    """The image's free map (bit i of byte i/8: page i of the RAM file is free),
    from file_runs."""
    out = bytearray((pages + 7) // 8)
    for start, count in runs_in_file:
        page, end = start, min(start + count, pages)
        while page < end and page % 8:  # the bits before the first whole byte
            out[page // 8] |= 1 << (page % 8)
            page += 1
        whole = (end - page) // 8
        out[page // 8 : page // 8 + whole] = b"\xff" * whole
        page += whole * 8
        while page < end:
            out[page // 8] |= 1 << (page % 8)
            page += 1
    return bytes(out)


def set_runs(free_map: bytes) -> list[tuple[int, int]]:
    """(first page, count) runs of the pages a free map marks."""
    pages = []
    for i, byte in enumerate(free_map):
        pages += [i * 8 + b for b in range(8) if byte >> b & 1]
    return runs(pages)


# In the guest ---------------------------------------------------------------------


@dataclass
class Reservation:
    """Memory taken from the guest's free pages; hold it until the clone's answer."""

    region: mmap.mmap
    pfns: list[int]

    def frames(self) -> list[int]:
        """The page frames behind it now: its pfns, unless something moved them."""
        return _frames(self.region, len(self.region))

    def release(self) -> None:
        self.region.close()


def reserve(meminfo: Path = Path("/proc/meminfo")) -> Reservation | None:
    """Take most of the guest's free memory, or None if there is little. Raises OSError."""
    info = {line.split(":")[0]: int(line.split()[1]) << 10
            for line in meminfo.read_text().splitlines() if line.endswith("kB")}  # fmt: skip
    margin = max(MIN_MARGIN, int(info.get("MemTotal", 0) * MARGIN_SHARE))
    size = (info.get("MemFree", 0) - margin) // PAGE * PAGE
    if size <= 0:
        return None
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        _populate(region, size)
        _pin(region, size)
        return Reservation(region, _frames(region, size))
    except BaseException:
        region.close()
        raise


def _populate(region: mmap.mmap, size: int) -> None:
    """Take the pages: huge ones where the guest's THP setting lets a region ask for
    them (a fault each 2 MiB, not each 4 KiB: under TCG a fault costs some 10 us);
    mlock() faults in what it locks. As c/sf-freepages.c. Raises OSError."""
    with contextlib.suppress(OSError):  # EINVAL: a kernel without THP
        region.madvise(mmap.MADV_HUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))  # a temporary, as below
    if _LIBC.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot lock the free pages taken: {os.strerror(err)}")


def _pin(region: mmap.mmap, size: int) -> None:
    """Keep the kernel from moving region's pages to other frames while it is held:
    the frames reported are punched out of the image after the pause, and a frame
    given up by a move goes to somebody else, whose page would then read as zeros.
    Two movers: khugepaged copies small pages into a new huge page (the guest's THP
    setting may be "always"), which MADV_NOHUGEPAGE keeps off this region (its huge
    pages stay); compaction migrates movable pages, which locked ones are not once
    vm.compact_unevictable_allowed is 0. That setting is the guest's, so it stays 0
    (documented in sf-clone(1)). The pages are locked already (_populate). Raises
    OSError."""
    region.madvise(mmap.MADV_NOHUGEPAGE)
    if _UNEVICTABLE_COMPACTION.exists() and _UNEVICTABLE_COMPACTION.read_text().strip() != "0":
        _UNEVICTABLE_COMPACTION.write_text("0\n")


def _frames(region: mmap.mmap, size: int) -> list[int]:
    """The page frames behind region, from /proc/self/pagemap (root sees them)."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))  # a temporary: region
    # stays closable
    entries = array.array("Q")
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(start // PAGE * 8)
        entries.frombytes(pagemap.read(size // PAGE * 8))
    return [e & _PFN_MASK for e in entries if e & _PRESENT and e & _PFN_MASK]

"""Holes in image files (DESIGN §2, 5): a page that reads as zeros costs no memory
when it is a hole, and a frozen image keeps its zero and free pages as holes.

tmpfs fills a hole with a new zero page whenever a private mapping faults on it,
read or write: a clone reading its parent's free memory, or writing a page the
guest had freed, makes its image grow by a page it does not use. The pages an
image is known to hold as zeros can therefore be punched again at any time
(punch_refilled) as long as nothing writes the file meanwhile: a mapping that
reads one of them again gets a zero page again.

Everything here blocks: callers run it in a thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from sflib.errors import SystemFailure
from sflib.fork import pageruns
from sflib.fork.pageruns import Runs

PAGE = 4096
COPY_CHUNK = 1 << 20  # bytes per read when copying; zero chunks stay holes
_ZEROS = memoryview(bytes(COPY_CHUNK))  # sliced without a copy


def punch_zeros(image: Path, runs: Runs | None = None) -> tuple[Runs, Runs]:
    """Punch the pages of those runs of image (None: all its data) that hold only
    zeros: a hole reads the same and costs no memory. Nothing else may write those
    pages meanwhile (MemoryImage.settled). Returns the runs checked and the runs
    punched (none if the file is gone). Raises SystemFailure."""
    punched: Runs = []
    try:
        fd = os.open(image, os.O_RDWR)
    except FileNotFoundError:
        return [], []  # its last user left
    except OSError as e:
        raise SystemFailure(f"cannot open {image}: {e.strerror}") from e
    try:
        if runs is None:
            runs = _data_runs(fd)
        chunk = bytearray(COPY_CHUNK)
        for first, count in runs:
            offset, end = first * PAGE, (first + count) * PAGE
            while offset < end:
                got = os.preadv(fd, [memoryview(chunk)[: min(end - offset, COPY_CHUNK)]], offset)
                _punch_zero_pages(fd, offset, memoryview(chunk)[:got], punched)
                offset += got or end
    except OSError as e:
        raise SystemFailure(f"cannot punch zero pages out of {image}: {e.strerror}") from e
    finally:
        os.close(fd)
    return runs, punched


def _punch_zero_pages(fd: int, offset: int, data: memoryview, punched: Runs) -> None:
    """Punch the zero pages of data (read at offset), a run of them at a time, and
    add them to punched (runs in order: data comes after them)."""
    zero_from = -1
    whole = data == _ZEROS[: len(data)]
    for at in (0, len(data)) if whole else range(0, len(data) + PAGE, PAGE):
        zero = at < len(data) and (whole or data[at : at + PAGE] == _ZEROS[:PAGE])
        if zero and zero_from < 0:
            zero_from = at
        elif not zero and zero_from >= 0:
            punch(fd, offset + zero_from, at - zero_from)
            first, count = (offset + zero_from) // PAGE, (at - zero_from) // PAGE
            if punched and sum(punched[-1]) == first:  # the run the last chunk ended
                punched[-1] = (punched[-1][0], punched[-1][1] + count)
            else:
                punched.append((first, count))
            zero_from = -1


def punch_refilled(image: Path, zeros: Runs) -> Runs:
    """Punch again the pages of zeros (pages image is known to hold as zeros) that
    faults have filled since they were holes. Nothing may write those pages
    meanwhile. Returns the runs punched (none if the file is gone). Raises
    SystemFailure."""
    try:
        fd = os.open(image, os.O_RDWR)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SystemFailure(f"cannot open {image}: {e.strerror}") from e
    try:
        refilled = pageruns.intersect(_data_runs(fd), zeros)
        for first, count in refilled:
            punch(fd, first * PAGE, count * PAGE)
    except OSError as e:
        raise SystemFailure(f"cannot punch zero pages out of {image}: {e.strerror}") from e
    finally:
        os.close(fd)
    return refilled


def data_runs(image: Path) -> Runs:
    """The page runs of image that are not holes. Raises SystemFailure."""
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as e:
        raise SystemFailure(f"cannot open {image}: {e.strerror}") from e
    try:
        return _data_runs(fd)
    except OSError as e:
        raise SystemFailure(f"cannot read the holes of {image}: {e.strerror}") from e
    finally:
        os.close(fd)


def _data_runs(fd: int) -> Runs:
    return [(offset // PAGE, -(-length // PAGE)) for offset, length in _data_regions(fd)]


def _data_regions(fd: int) -> Runs:
    """(offset, length) in bytes of the file's data."""
    size = os.fstat(fd).st_size
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


def copy_image(src: Path, dst: Path) -> None:
    """A sparse copy of image src at dst: holes and zero chunks stay holes. On
    failure dst is removed. Raises SystemFailure."""
    try:
        with src.open("rb", buffering=0) as s, dst.open("wb", buffering=0) as d:
            d.truncate(os.fstat(s.fileno()).st_size)
            for offset, length in _data_regions(s.fileno()):
                _copy_region(s.fileno(), d.fileno(), offset, length)
    except OSError as e:
        dst.unlink(missing_ok=True)
        raise SystemFailure(f"cannot copy memory image {src}: {e.strerror}") from e


def _copy_region(src: int, dst: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        data = os.pread(src, min(end - offset, COPY_CHUNK), offset)
        if not data:
            break
        if data != _ZEROS[: len(data)]:
            os.pwrite(dst, data, offset)
        offset += len(data)


_LIBC = ctypes.CDLL(None, use_errno=True)
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch(fd: int, offset: int, length: int) -> None:
    """Make a hole (zeros, no memory) of the file's bytes there. Raises OSError."""
    if _LIBC.fallocate(fd, _PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

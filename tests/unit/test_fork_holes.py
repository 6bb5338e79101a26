"""Holes in image files (sflib.fork.holes, MemoryImage.trim), on real tmpfs files
and a real private mapping of one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib.fork import holes
from sflib.fork.images import MemoryImage

PAGE = holes.PAGE
SHM = Path("/dev/shm")


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Path]:
    path = SHM / f"sf-test-holes-{os.getpid()}-{tmp_path.name}.mem"
    path.write_bytes(b"")
    yield path
    path.unlink(missing_ok=True)


def allocated_pages(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // PAGE


def is_hole(path: Path, page: int) -> bool:
    with path.open("rb") as f:
        return os.lseek(f.fileno(), page * PAGE, os.SEEK_HOLE) == page * PAGE


def test_only_the_zero_pages_of_the_runs_are_punched(image: Path) -> None:
    with image.open("r+b") as f:
        f.truncate(1024 * PAGE)
        f.write(b"\x03" * PAGE)  # data
        f.seek(300 * PAGE)
        f.write(bytes(256 * PAGE))  # a whole chunk of zeros
        f.seek(600 * PAGE)
        f.write(b"\x07" * PAGE + bytes(PAGE) + b"\x07" * PAGE)  # a zero page inside data
        f.seek(900 * PAGE)
        f.write(bytes(PAGE))  # zeros, but not in the runs
    before = image.read_bytes()
    runs = [(0, 1), (290, 300), (600, 3)]
    # 290-589: holes or written zeros; 601 a zero page between data pages
    assert holes.punch_zeros(image, runs) == (runs, [(290, 300), (601, 1)])
    assert image.read_bytes() == before
    with image.open("rb") as f:
        assert os.lseek(f.fileno(), 300 * PAGE, os.SEEK_DATA) == 600 * PAGE
        assert os.lseek(f.fileno(), 601 * PAGE, os.SEEK_DATA) == 602 * PAGE
    assert not is_hole(image, 900)  # kept
    assert holes.punch_zeros(image.with_suffix(".gone"), [(0, 1)]) == ([], [])


def test_a_whole_image_is_checked_where_it_holds_data(image: Path) -> None:
    with image.open("r+b") as f:
        f.truncate(2048 * PAGE)
        f.write(bytes(1000 * PAGE))  # as a guest's RAM after init_on_free zeroed it
        f.seek(10 * PAGE)
        f.write(b"\x01" * 3 * PAGE)
        f.seek(1500 * PAGE)
        f.write(b"\x02" * PAGE)
    before = image.read_bytes()
    checked, punched = holes.punch_zeros(image)
    assert checked == [(0, 1000), (1500, 1)]  # the holes are not read
    assert punched == [(0, 10), (13, 987)]
    assert allocated_pages(image) == 4
    assert image.read_bytes() == before
    assert holes.data_runs(image) == [(10, 3), (1500, 1)]


def test_a_copy_keeps_holes_and_zero_chunks_out(image: Path) -> None:
    with image.open("r+b") as f:  # a whole megabyte of written zeros
        f.truncate(512 * PAGE)
        f.seek(256 * PAGE)
        f.write(bytes(256 * PAGE))
        f.seek(3 * PAGE)
        f.write(b"\x05" * PAGE)
    copy = image.with_suffix(".copy")
    try:
        holes.copy_image(image, copy)
        assert copy.read_bytes() == image.read_bytes()
        assert allocated_pages(copy) <= 16  # only the data pages
    finally:
        copy.unlink(missing_ok=True)


# A guest's QEMU, in short: maps the image privately, reads pages 0-99 (holes),
# writes pages 100-199 (holes too) and page 300 (data), then shows what it sees.
FAULTER = """
import mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
seen = sum(m[p * 4096] for p in range(100))
for p in range(100, 200):
    m[p * 4096] = 0xAB
m[300 * 4096] = 0xCD
print("faulted", seen, flush=True)
sys.stdin.readline()
print(bytes(m[:]).hex(), flush=True)
"""


def test_zero_pages_a_private_mapping_filled_are_punched_again(image: Path) -> None:
    with image.open("r+b") as f:
        f.truncate(400 * PAGE)
        f.seek(300 * PAGE)
        f.write(b"\x11" * 10 * PAGE)  # 300-309: data
    original = image.read_bytes()
    zeros = [(0, 300), (310, 90)]  # all but the data: what a settled image knows
    assert allocated_pages(image) == 10
    proc = subprocess.Popen([sys.executable, "-c", FAULTER, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == "faulted 0\n"
        assert allocated_pages(image) == 210  # tmpfs filled every hole it faulted on
        assert holes.punch_refilled(image, zeros) == [(0, 200)]
        assert allocated_pages(image) == 10
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen = bytes.fromhex(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert image.read_bytes() == original  # the file never changed
    expected = bytearray(original)  # and the mapping still sees its own writes
    for p in range(100, 200):
        expected[p * PAGE] = 0xAB
    expected[300 * PAGE] = 0xCD
    assert seen == bytes(expected)
    assert holes.punch_refilled(image.with_suffix(".gone"), zeros) == []


def test_a_trim_runs_after_the_settling_and_never_once_a_fork_writes(image: Path) -> None:
    with image.open("r+b") as f:
        f.truncate(64 * PAGE)
        f.write(bytes(64 * PAGE))  # refilled zeros, all of it

    async def scenario() -> None:
        settled = asyncio.Event()
        img = MemoryImage(image, {"vm", "k1"})

        async def settle() -> None:
            await settled.wait()
            img.zeros = [(0, 32)]

        img.settling = asyncio.create_task(settle())
        img.trim()
        img.trim()  # asked for twice while the first waits: one runs after it
        await asyncio.sleep(0.05)
        assert allocated_pages(image) == 64  # waits for the zeros to be known
        settled.set()
        await img.settled()
        assert allocated_pages(image) == 32
        img.frozen = True
        with image.open("r+b") as f:
            f.write(bytes(PAGE))  # a fork's write, after its plan froze the image
        img.trim()
        assert img.trimming is not None
        await img.settled()
        assert not is_hole(image, 0)
        MemoryImage(image, owned=False).trim()  # another host's: never

    asyncio.run(scenario())

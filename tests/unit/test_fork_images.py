"""How the image of a later fork is made (sflib.fork.images): the pages a process
wrote into its private mapping of an image, found in its page map and written
back, against a real mapping of a tmpfs file."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sflib.errors import SystemFailure
from sflib.fork import holes, images, procmem
from sflib.fork.images import PAGE, MemoryImage

SHM = Path("/dev/shm")


def entry(present: bool = False, file: bool = False, swapped: bool = False) -> bytes:
    value = (present << 63) | (swapped << 62) | (file << 61) | 0x1234  # a frame number
    return struct.pack("<Q", value)


def test_own_pages_are_present_anonymous_or_swapped() -> None:
    pagemap = b"".join([
        entry(),  # 0: never touched
        entry(present=True, file=True),  # 1: read: the image's page
        entry(present=True),  # 2: written: QEMU's own copy
        entry(present=True),  # 3
        entry(swapped=True),  # 4: written, then swapped out
        entry(present=True, file=True),  # 5
        entry(present=True),  # 6
    ])  # fmt: skip
    assert images.own_page_runs(pagemap) == [(2, 3), (6, 1)]
    assert images.own_page_runs(b"") == []


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = SHM / f"sf-test-{os.getpid()}-{tmp_path.name}.mem"
    with path.open("wb") as f:
        f.truncate(64 * PAGE)
        for page in range(0, 64, 4):  # some data, some holes
            f.seek(page * PAGE)
            f.write(bytes([page + 1]) * PAGE)
    yield path
    path.unlink(missing_ok=True)


WRITER = """
import mmap, os, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
_ = m[8 * 4096]  # read only: stays the file's page
for page, value in ((1, 0xA1), (2, 0xA2), (4, 0xA4), (40, 0)):
    m[page * 4096 : (page + 1) * 4096] = bytes([value]) * 4096
print("ready", flush=True)
sys.stdin.readline()
sys.stdout.write(m[:].hex())
"""


@pytest.fixture(params=["fast", "portable"])
def syscalls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways: PAGEMAP_SCAN and process_vm_readv (sflib.fork.procmem), and the
    page map and /proc/PID/mem where a kernel lacks them."""
    if request.param == "portable":

        def unsupported(*_: object) -> None:
            raise procmem.Unsupported("not here")

        monkeypatch.setattr(procmem, "own_runs", unsupported)
        monkeypatch.setattr(procmem, "copy_runs", unsupported)
    return str(request.param)


def test_written_pages_go_into_the_image_and_the_mapping_sees_the_same(
        image: Path, syscalls: str) -> None:  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        start, runs = images.dirty_runs(proc.pid, image)
        assert runs == [(1, 2), (4, 1), (40, 1)]
        assert images.write_runs(proc.pid, start, runs, image) == 4
        assert holes.punch_zeros(image, runs) == (runs, [(40, 1)])  # written as zeros
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen = bytes.fromhex(proc.stdout.read())
    finally:
        proc.kill()
        proc.wait()
    data = image.read_bytes()
    assert data == seen  # the file caught up; the process's view never changed
    assert data[PAGE : 2 * PAGE] == b"\xa1" * PAGE and data[4 * PAGE : 5 * PAGE] == b"\xa4" * PAGE
    assert data[40 * PAGE : 41 * PAGE] == bytes(PAGE)
    with image.open("rb") as f:
        assert os.lseek(f.fileno(), 40 * PAGE, os.SEEK_HOLE) == 40 * PAGE  # punched
    assert data[8 * PAGE : 9 * PAGE] == b"\x09" * PAGE  # read, not written: unchanged


TWO_ROUNDS = """
import mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
for pages in ((1, 2, 30), (2, 10, 11, 63)):  # before the look ahead, then in the pause
    for page in pages:
        m[page * 4096] = 0xB0 + page + (page == 2 and pages[0] == 2)
    _ = m[20 * 4096]  # read only
    print("ready", flush=True)
    sys.stdin.readline()
print(m[:].hex(), flush=True)
sys.stdin.readline()
"""


def test_a_scan_that_skips_the_pages_found_before_finds_what_was_written_since(
        image: Path, syscalls: str) -> None:  # fmt: skip
    """prepare_write finds QEMU's own pages before the pause; the pause looks only
    at the others, and must still find every page written, before or after."""
    proc = subprocess.Popen([sys.executable, "-c", TWO_ROUNDS, str(image)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        _, before = images.dirty_runs(proc.pid, image)
        assert before == [(1, 2), (30, 1)]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ready\n"
        _, found = images.dirty_runs(proc.pid, image, before)
        _, everything = images.dirty_runs(proc.pid, image)
    finally:
        proc.kill()
        proc.wait()
    assert found == everything == [(1, 2), (10, 2), (30, 1), (63, 1)]


def tracked(script: str, image: Path) -> subprocess.Popen[str]:
    """A process whose writes to its private mapping of image the kernel tracks, as
    a parent's QEMU does (c/wptrack.c)."""
    if not images.WPTRACK.is_file():
        pytest.skip(f"{images.WPTRACK} is not built (make c)")
    env = {**os.environ, "LD_PRELOAD": str(images.WPTRACK), "SF_WPTRACK": str(image)}
    return subprocess.Popen([sys.executable, "-c", script, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_pages_copied_before_the_pause_and_those_written_after_make_the_image(
        image: Path) -> None:  # fmt: skip
    """A tracked QEMU's pages are copied while it runs; the pause writes only what
    it wrote after, a page written again included, and the image is its view."""
    proc = tracked(TWO_ROUNDS, image)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        assert procmem.tracks_writes(proc.pid)
        mapping, own, copied = images.prepare_write(proc.pid, image, image, free=[(30, 1)])
        assert mapping is not None and own == []
        try:
            assert copied == [(1, 2)]  # page 30 is free: never copied
            assert image.read_bytes()[2 * PAGE] == 0xB2
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "ready\n"
            start, since = images.written_since(proc.pid, image)
            assert since == [(2, 1), (10, 2), (63, 1)]  # 2 again; not the ones read
            assert images.write_runs(proc.pid, start, since, image, mapping) == 4
        finally:
            mapping.close()
        seen = mmap_view(proc)
    finally:
        proc.kill()
        proc.wait()
    data = image.read_bytes()
    pages = [p for p in range(64) if p != 30]  # the free page holds what it held
    assert [data[p * PAGE : (p + 1) * PAGE] for p in pages] == [seen[p] for p in pages]


def test_the_own_pages_of_a_tracked_process_are_the_ones_it_wrote(image: Path) -> None:
    """Its write-protection markers read as swapped pages: without swap they are not
    counted, or a fork falling back to the own pages would copy all of RAM."""
    if procmem._has_swap():
        pytest.skip("this host has swap: swapped pages count as own")
    proc = tracked(TWO_ROUNDS, image)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        _, own = images.dirty_runs(proc.pid, image)
    finally:
        proc.kill()
        proc.wait()
    assert own == [(1, 2), (30, 1)]


def mmap_view(proc: subprocess.Popen[str]) -> dict[int, bytes]:
    """What the process sees, page by page (it prints its mapping as hex)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("dump\n")
    proc.stdin.flush()
    raw = bytes.fromhex(proc.stdout.readline())
    return {p: raw[p * PAGE : (p + 1) * PAGE] for p in range(len(raw) // PAGE)}


def test_an_untracked_process_has_its_own_pages_found_before_the_pause(image: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", TWO_ROUNDS, str(image)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert not procmem.tracks_writes(proc.pid)
        prepared = images.prepare_write(proc.pid, image, image, free=[])
        assert prepared.mapping is not None
        prepared.mapping.close()
    finally:
        proc.kill()
        proc.wait()
    assert prepared.copied is None and prepared.own == [(1, 2), (30, 1)]


MANY_RUNS = """
import mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
for page in range(0, len(m) // 4096, 3):  # a run of one page in every three
    m[page * 4096] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_scan_of_more_runs_than_one_call_returns_finds_each_page_once() -> None:
    """PAGEMAP_SCAN returns 4096 regions a call; the next call may return some of
    the last again (Linux 6.18 did, 342 of 21846): each page must be found once,
    as the page map has it, or the pause copies it twice."""
    path = SHM / f"sf-test-{os.getpid()}-many.mem"
    pages = 256 << 8  # 256 MiB: 21846 runs
    with path.open("wb") as f:
        f.truncate(pages * PAGE)
    proc = subprocess.Popen([sys.executable, "-c", MANY_RUNS, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        start, end = images.mapping_of(proc.pid, path)
        with open(f"/proc/{proc.pid}/pagemap", "rb") as pagemap:
            pagemap.seek(start // PAGE * 8)
            expected = images.own_page_runs(pagemap.read(pages * 8))
        try:
            found = procmem.own_runs(proc.pid, start, end)
        except procmem.Unsupported as e:
            pytest.skip(f"no PAGEMAP_SCAN here: {e}")
    finally:
        proc.kill()
        proc.wait()
        path.unlink(missing_ok=True)
    assert len(expected) == (pages + 2) // 3 > procmem.SCAN_REGIONS * 5
    assert found == expected


def test_a_process_that_does_not_map_the_image_is_refused(image: Path) -> None:
    with pytest.raises(SystemFailure, match="does not map"):
        images.dirty_runs(os.getpid(), image)


def test_an_image_is_updated_in_place_only_for_its_one_user(tmp_path: Path) -> None:
    img = MemoryImage(tmp_path / "k1.mem", {"k1", "vm"})
    assert not img.only_for("vm")  # its checkpoint (a ticket's clones) maps it too
    img.release("k1")
    assert img.only_for("vm")
    img.use("t1-1")
    assert not img.only_for("vm")
    assert not MemoryImage(tmp_path / "x.mem", {"vm"}, owned=False).only_for("vm")


def test_mapping_of_a_mapped_file(image: Path) -> None:
    with image.open("r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE) as m:
        start, end = images.mapping_of(os.getpid(), image)
        assert end - start == len(m) == 64 * PAGE


def test_pages_made_present_before_the_pause_are_written_the_same(image: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(image)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "ready\n"
        mapping, own, _ = images.prepare_write(proc.pid, image, image, free=[(4, 1)])
        assert mapping is not None
        try:
            start, runs = images.dirty_runs(proc.pid, image, own)
            assert images.write_runs(proc.pid, start, runs, image, mapping) == 4
        finally:
            mapping.close()
        proc.stdin.write("\n")
        proc.stdin.flush()
        seen = bytes.fromhex(proc.stdout.read())
    finally:
        proc.kill()
        proc.wait()
    assert image.read_bytes() == seen
    assert images.prepare_write(os.getpid(), image, image.with_suffix(".gone"), []).mapping is None

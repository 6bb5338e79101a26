"""memtap (c/memtap.c) against a fake memory server: lazy reads through the FUSE
mount, its cache, prefetch, private mappings as QEMU makes them, a server that dies
or goes silent, a SIGTERM during a fetch, start-up failures, and a run under
valgrind.

The fake server speaks the protocol with sflib.memory.protocol's codec only, serves
files of a folder with the free-page map it is given, and records each READ it answers,
each page whose data it sent and each FREEMAP it answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sflib.memory import protocol as mp
from sflib.memory.protocol import Op, Status
from tests.integration.conftest import ROOT

PAGE = mp.PAGE
MEMTAP = ROOT / "build/memtap"
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
VALGRIND_TIMEOUT = 90.0  # FUSE init and teardown are slow under valgrind


# The fake memory server ------------------------------------------------------------


def recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """size bytes, or None if the peer closed first."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@dataclass
class FakeServer:
    """A memory server in threads on 127.0.0.1 serving the files of folder."""

    folder: Path
    secret: bytes = b""
    free: set[int] = field(default_factory=set)  # pages reported free, never sent
    freemap: bool = True  # False: FREEMAP is refused, as an older server does
    reads: list[tuple[int, int]] = field(default_factory=list)  # (first page, pages)
    sent: Counter[int] = field(default_factory=Counter)  # page -> times its data was sent
    freemaps: int = 0  # FREEMAP requests answered with the map
    connections: int = 0
    silent: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)  # a request, by silent
    corrupt: bool = False  # READ replies name the wrong offset, FREEMAP's a wrong size
    stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def drop(self) -> None:
        """Close the connections open now, and go on listening."""
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def die(self) -> None:
        """Stop listening and close every connection. The listener is shut down, and
        closed only once the accept thread is gone: closed under that thread's poll(),
        its descriptor number could go to a file on the mount, polled through memtap."""
        self.stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # on Linux: refuse connections now
        self.acceptor.join()
        self.listener.close()
        self.drop()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        image: list[bytes | None] = []  # its pages, None for a free or zero page
        with conn:
            try:
                while (header := recv_exact(conn, mp.HEADER)) is not None:
                    request = mp.decode_request(header)
                    payload = b""
                    if request.op in (Op.HELLO, Op.OPEN):
                        payload = recv_exact(conn, request.length) or b""
                    while self.silent.is_set():  # holds the request, keeps the connection
                        self.held.set()
                        if self.stopped.wait(0.05):
                            return
                    if self.stopped.is_set():
                        return
                    reply = self._answer(request, payload, image)
                    conn.sendall(reply)
                    if request.op == Op.HELLO and payload != self.secret:
                        return
            except (OSError, mp.ProtocolError):
                return

    def _answer(self, request: mp.Request, payload: bytes, image: list[bytes | None]) -> bytes:
        op = request.op
        if op == Op.HELLO:
            if payload != self.secret:
                return mp.encode_reply(op, Status.EACCES)
            return mp.encode_reply(op, value=mp.VERSION)
        if op == Op.OPEN:
            path = self.folder / payload.decode()
            if not path.is_file():
                return mp.encode_reply(op, Status.ENOENT)
            data = path.read_bytes()
            for i in range(0, len(data), PAGE):
                page = data[i : i + PAGE]
                image.append(None if i // PAGE in self.free or not any(page) else page)
            return mp.encode_reply(op, value=len(data), pages=len(image))
        if op == Op.FREEMAP and self.freemap:
            return self._freemap(image)
        if op != Op.READ:
            return mp.encode_reply(op, Status.EINVAL)
        first, count = request.offset // PAGE, request.length // PAGE
        if request.offset % PAGE or request.length % PAGE or not 0 < count <= 256:
            return mp.encode_reply(op, Status.EINVAL)
        if first + count > len(image):
            return mp.encode_reply(op, Status.ERANGE)
        pages = image[first : first + count]
        with self.lock:
            self.reads.append((first, count))
            self.sent.update(first + i for i, page in enumerate(pages) if page is not None)
        value = request.offset + PAGE if self.corrupt else request.offset
        return mp.encode_reply(op, payload=mp.read_payload(pages), pages=count, value=value)

    def _freemap(self, image: list[bytes | None]) -> bytes:
        if not image:
            return mp.encode_reply(Op.FREEMAP, Status.ESTATE)
        free = mp.free_map({p for p in self.free if p < len(image)}, len(image))
        with self.lock:
            self.freemaps += 1
        if self.corrupt:
            free += b"\0"
        return mp.encode_reply(Op.FREEMAP, payload=free, pages=len(image))


def make_image(folder: Path, pages: int, zero: Collection[int] = (), name: str = "vm") -> bytes:
    """A file of random pages, those in zero all zero. Returns its content."""
    rng = random.Random(pages)
    data = b"".join(bytes(PAGE) if i in zero else rng.randbytes(PAGE) for i in range(pages))
    (folder / name).write_bytes(data)
    return data


# memtap processes ----------------------------------------------------------------------


def mounted(point: Path) -> bool:
    return any(
        line.split()[1] == str(point) for line in Path("/proc/mounts").read_text().splitlines()
    )


def processes_naming(point: Path) -> list[int]:
    """Live processes whose command line names point (a memtap serving it)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(point).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@dataclass
class Tap:
    proc: subprocess.Popen[bytes]
    mountpoint: Path
    cache: Path
    log: Path
    name: str = "vm"

    @property
    def file(self) -> Path:
        return self.mountpoint / self.name

    def stats(self) -> dict[str, Any]:
        return dict(json.loads((self.mountpoint / ".stats").read_bytes()))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """Whatever happened: no process, no mount."""
        try:
            self.stop(VALGRIND_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)


def wait_ready(fd: int, timeout: float) -> bytes:
    """What memtap wrote on its ready descriptor: b"\\n" once mounted, b"" if it died."""
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 16) if readable else b"(silent)"
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def memtap_binary() -> Path:
    out = subprocess.run(["make", "-C", str(ROOT), "build/memtap"], capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"make build/memtap failed:\n{out.stdout}{out.stderr}"
    return MEMTAP


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


@pytest.fixture
def server(images: Path) -> Iterator[FakeServer]:
    fake = FakeServer(images)
    yield fake
    fake.die()


Mount = Callable[..., Tap]


@pytest.fixture
def mount(memtap_binary: Path, tmp_path: Path) -> Iterator[Mount]:
    """start(server, *options, wrapper=(), name="vm"): a running, mounted memtap. Every
    one is stopped and unmounted afterwards, and checked to have left nothing."""
    taps: list[Tap] = []

    def start(server: FakeServer, *options: str, wrapper: Sequence[str] = (),
              name: str = "vm", ready_timeout: float = READY_TIMEOUT) -> Tap:  # fmt: skip
        n = len(taps)
        point, cache, log = tmp_path / f"mnt{n}", tmp_path / f"cache{n}", tmp_path / f"log{n}"
        point.mkdir()
        r, w = os.pipe()
        argv = [*wrapper, str(memtap_binary), "--server", server.address, "--image", name,
                "--cache", str(cache), "--ready-fd", str(w), *options, str(point)]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, pass_fds=[w])
        os.close(w)
        tap = Tap(proc, point, cache, log, name)
        taps.append(tap)
        assert wait_ready(r, ready_timeout) == b"\n", f"memtap not ready:\n{tap.output()}"
        assert mounted(point)
        return tap

    yield start
    for tap in taps:
        tap.cleanup()
    for tap in taps:
        assert not mounted(tap.mountpoint), f"{tap.mountpoint} still mounted"
        assert tap.proc.returncode is not None
        assert processes_naming(tap.mountpoint) == []
        assert not tap.cache.exists(), "the cache file was left behind"


def pread_page(fd: int, page: int, pages: int = 1) -> bytes:
    return os.pread(fd, pages * PAGE, page * PAGE)


@contextlib.contextmanager
def opened(path: Path, flags: int = os.O_RDONLY, random_access: bool = False) -> Iterator[int]:
    """A descriptor; random_access stops kernel readahead, so each read reaches
    memtap as exactly the pages it covers."""
    fd = os.open(path, flags)
    try:
        if random_access:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        yield fd
    finally:
        os.close(fd)


# Reading --------------------------------------------------------------------------------


def test_reads_match_the_image_and_read_again_without_the_server(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 300)
    tap = mount(server)
    assert sorted(os.listdir(tap.mountpoint)) == [".stats", "vm"]
    assert tap.file.stat().st_size == len(source)
    rng = random.Random(1)
    with opened(tap.file) as fd:
        for _ in range(40):  # unaligned ranges, some over cached and missing pages
            offset = rng.randrange(len(source))
            length = rng.randrange(1, 5 * PAGE)
            assert os.pread(fd, length, offset) == source[offset : offset + length]
    assert tap.file.read_bytes() == source
    requests = len(server.reads)
    stats = tap.stats()
    assert stats["requests"] == requests > 0
    assert stats["pages_cached"] == stats["pages"] == 300
    assert stats["pages_fetched"] == sum(server.sent.values()) >= 300
    assert stats["bytes_fetched"] >= 300 * PAGE
    assert (stats["server_alive"], stats["errors"], stats["size"]) == (True, 0, len(source))

    assert tap.file.read_bytes() == source  # from the page cache: memtap never asked
    with opened(tap.file) as fd:  # dropped from the page cache: memtap's cache answers
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(source), 0) == source
    again = tap.stats()
    assert len(server.reads) == again["requests"] == requests
    assert again["cache_hits"] > stats["cache_hits"]
    assert tap.stop() == 0


@pytest.mark.parametrize("freemap", [True, False], ids=["freemap", "older-server"])
def test_zero_and_free_pages_are_not_sent_but_read_as_zeros(
    server: FakeServer, images: Path, mount: Mount, freemap: bool
) -> None:
    zero, free = {0, 5, 6, 7, 40, 63}, {10, 11, 62}
    source = make_image(images, 64, zero=zero)
    server.free, server.freemap = free, freemap
    tap = mount(server)
    expected = b"".join(
        bytes(PAGE) if i in free else source[i * PAGE : (i + 1) * PAGE] for i in range(64)
    )
    assert expected != source  # free pages hold data the server must not send
    assert tap.file.read_bytes() == expected
    assert set(server.sent) == set(range(64)) - zero - free
    stats = tap.stats()
    # With the map, free pages are present from the start: no READ brings them in.
    assert stats["pages_zero"] == len(zero if freemap else zero | free)
    assert stats["pages_free"] == (len(free) if freemap else 0)
    assert stats["pages_cached"] == 64 - stats["pages_free"]
    assert stats["pages_fetched"] == 64 - len(zero | free)
    assert server.freemaps == int(freemap)
    assert tap.output().count("refused FREEMAP (EINVAL)") == int(not freemap)


def test_free_pages_read_as_zeros_without_a_request(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    free = {*range(10, 20), 30, 32, 33}
    source = make_image(images, 64)
    served = b"".join(
        bytes(PAGE) if i in free else source[i * PAGE : (i + 1) * PAGE] for i in range(64)
    )
    server.free = free
    tap = mount(server, "--prefetch", "8")
    assert tap.stats()["pages_free"] == len(free)
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 12) == bytes(PAGE)
        assert pread_page(fd, 10, 10) == bytes(10 * PAGE)
        assert server.reads == []
        assert tap.stats()["cache_hits"] >= 2
        # The prefetch window stops short of the free pages after page 5.
        assert pread_page(fd, 5) == source[5 * PAGE : 6 * PAGE]
        assert server.reads == [(5, 5)]
        # Free pages between missing ones are spanned, not split around; never sent.
        assert pread_page(fd, 29) == served[29 * PAGE : 30 * PAGE]
        assert server.reads == [(5, 5), (29, 9)]
        assert pread_page(fd, 30, 8) == served[30 * PAGE : 38 * PAGE]
    assert server.reads == [(5, 5), (29, 9)]
    assert not set(server.sent) & free
    stats = tap.stats()
    assert (stats["pages_free"], stats["pages_cached"], stats["pages_zero"]) == (13, 11, 0)
    assert (stats["requests"], stats["pages_fetched"]) == (2, 11)
    assert server.freemaps == 1


def test_a_free_map_longer_than_a_request_payload(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    pages = 9001  # a map of 1126 bytes: more than MP_MAX_PAYLOAD
    source = make_image(images, pages, zero=range(16, pages))
    server.free = {1, *range(8000, pages)}
    tap = mount(server, "--prefetch", "0")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, pages - 1) == bytes(PAGE)
        assert pread_page(fd, 8000) == bytes(PAGE)
        assert pread_page(fd, 1) == bytes(PAGE)
        assert server.reads == []
        assert pread_page(fd, 7999) == source[7999 * PAGE : 8000 * PAGE]
        assert pread_page(fd, 0) == source[:PAGE]
    assert server.reads == [(7999, 1), (0, 1)]
    stats = tap.stats()
    assert (stats["pages"], stats["pages_free"]) == (pages, 1 + pages - 8000)


def test_an_older_server_without_freemap_still_serves(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64)
    server.free, server.freemap = {3, 4}, False
    tap = mount(server, "--prefetch", "0")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 3) == bytes(PAGE)  # asked for: the map is unknown
        server.drop()
        assert pread_page(fd, 2, 3) == source[2 * PAGE : 3 * PAGE] + bytes(2 * PAGE)
    assert server.reads == [(3, 1), (2, 1), (4, 1)]
    assert server.connections == 2
    stats = tap.stats()
    assert (stats["pages_free"], stats["pages_zero"], stats["server_alive"]) == (0, 2, True)
    assert tap.output().count("refused FREEMAP") == 1  # said once, not at each reconnection


def test_prefetch_extends_a_fetch_and_is_clipped(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64)
    tap = mount(server, "--prefetch", "8")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 10) == source[10 * PAGE : 11 * PAGE]
        assert server.reads == [(10, 9)]
        assert tap.stats()["cache_hits"] == 0
        assert pread_page(fd, 14) == source[14 * PAGE : 15 * PAGE]  # prefetched
        assert tap.stats()["cache_hits"] == 1  # memtap answered from its cache
        assert pread_page(fd, 60) == source[60 * PAGE : 61 * PAGE]
        assert server.reads == [(10, 9), (60, 4)]  # up to the image's end
        # Missing 8, 9 and 19 on, cached between: the cached pages are not fetched
        # again. (With the kernel's readahead off, it hands memtap the range in pieces.)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # so it reaches memtap
        assert pread_page(fd, 8, 12) == source[8 * PAGE : 20 * PAGE]
        fetched = [p for first, n in server.reads[2:] for p in range(first, first + n)]
        assert sorted(fetched) == [8, 9, *range(19, 28)]  # 19 and the 8 pages after it
    # How many reads the kernel makes of the range is its own business; some of them
    # were of the pages memtap had, and those it answered from its cache.
    assert tap.stats()["cache_hits"] > 1
    assert tap.stop() == 0


def test_no_prefetch_fetches_only_the_page(server: FakeServer, images: Path, mount: Mount) -> None:
    source = make_image(images, 64)
    tap = mount(server, "--prefetch", "0")
    with opened(tap.file, random_access=True) as fd:
        for page in (10, 11, 3):
            assert pread_page(fd, page) == source[page * PAGE : (page + 1) * PAGE]
    assert server.reads == [(10, 1), (11, 1), (3, 1)]
    assert tap.stats()["prefetch"] == 0


def test_a_large_prefetch_is_split_into_requests_of_at_most_1_mib(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 600)
    tap = mount(server, "--prefetch", "1000")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 0) == source[:PAGE]
    assert server.reads == [(0, 256), (256, 256), (512, 88)]
    assert tap.stats()["pages_cached"] == 600


def test_secret_from_a_file(images: Path, mount: Mount, tmp_path: Path) -> None:
    source = make_image(images, 4)
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    fake = FakeServer(images, secret=b"s3cret")
    try:
        assert mount(fake, "--secret-file", str(secret)).file.read_bytes() == source
    finally:
        fake.die()


# Mappings as QEMU makes them ----------------------------------------------------------


# The mappings are made in child processes: a page fault holds this process's GIL, so
# the fake server's threads could not answer memtap.
MAPPER = """
import hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)  # as QEMU 7.2 opens it, even for share=off
size = os.fstat(fd).st_size
with mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
    print(hashlib.sha256(m[:]).hexdigest())
    m[:4] = b"mine"
"""

PRIVATE_WRITES = """
import mmap, os, sys
P = 4096
fd = os.open(sys.argv[1], os.O_RDWR)
with open(sys.argv[2], "rb") as f:
    source = f.read()
prot = mmap.PROT_READ | mmap.PROT_WRITE
with mmap.mmap(fd, len(source), flags=mmap.MAP_PRIVATE, prot=prot) as m:
    assert m[5 * P : 6 * P] == source[5 * P : 6 * P], "page 5 read"
    m[5 * P : 5 * P + 5] = b"guest"
    m[3 * P + 100] = 0xFF
    m[40 * P : 41 * P] = bytes(P)  # a write fault: read from the file, then copied
    assert m[5 * P : 5 * P + 5] == b"guest", "page 5 written"
    assert m[3 * P : 3 * P + 101] == bytes(100) + bytes([255]), "page 3 written"
    with mmap.mmap(fd, len(source), flags=mmap.MAP_PRIVATE, prot=prot) as other:
        assert other[:] == source, "a second mapping"
    m.flush()  # a private mapping writes nothing back
assert os.pread(fd, len(source), 0) == source, "a read after"
print("ok")
"""


def run_python(code: str, *args: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE)  # fmt: skip


def test_private_writable_mapping_sees_the_image_and_keeps_its_writes(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64, zero={3})
    tap = mount(server)
    proc = run_python(PRIVATE_WRITES, tap.file, images / "vm")
    assert proc.communicate(timeout=30)[0] == b"ok\n"
    assert tap.file.read_bytes() == source
    assert tap.stats()["pages_cached"] == 64


def test_image_opens_read_write_but_refuses_changes(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 8)
    tap = mount(server)
    libc = ctypes.CDLL(None, use_errno=True)
    punch_hole = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, as QEMU discards
    with opened(tap.file, os.O_RDWR) as fd:
        with pytest.raises(OSError) as write:
            os.pwrite(fd, b"x", 0)
        assert write.value.errno == errno.EROFS
        with pytest.raises(OSError) as truncate:
            os.ftruncate(fd, 0)
        assert truncate.value.errno == errno.EROFS
        assert libc.fallocate(fd, punch_hole, ctypes.c_long(0), ctypes.c_long(PAGE)) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
    with pytest.raises(OSError) as stats:
        os.open(tap.mountpoint / ".stats", os.O_WRONLY)
    assert stats.value.errno == errno.EROFS
    with pytest.raises(OSError) as create:
        os.open(tap.mountpoint / "other", os.O_CREAT | os.O_WRONLY)
    assert create.value.errno == errno.ENOSYS  # memtap has no create operation
    assert tap.file.read_bytes() == source


def test_two_processes_mapping_the_image_fetch_each_page_once(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 256, zero=range(100, 120))
    tap = mount(server)
    procs = [run_python(MAPPER, tap.file) for _ in range(2)]
    digests = [proc.communicate(timeout=30)[0].decode().strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert digests == [hashlib.sha256(source).hexdigest()] * 2
    assert set(server.sent.values()) == {1}
    assert len(server.sent) == 256 - 20
    assert tap.stats()["pages_fetched"] == 256 - 20
    assert tap.file.read_bytes() == source


# A failing server ---------------------------------------------------------------------


def expect_eio(fd: int, page: int) -> float:
    """Reading page fails with EIO; returns how long that took."""
    start = time.monotonic()
    with pytest.raises(OSError) as failure:
        pread_page(fd, page)
    assert failure.value.errno == errno.EIO
    return time.monotonic() - start


def check_degraded(tap: Tap, server: FakeServer, source: bytes, fd: int) -> None:
    """Cached pages still read, others fail without asking the server (known dead),
    .stats tells, a clean stop."""
    assert pread_page(fd, 0, 4) == source[: 4 * PAGE]
    before = tap.stats()
    assert before["server_alive"] is False
    connections, said = server.connections, tap.output()
    expect_eio(fd, 50)
    stats = tap.stats()
    assert stats["requests"] == before["requests"]  # no READ sent
    assert server.connections == connections  # no connection tried (while it listens)
    assert tap.output() == said  # nor a reconnection attempted
    assert stats["errors"] > before["errors"] >= 1
    assert tap.proc.poll() is None
    assert tap.stop() == 0
    assert not mounted(tap.mountpoint)


def test_a_dead_server_fails_uncached_reads_at_once(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64)
    tap = mount(server, "--prefetch", "3", "--timeout", "20")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 0) == source[:PAGE]  # pages 0-3
        server.die()
        assert expect_eio(fd, 30) < 10  # no timeout waited for
        assert "lost the memory server" in tap.output()
        check_degraded(tap, server, source, fd)
    assert server.connections == 1


def test_a_silent_server_fails_uncached_reads_after_the_timeout(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64)
    tap = mount(server, "--prefetch", "3", "--timeout", "2")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 0) == source[:PAGE]
        server.silent.set()
        # The request times out, then the reconnection's HELLO: twice the timeout, and
        # not a third time.
        assert 1.5 * 2 < expect_eio(fd, 30) < 3 * 2
        assert "no answer within the timeout" in tap.output()
        check_degraded(tap, server, source, fd)
    assert server.connections == 2  # it did try once more


def test_a_dropped_connection_is_reopened(server: FakeServer, images: Path, mount: Mount) -> None:
    source = make_image(images, 64)
    tap = mount(server, "--prefetch", "0")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 1) == source[PAGE : 2 * PAGE]
        server.drop()
        assert pread_page(fd, 2) == source[2 * PAGE : 3 * PAGE]
        assert server.connections == 2
        assert "reconnecting" in tap.output()
        server.drop()  # a fault later on gets its own reconnection
        assert pread_page(fd, 3) == source[3 * PAGE : 4 * PAGE]
    assert server.connections == server.freemaps == 3  # each learns the free pages again
    assert tap.stats()["server_alive"] is True


def test_a_server_breaking_the_protocol_is_given_up(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64)
    tap = mount(server, "--prefetch", "3", "--timeout", "20")
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 0) == source[:PAGE]
        server.corrupt = True
        assert expect_eio(fd, 30) < 10  # never wrong data, and no timeout waited for
        assert "Protocol error" in tap.output()
        assert server.connections == 2  # reopened once, wrong again: dead
        check_degraded(tap, server, source, fd)


SYS_PPOLL = 271  # x86-64


def waiting_for_the_server(pid: int) -> bool:
    """Whether memtap is blocked in a ppoll (it polls nothing but the server's socket:
    libfuse's loop reads /dev/fuse)."""
    return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(SYS_PPOLL)


def read_in_background(fd: int, page: int) -> tuple[threading.Thread, list[int]]:
    """A thread reading page, started, and the errno its read fails with, once it has."""
    failures: list[int] = []

    def read() -> None:
        try:
            pread_page(fd, page)
        except OSError as e:
            failures.append(e.errno or 0)

    reader = threading.Thread(target=read)
    reader.start()
    return reader, failures


def test_sigterm_during_a_fetch_stops_at_once(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    make_image(images, 64)
    tap = mount(server, "--timeout", "20")
    server.silent.set()
    fd = os.open(tap.file, os.O_RDONLY)
    reader, failures = read_in_background(fd, 0)
    assert server.held.wait(20), "memtap's READ never reached the server"
    assert server.reads == []  # in flight
    # Signalled once blocked on the answer (a signal that comes before: the next test).
    deadline = time.monotonic() + 20
    while not waiting_for_the_server(tap.proc.pid):
        assert time.monotonic() < deadline, "memtap does not wait for the answer"
        time.sleep(0.005)
    start = time.monotonic()
    assert tap.stop() == 0
    assert time.monotonic() - start < 10  # not the 20 s timeout
    reader.join(5)
    with contextlib.suppress(OSError):  # ENOTCONN: the file system is gone
        os.close(fd)
    assert failures and failures[0] in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
    assert "lost the memory server" not in tap.output()  # leaving, not a server fault


# Preloaded into memtap: the first READ it sends is followed at once by a SIGTERM to
# itself, so the signal is handled after the request left and before memtap waits for
# the reply, every time (on a busy machine a pre-empted memtap lands there by chance).
SIGNAL_AFTER_READ = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef ssize_t send_fn(int, const void *, size_t, int);

ssize_t send(int fd, const void *buf, size_t len, int flags)
{
    static int done;
    send_fn *real = (send_fn *)dlsym(RTLD_NEXT, "send");
    ssize_t n = real(fd, buf, len, flags);
    uint16_t op = 0;

    if (n >= 24)
        memcpy(&op, (const char *)buf + 4, sizeof op);
    if (op == 3 && !done) { /* MP_OP_READ, little-endian like the host */
        static const char said[] = "test: SIGTERM after the READ\n";
        done = 1;
        if (write(2, said, sizeof said - 1) < 0 || kill(getpid(), SIGTERM) < 0)
            _exit(99);
    }
    return n;
}
"""


@pytest.fixture(scope="session")
def signal_after_read(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library to LD_PRELOAD into memtap (SIGNAL_AFTER_READ)."""
    folder = tmp_path_factory.mktemp("preload")
    (folder / "shim.c").write_text(SIGNAL_AFTER_READ)
    out = subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
                          str(folder / "shim.so"), str(folder / "shim.c"), "-ldl"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return folder / "shim.so"


def test_sigterm_before_the_wait_for_a_reply_stops_at_once(
    server: FakeServer, images: Path, mount: Mount, signal_after_read: Path
) -> None:
    """The race: a SIGTERM handled after the READ is sent but before memtap waits for
    the reply (not yet in recv) must end that wait at once, not at --timeout."""
    make_image(images, 64)
    timeout = 20.0
    tap = mount(server, "--timeout", str(timeout),
                wrapper=["env", f"LD_PRELOAD={signal_after_read}"])  # fmt: skip
    server.silent.set()  # no reply ever: only the signal can end the wait
    fd = os.open(tap.file, os.O_RDONLY)
    reader, failures = read_in_background(fd, 0)
    assert server.held.wait(20), "memtap's READ never reached the server"
    bound = timeout / 4  # well under the timeout, and ample for a stop
    try:
        status = tap.proc.wait(bound)
    except subprocess.TimeoutExpired:
        status = None
    reader.join(timeout)
    with contextlib.suppress(OSError):  # ENOTCONN: the file system is gone
        os.close(fd)
    said = tap.output()
    assert "test: SIGTERM after the READ" in said, f"the shim never saw the READ:\n{said}"
    assert status == 0, f"still running {bound} s after the SIGTERM:\n{said}"
    assert failures and failures[0] in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
    assert "lost the memory server" not in tap.output()  # leaving, not a server fault


# Start-up and usage -------------------------------------------------------------------


def run_memtap(memtap: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(memtap), *args], capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip


def start_args(tmp_path: Path, address: str, name: str = "vm") -> list[str]:
    point = tmp_path / "mnt"
    point.mkdir(exist_ok=True)
    return ["--server", address, "--image", name, "--cache", str(tmp_path / "cache"), str(point)]


def test_nothing_listening_exits_111(memtap_binary: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    out = run_memtap(memtap_binary, tmp_path, *start_args(tmp_path, address))
    assert out.returncode == 111
    assert out.stderr.startswith("memtap: ")
    assert "Connection refused" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert not mounted(tmp_path / "mnt")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("name", "secret", "why"),
    [("absent", b"", "OPEN refused: ENOENT"), ("vm", b"other", "HELLO refused: EACCES")],
)
def test_a_refused_image_exits_111(
    memtap_binary: Path, images: Path, tmp_path: Path, name: str, secret: bytes, why: str
) -> None:
    make_image(images, 4)
    fake = FakeServer(images, secret=secret)
    try:
        out = run_memtap(memtap_binary, tmp_path, *start_args(tmp_path, fake.address, name))
    finally:
        fake.die()
    assert (out.returncode, out.stderr.count("\n")) == (111, 1), out.stderr
    assert out.stderr.startswith("memtap: ") and why in out.stderr
    assert not mounted(tmp_path / "mnt")


def test_a_wrong_free_map_exits_111(memtap_binary: Path, images: Path, tmp_path: Path) -> None:
    make_image(images, 4)
    fake = FakeServer(images, corrupt=True)
    try:
        out = run_memtap(memtap_binary, tmp_path, *start_args(tmp_path, fake.address))
    finally:
        fake.die()
    assert (out.returncode, out.stderr.count("\n")) == (111, 1), out.stderr
    assert "FREEMAP: Protocol error" in out.stderr
    assert not mounted(tmp_path / "mnt")
    assert not (tmp_path / "cache").exists()


def test_help_and_misuse(memtap_binary: Path, tmp_path: Path) -> None:
    out = run_memtap(memtap_binary, tmp_path, "--help")
    assert out.returncode == 0
    assert out.stdout.startswith("usage: memtap --server HOST:PORT")
    good = start_args(tmp_path, "127.0.0.1:1")
    for bad in ([], ["--bogus", *good], good[:-1], [*good, "extra"], ["--server", "nohost"],
                ["--prefetch", "-1", *good], ["--timeout", "0", *good],
                ["--image", ".hidden", *good], ["--ready-fd", "999", *good]):  # fmt: skip
        out = run_memtap(memtap_binary, tmp_path, *bad)
        assert out.returncode == 100, (bad, out.stderr)
        assert out.stderr.startswith("memtap: "), bad


def test_a_mount_failure_exits_111(server: FakeServer, images: Path, memtap_binary: Path,
                                   tmp_path: Path) -> None:  # fmt: skip
    make_image(images, 4)
    args = start_args(tmp_path, server.address)
    out = run_memtap(memtap_binary, tmp_path, *args[:-1], str(tmp_path / "no-such-dir"))
    assert out.returncode == 111
    assert "memtap: cannot mount" in out.stderr
    assert not (tmp_path / "cache").exists()


# Valgrind --------------------------------------------------------------------------------


def test_no_memory_errors_or_leaks_under_valgrind(
    server: FakeServer, images: Path, mount: Mount
) -> None:
    source = make_image(images, 64, zero={7})
    server.free = {20, 63}
    wrapper = ["valgrind", "-q", "--error-exitcode=1", "--leak-check=full"]
    tap = mount(server, "--prefetch", "4", wrapper=wrapper, ready_timeout=VALGRIND_TIMEOUT)
    with opened(tap.file, random_access=True) as fd:
        assert pread_page(fd, 2, 3) == source[2 * PAGE : 5 * PAGE]
        assert pread_page(fd, 7) == bytes(PAGE)
        assert pread_page(fd, 20) == bytes(PAGE)  # free: no request
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
    stats = tap.stats()
    assert stats["pages_cached"] == 10  # 2-6 (page 2 and 4 more), 7-11
    assert (stats["pages_free"], stats["requests"]) == (2, 2)
    server.die()
    with opened(tap.file, random_access=True) as fd, pytest.raises(OSError):
        pread_page(fd, 40)
    assert tap.stop(VALGRIND_TIMEOUT) == 0, tap.output()
    assert "==" not in tap.output(), tap.output()

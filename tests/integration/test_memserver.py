"""The memory server (build/memserver, c/memserver.c) on loopback, through the Python
client and through raw sockets for what a well-behaved client never sends.

The image "vm" holds 1024 pages: page i is all zero if i % 7 == 3, else random; the
guest reported page i free if i % 11 == 5 (vm.free). Pages 0-31 hold no page both
zero and free, so counters over them are exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sflib.errors import UnreachableError
from sflib.memory import protocol
from sflib.memory.client import MemoryClient
from sflib.memory.protocol import Op, ProtocolError, Status
from tests.integration.conftest import ROOT

MEMSERVER = ROOT / "build/memserver"
PAGE = protocol.PAGE
PAGES = 1024
SECRET = b"sesame"


def is_zero(page: int) -> bool:
    return page % 7 == 3


def is_free(page: int) -> bool:
    return page % 11 == 5


@pytest.fixture(scope="session")
def memserver_binary() -> Path:
    out = subprocess.run(["make", "-C", str(ROOT), "build/memserver"], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, f"make build/memserver failed:\n{out.stdout}{out.stderr}"
    return MEMSERVER


@pytest.fixture(scope="session")
def image_bytes() -> bytes:
    rng = random.Random(1234)
    return b"".join(bytes(PAGE) if is_zero(i) else rng.randbytes(PAGE) for i in range(PAGES))


@pytest.fixture(scope="session")
def served_bytes(image_bytes: bytes) -> bytes:
    """What READs of "vm" return: the image, its free pages zeroed."""
    pages = (image_bytes[i * PAGE : (i + 1) * PAGE] for i in range(PAGES))
    return b"".join(bytes(PAGE) if is_free(i) else page for i, page in enumerate(pages))


@pytest.fixture
def image_dir(tmp_path: Path, image_bytes: bytes) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "vm").write_bytes(image_bytes)
    free = [i for i in range(PAGES) if is_free(i)]
    (folder / "vm.free").write_bytes(protocol.free_map(free, PAGES))
    (folder / "plain").write_bytes(image_bytes[: 64 * PAGE])  # no free map
    return folder


@dataclass
class Server:
    """A running memserver; stop() returns its exit status."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    stopped: bool = field(default=False)

    def client(self, secret: bytes = SECRET, image: str | None = "vm") -> MemoryClient:
        c = MemoryClient.connect("127.0.0.1", self.port, secret, timeout=30)
        if image:
            c.open(image)
        return c

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        self.stopped = True
        return self.proc.wait(timeout=60)


def start(binary: Path, image_dir: Path, *extra: str, wrapper: tuple[str, ...] = ()) -> Server:
    secret = image_dir.parent / "secret"
    secret.write_bytes(SECRET + b"\n")
    log = image_dir.parent / "memserver.log"
    r, w = os.pipe()
    argv = [*wrapper, str(binary), "--dir", str(image_dir), "--listen", "127.0.0.1:0",
            "--secret-file", str(secret), "--ready-fd", str(w), *extra]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, pass_fds=[w], stderr=err)
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        if select.select([ready], [], [], 60)[0]:
            line = ready.readline()
        else:
            proc.kill()
            line = b""
    assert line.endswith(b"\n"), f"memserver did not start:\n{log.read_text()}"
    return Server(proc, int(line), log)


@pytest.fixture
def server(memserver_binary: Path, image_dir: Path) -> Iterator[Server]:
    """A memserver that must still be running at the test's end, and stop cleanly."""
    srv = start(memserver_binary, image_dir)
    yield srv
    if not srv.stopped:
        assert srv.proc.poll() is None, f"memserver died:\n{srv.log.read_text()}"
        assert srv.stop() == 0, srv.log.read_text()


def request(op: int, payload: bytes = b"", *, length: int | None = None, offset: int = 0) -> bytes:
    return protocol.encode_request(Op(op), payload, offset=offset, length=length)


def recv_reply(sock: socket.socket) -> protocol.Reply:
    header = recv_exact(sock, protocol.HEADER)
    return protocol.decode_reply(header)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"connection closed after {len(out)} of {n} bytes"
        out += chunk
    return out


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closes sock (end of stream or reset), after what it still sends."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def refused(status: Status) -> Any:
    return pytest.raises(ProtocolError, match=status.name)


def client_when_room(srv: Server, image: str | None = "vm") -> MemoryClient:
    """A client, once the server has seen others go and has room for it."""
    for _ in range(200):
        try:
            return srv.client(image=image)
        except UnreachableError:
            time.sleep(0.05)
    raise AssertionError("the server never had room for another client")


def greeted(srv: Server) -> socket.socket:
    """A raw connection that the server has accepted and greeted."""
    sock = srv.raw()
    sock.sendall(protocol.hello(SECRET))
    assert recv_reply(sock).status == Status.OK
    return sock


def wait_for_clients(srv: Server, n: int) -> dict[str, Any]:
    """The stats, once n clients (the asking one included) are connected."""
    with client_when_room(srv, image=None) as c:
        for _ in range(200):
            stats = c.stats()
            if stats["clients"] == n:
                return stats
            time.sleep(0.02)
    raise AssertionError(f"{n} clients expected: {stats}")


# Reading ------------------------------------------------------------------------------


def test_random_ranges_read_as_the_file_with_free_pages_zeroed(
    server: Server, served_bytes: bytes
) -> None:
    expected = served_bytes
    rng = random.Random(7)
    with server.client() as c:
        whole = b"".join(c.read(at, protocol.MAX_READ) for at in range(0, PAGES * PAGE, 1 << 20))
        assert whole == expected
        for _ in range(100):
            pages = rng.randint(1, 256)
            first = rng.randint(0, PAGES - pages)
            data = c.read(first * PAGE, pages * PAGE)
            assert data == expected[first * PAGE : (first + pages) * PAGE], (first, pages)


def test_open_reports_the_size(server: Server) -> None:
    with server.client(image=None) as c:
        assert c.open("vm") == PAGES * PAGE
    with server.client(image=None) as c:
        assert c.open("plain") == 64 * PAGE


def test_zero_and_free_pages_are_not_sent(server: Server, image_bytes: bytes) -> None:
    with server.client() as c:
        present, data = c.read_raw(0, 32 * PAGE)
        stats = c.stats()
    sent = [i for i in range(32) if not is_zero(i) and not is_free(i)]
    assert [i for i, p in enumerate(present) if p] == sent
    assert data == b"".join(image_bytes[i * PAGE : (i + 1) * PAGE] for i in sent)
    assert stats["pages_zero"] == 5  # 3 10 17 24 31
    assert stats["pages_free"] == 3  # 5 16 27
    assert stats["pages_sent"] == len(sent)
    assert stats["reads"] == 1


def test_a_page_both_zero_and_free_is_not_sent(server: Server) -> None:
    assert is_zero(38) and is_free(38)
    with server.client() as c:
        present, data = c.read_raw(38 * PAGE, PAGE)
    assert present == [False]
    assert data == b""


def test_image_without_free_map_sends_its_free_looking_pages(
    server: Server, image_bytes: bytes
) -> None:
    with server.client(image="plain") as c:
        present, _ = c.read_raw(0, 32 * PAGE)
        assert c.read(0, 64 * PAGE) == image_bytes[: 64 * PAGE]
    assert [i for i, p in enumerate(present) if not p] == [i for i in range(32) if is_zero(i)]


# Free-page maps -------------------------------------------------------------------------


def test_freemap_is_the_free_file(server: Server, image_dir: Path) -> None:
    with server.client() as c:
        free = c.freemap()
        assert c.read(5 * PAGE, PAGE) == bytes(PAGE)  # the connection goes on
    assert free == (image_dir / "vm.free").read_bytes()
    assert [i for i, p in enumerate(protocol.pages_present(free, PAGES)) if p] == [
        i for i in range(PAGES) if is_free(i)
    ]


def test_freemap_without_free_file_is_all_zeros(server: Server) -> None:
    with server.client(image="plain") as c:
        assert c.freemap() == bytes(64 // 8)


def test_freemap_clears_the_bits_past_the_last_page(server: Server, image_dir: Path) -> None:
    (image_dir / "odd").write_bytes(b"x" * (11 * PAGE))
    (image_dir / "odd.free").write_bytes(b"\xff\xff")
    sock = greeted(server)
    sock.sendall(protocol.open_image("odd") + protocol.freemap())
    assert recv_reply(sock).status == Status.OK
    assert recv_reply(sock) == protocol.Reply(Op.FREEMAP, Status.OK, 2, 11, 0)
    assert recv_exact(sock, 2) == bytes([0xFF, 0b0000_0111])
    sock.close()


def test_freemap_of_a_1_gib_image_exceeds_the_request_limit(
    server: Server, image_dir: Path
) -> None:
    pages = (1 << 30) // PAGE
    with (image_dir / "big").open("wb") as f:
        f.truncate(1 << 30)  # sparse
    free = protocol.free_map({0, 1, 4097, pages - 1}, pages)
    (image_dir / "big.free").write_bytes(free)
    with server.client(image="big") as c:
        got = c.freemap()
        assert c.read((pages - 1) * PAGE, PAGE) == bytes(PAGE)
    assert len(got) == 32 * 1024 > protocol.MAX_SECRET
    assert got == free


def test_freemap_before_open_is_estate_and_the_connection_stays(server: Server) -> None:
    sock = greeted(server)
    sock.sendall(protocol.freemap())
    assert recv_reply(sock) == protocol.Reply(Op.FREEMAP, Status.ESTATE, 0, 0, 0)
    sock.sendall(request(Op.FREEMAP, b"x"))  # no payload allowed
    assert recv_reply(sock).status == Status.EINVAL
    sock.sendall(protocol.open_image("plain") + protocol.freemap())
    assert recv_reply(sock).status == Status.OK
    assert recv_reply(sock) == protocol.Reply(Op.FREEMAP, Status.OK, 8, 64, 0)
    assert recv_exact(sock, 8) == bytes(8)
    sock.close()


def test_freemaps_are_counted(server: Server) -> None:
    with server.client() as c, server.client(image=None) as early:
        with refused(Status.ESTATE):
            early.freemap()
        c.freemap()
        c.freemap()
        stats = c.stats()
    assert (stats["freemaps"], stats["errors"], stats["reads"]) == (2, 1, 0)
    assert stats["bytes_sent"] == 4 * 24 + 2 * (24 + PAGES // 8)  # HELLOs, OPEN, ESTATE


def test_unlinked_image_still_reads(server: Server, image_dir: Path, served_bytes: bytes) -> None:
    with server.client() as c:
        (image_dir / "vm").unlink()
        (image_dir / "vm.free").unlink()
        assert c.read(64 * PAGE, 8 * PAGE) == served_bytes[64 * PAGE : 72 * PAGE]
        with server.client(image=None) as other, refused(Status.ENOENT):
            other.open("vm")
        assert c.read(0, PAGE) == served_bytes[:PAGE]


def test_fifty_concurrent_clients_all_read_correct_data(server: Server, image_bytes: bytes) -> None:
    start_line = threading.Barrier(50)

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        with server.client(image="plain") as c:
            start_line.wait(timeout=30)
            for _ in range(8):
                pages = rng.randint(1, 64)
                first = rng.randint(0, 64 - pages)
                got = c.read(first * PAGE, pages * PAGE)
                assert got == image_bytes[first * PAGE : (first + pages) * PAGE]
            return int(c.stats()["clients"])

    with ThreadPoolExecutor(50) as pool:
        peaks = list(pool.map(reader, range(50)))
    assert max(peaks) == 50  # the first to ask saw all connected at once
    assert wait_for_clients(server, 1)["reads"] == 50 * 8


def anon_memory(pid: int) -> int:
    """The process's anonymous resident memory in bytes (the mapped images not counted)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


def test_a_client_that_does_not_read_its_replies_holds_up_nobody(
    server: Server, image_bytes: bytes, served_bytes: bytes
) -> None:
    """It pipelines 64 MiB of READs and reads nothing until another client is done;
    the server does not queue all those replies meanwhile."""
    slow = server.raw()
    slow.sendall(protocol.hello(SECRET) + protocol.open_image("plain"))
    assert recv_reply(slow).status == recv_reply(slow).status == Status.OK
    slow.sendall(protocol.read(0, 64 * PAGE) * 256)
    with server.client() as fast:
        for at in range(0, PAGES * PAGE, 1 << 20):
            assert fast.read(at, 1 << 20) == served_bytes[at : at + (1 << 20)]
    time.sleep(0.2)
    assert anon_memory(server.proc.pid) < 24 << 20
    for _ in range(256):
        reply = recv_reply(slow)
        payload = recv_exact(slow, reply.length)
        assert protocol.assemble(payload, reply.pages) == image_bytes[: 64 * PAGE]
    slow.close()


# Refusals that keep the connection -------------------------------------------------------


@pytest.mark.parametrize("name", ["../vm", ".hidden", "", "a" * 300, "a/b", "vm\0", "v m", "é"])
def test_bad_names_are_einval_and_the_connection_stays(server: Server, name: str) -> None:
    with server.client(image=None) as c:
        with refused(Status.EINVAL):
            c.open(name)
        assert c.open("vm") == PAGES * PAGE


def test_missing_images_are_enoent(server: Server, image_dir: Path) -> None:
    (image_dir / ".hidden").write_bytes(bytes(PAGE))  # a valid image, but an invalid name
    with server.client(image=None) as c:
        with refused(Status.ENOENT):
            c.open("nothere")
        with refused(Status.EINVAL):
            c.open(".hidden")


@pytest.mark.parametrize("content", [b"", b"x" * (PAGE + 1), b"x" * 100])
def test_images_not_a_whole_number_of_pages_are_einval(
    server: Server, image_dir: Path, content: bytes
) -> None:
    (image_dir / "odd").write_bytes(content)
    with server.client(image=None) as c, refused(Status.EINVAL):
        c.open("odd")


def test_a_folder_is_not_an_image(server: Server, image_dir: Path) -> None:
    (image_dir / "sub").mkdir()
    with server.client(image=None) as c, refused(Status.EINVAL):
        c.open("sub")


@pytest.mark.parametrize("free_size", [0, PAGES // 8 - 1, PAGES // 8 + 1])
def test_a_free_map_of_the_wrong_size_refuses_the_open(
    server: Server, image_dir: Path, free_size: int
) -> None:
    (image_dir / "vm.free").write_bytes(bytes(free_size))
    with server.client(image=None) as c, refused(Status.EINVAL):
        c.open("vm")


@pytest.mark.parametrize(
    ("offset", "length", "status"),
    [
        (1, PAGE, Status.EINVAL),
        (PAGE, 0, Status.EINVAL),
        (0, PAGE + 1, Status.EINVAL),
        (0, protocol.MAX_READ + PAGE, Status.EINVAL),
        (PAGES * PAGE, PAGE, Status.ERANGE),
        ((PAGES - 1) * PAGE, 2 * PAGE, Status.ERANGE),
        (2**64 - PAGE, PAGE, Status.ERANGE),
    ],
)
def test_bad_reads_are_refused_and_the_connection_stays(
    server: Server, image_bytes: bytes, offset: int, length: int, status: Status
) -> None:
    with server.client() as c:
        with refused(status):
            c.read(offset, length)
        assert c.read((PAGES - 1) * PAGE, PAGE) == image_bytes[-PAGE:]
        assert c.stats()["errors"] == 1


def test_read_before_open_and_second_open_and_hello_are_estate(server: Server) -> None:
    sock = server.raw()
    sock.sendall(protocol.hello(SECRET) + protocol.read(0, PAGE))
    assert recv_reply(sock).status == Status.OK
    assert recv_reply(sock) == protocol.Reply(Op.READ, Status.ESTATE, 0, 0, 0)
    sock.sendall(protocol.open_image("vm") + protocol.open_image("plain") + protocol.hello(SECRET))
    assert recv_reply(sock) == protocol.Reply(Op.OPEN, Status.OK, 0, PAGES, PAGES * PAGE)
    assert recv_reply(sock).status == Status.ESTATE
    reply = recv_reply(sock)
    assert (reply.op, reply.status) == (Op.HELLO, Status.ESTATE)
    sock.sendall(protocol.read(0, PAGE))
    reply = recv_reply(sock)
    assert (reply.status, reply.pages) == (Status.OK, 1)
    sock.close()


def test_unknown_ops_and_stats_with_payload_are_einval(server: Server) -> None:
    sock = server.raw()
    sock.sendall(protocol.hello(SECRET))
    assert recv_reply(sock).status == Status.OK
    sock.sendall(struct.pack("<IHHIIQ", protocol.MAGIC, 77, 0, 3, 0, 0) + b"abc")
    assert recv_exact(sock, 24)[4:8] == struct.pack("<HH", 77, Status.EINVAL)
    sock.sendall(request(Op.STATS, b"xy"))
    assert recv_reply(sock).status == Status.EINVAL
    sock.sendall(protocol.stats())  # the payloads were skipped: still in step
    reply = recv_reply(sock)
    assert protocol.decode_stats(recv_exact(sock, reply.length))["errors"] == 2
    sock.close()


# Refusals that close the connection ---------------------------------------------------


def test_wrong_secret_is_refused_and_closed(server: Server, served_bytes: bytes) -> None:
    for secret in (b"", b"sesame\n", b"sesamE", b"sesame!"):
        with pytest.raises(ProtocolError) as raised:
            server.client(secret=secret)
        assert raised.value.status is Status.EACCES
    sock = server.raw()
    sock.sendall(protocol.hello(b"nope"))
    assert recv_reply(sock).status == Status.EACCES
    assert closed_by_peer(sock)
    with server.client() as c:
        assert c.read(0, 8 * PAGE) == served_bytes[: 8 * PAGE]
    assert "closed: wrong secret" in server.log.read_text()


def test_without_secret_file_any_secret_works(
    memserver_binary: Path, image_dir: Path, image_bytes: bytes
) -> None:
    r, w = os.pipe()
    proc = subprocess.Popen([str(memserver_binary), "--dir", str(image_dir), "--listen",
                             "localhost:0", "--ready-fd", str(w)], pass_fds=[w],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(w)
    with os.fdopen(r, "rb") as ready:
        port = int(ready.readline())
    try:
        for secret in (b"", b"anything"):
            with MemoryClient.connect("127.0.0.1", port, secret) as c:
                assert c.open("vm") == PAGES * PAGE
                assert c.read(PAGE, PAGE) == image_bytes[PAGE : 2 * PAGE]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("op", [Op.OPEN, Op.READ, Op.STATS, Op.FREEMAP])
def test_a_request_before_hello_is_refused_and_closed(server: Server, op: Op) -> None:
    sock = server.raw()
    sock.sendall(request(op, b"vm" if op == Op.OPEN else b""))
    reply = recv_reply(sock)
    assert (reply.op, reply.status) == (op, Status.EACCES)
    assert closed_by_peer(sock)


def test_a_payload_over_the_limit_is_refused_and_closed(server: Server) -> None:
    sock = server.raw()
    sock.sendall(request(Op.HELLO, offset=1, length=protocol.MAX_SECRET + 1))
    assert recv_reply(sock).status == Status.EINVAL
    assert closed_by_peer(sock)
    sock = server.raw()
    sock.sendall(protocol.hello(SECRET) + request(Op.OPEN, length=5000) + b"x" * 5000)
    assert recv_reply(sock).status == Status.OK
    assert recv_reply(sock).status == Status.EINVAL
    assert closed_by_peer(sock)
    assert "request too long" in server.log.read_text()


def test_another_version_is_refused_and_closed(server: Server) -> None:
    sock = server.raw()
    sock.sendall(request(Op.HELLO, SECRET, offset=2))
    reply = recv_reply(sock)
    assert (reply.status, reply.value) == (Status.EVERSION, protocol.VERSION)
    assert closed_by_peer(sock)


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xff" * 24, os.urandom(5000)],
    ids=["http", "ones", "random"],
)
def test_garbage_closes_only_that_client(
    server: Server, image_bytes: bytes, garbage: bytes
) -> None:
    with server.client() as good:
        bad = server.raw()
        bad.sendall(garbage)
        assert closed_by_peer(bad)
        assert good.read(0, 16 * PAGE)[PAGE : 2 * PAGE] == image_bytes[PAGE : 2 * PAGE]
        assert wait_for_clients(server, 2)["errors"] == 1
    assert "closed: bad magic" in server.log.read_text()


def test_bad_magic_after_a_good_hello_closes(server: Server) -> None:
    sock = server.raw()
    sock.sendall(protocol.hello(SECRET) + protocol.open_image("vm"))
    assert recv_reply(sock).status == recv_reply(sock).status == Status.OK
    sock.sendall(b"SFPN" + protocol.read(0, PAGE)[4:])
    assert closed_by_peer(sock)


@pytest.mark.parametrize(
    "partial",
    [
        protocol.hello(SECRET)[:10],
        protocol.hello(SECRET)[:-2],
        protocol.hello(SECRET) + protocol.open_image("vm")[:30],
        protocol.hello(SECRET) + protocol.open_image("vm") + protocol.read(0, 256 * PAGE),
    ],
    ids=["mid-header", "mid-payload", "mid-second", "before-reply"],
)
def test_a_client_that_disconnects_mid_message_disturbs_nothing(
    server: Server, image_bytes: bytes, partial: bytes
) -> None:
    with server.client() as good:
        for _ in range(20):
            sock = server.raw()
            sock.sendall(partial)
            sock.close()
        assert good.read(0, 4 * PAGE)[:PAGE] == image_bytes[:PAGE]
        wait_for_clients(server, 2)  # all 20 gone


def test_max_clients_closes_extra_connections(memserver_binary: Path, image_dir: Path) -> None:
    srv = start(memserver_binary, image_dir, "--max-clients", "2")
    try:
        first, second = srv.client(), srv.client()
        extra = srv.raw()
        assert closed_by_peer(extra)
        with pytest.raises(UnreachableError):
            srv.client()
        assert first.read(0, PAGE) == second.read(0, PAGE)
        second.close()
        with client_when_room(srv) as again:
            assert again.stats()["clients"] == 2
        first.close()
        assert "refused: too many clients" in srv.log.read_text()
    finally:
        assert srv.stop() == 0


def fuzz(srv: Server, seed: int, rounds: int) -> None:
    """Connections that send headers with the right magic and anything else, some cut
    short, some closed before their replies."""
    rng = random.Random(seed)
    for _ in range(rounds):
        msgs = [protocol.hello(SECRET)] if rng.random() < 0.8 else []
        if rng.random() < 0.7:
            msgs.append(protocol.open_image(rng.choice(["vm", "plain", "nope", "vm.free"])))
        for _ in range(rng.randint(1, 5)):
            length = rng.choice([0, 1, PAGE, 5000, 1 << 20, 2**32 - 1, rng.randrange(3000)])
            offset = rng.choice([0, PAGE, PAGES * PAGE, 2**63, 2**64 - 1, rng.randrange(2**64)])
            header = struct.pack("<IHHIIQ", protocol.MAGIC, rng.randrange(7), rng.randrange(2**16),
                                 length, rng.randrange(2**32), offset)  # fmt: skip
            msgs.append(header + rng.randbytes(min(length, 3000) if rng.random() < 0.5 else 0))
        data = b"".join(msgs)
        with srv.raw() as sock, contextlib.suppress(OSError):
            sock.sendall(data[: rng.randrange(len(data))] if rng.random() < 0.3 else data)
            if rng.random() < 0.5:  # else close at once, replies pending or not
                sock.shutdown(socket.SHUT_WR)
                assert closed_by_peer(sock)  # read what comes, till the server closes


def test_fuzzed_requests_break_nothing(server: Server, served_bytes: bytes) -> None:
    with server.client() as good:
        fuzz(server, seed=42, rounds=300)
        assert good.read(0, protocol.MAX_READ) == served_bytes[: protocol.MAX_READ]
    wait_for_clients(server, 1)


def test_clients_beyond_the_open_files_limit_are_refused(
    memserver_binary: Path, image_dir: Path
) -> None:
    few_files = ("prlimit", "--nofile=40:40")
    srv = start(memserver_binary, image_dir, "--max-clients", "1000", wrapper=few_files)
    try:
        clients = [srv.client() for _ in range(24)]  # 40 less 16 for the server itself
        assert closed_by_peer(srv.raw())
        assert clients[0].read(0, PAGE) == clients[-1].read(0, PAGE)
        for c in clients:
            c.close()
        assert "at most 24 clients" in srv.log.read_text()
    finally:
        assert srv.stop() == 0


# Counters ------------------------------------------------------------------------------


def test_stats_count_per_client(server: Server) -> None:
    with server.client() as a, server.client(image=None) as b:
        a.read(0, 32 * PAGE)
        stats = b.stats()
    assert stats["clients"] == 2
    [reader] = [e for e in stats["per_client"] if e["image"] == "vm"]
    [asker] = [e for e in stats["per_client"] if e["image"] is None]
    sent = 32 - 5 - 3
    assert reader == {"peer": reader["peer"], "image": "vm", "requests": 3,
                      "pages_sent": sent, "bytes_sent": 3 * 24 + 4 + sent * PAGE}  # fmt: skip
    assert (asker["requests"], asker["bytes_sent"]) == (2, 24)  # HELLO's reply: STATS' not yet
    for entry in (reader, asker):
        assert re.fullmatch(r"127\.0\.0\.1:\d+", entry["peer"])
    assert reader["peer"] != asker["peer"]
    assert stats["requests"] == 3 + 2
    assert stats["bytes_sent"] == reader["bytes_sent"] + 24


def test_sigusr1_prints_the_stats(server: Server) -> None:
    with server.client() as c:
        c.read(0, PAGE)
        server.proc.send_signal(signal.SIGUSR1)
        for _ in range(100):
            lines = [line for line in server.log.read_text().splitlines() if line[:1] == "{"]
            if lines:
                break
            time.sleep(0.05)
        stats = json.loads(lines[-1])
    assert stats["clients"] == 1 and stats["reads"] == 1


# Life cycle ------------------------------------------------------------------------------


def test_sigterm_with_clients_connected_exits_zero(server: Server) -> None:
    clients = [server.client() for _ in range(3)]
    half = server.raw()
    half.sendall(protocol.hello(SECRET)[:5])
    clients[0].read(0, PAGE)
    assert server.stop() == 0
    for c in clients:
        with pytest.raises(UnreachableError):
            c.read(0, PAGE)
    assert closed_by_peer(half)
    assert server.log.read_text().count("closed: the server stops") == 4


def test_sigint_exits_zero(server: Server) -> None:
    assert server.stop(signal.SIGINT) == 0


def test_help_exits_zero(memserver_binary: Path) -> None:
    out = subprocess.run([str(memserver_binary), "--help"], capture_output=True, text=True,
                         timeout=10, check=False)  # fmt: skip
    assert out.returncode == 0
    assert "--listen ADDR:PORT" in out.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--dir", "/tmp"],
        ["--listen", "127.0.0.1:0"],
        ["--dir", "/tmp", "--listen", "127.0.0.1"],
        ["--dir", "/tmp", "--listen", "127.0.0.1:70000"],
        ["--dir", "/tmp", "--listen", "127.0.0.1:x"],
        ["--dir", "/tmp", "--listen", "127.0.0.1:0", "--max-clients", "0"],
        ["--dir", "/tmp", "--listen", "127.0.0.1:0", "--ready-fd", "-1"],
        ["--dir", "/tmp", "--listen", "127.0.0.1:0", "--bogus"],
        ["--dir", "/tmp", "--listen", "127.0.0.1:0", "extra"],
        ["--dir"],
    ],
)
def test_bad_usage_exits_100(memserver_binary: Path, argv: list[str]) -> None:
    out = subprocess.run([str(memserver_binary), *argv], capture_output=True, text=True,
                         timeout=10, check=False)  # fmt: skip
    assert out.returncode == 100
    assert out.stderr.startswith("memserver: ")


@pytest.mark.parametrize("problem", ["no-dir", "no-secret", "port-taken"])
def test_start_up_failures_exit_111(memserver_binary: Path, tmp_path: Path, problem: str) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    argv = [str(memserver_binary), "--dir", str(tmp_path), "--listen", "127.0.0.1:0"]
    if problem == "no-dir":
        argv[2] = str(tmp_path / "missing")
    elif problem == "no-secret":
        argv += ["--secret-file", str(tmp_path / "missing")]
    else:
        argv[4] = f"127.0.0.1:{holder.getsockname()[1]}"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    holder.close()
    assert out.returncode == 111, out.stderr


def test_valgrind_finds_no_errors_or_leaks(
    memserver_binary: Path, image_dir: Path, served_bytes: bytes
) -> None:
    """A scenario of good and bad clients, under valgrind; then SIGTERM."""
    srv = start(memserver_binary, image_dir, "--max-clients", "3",
                wrapper=("valgrind", "-q", "--error-exitcode=1", "--leak-check=full"))  # fmt: skip
    try:
        with srv.client() as keeper:  # connected when the server stops
            with srv.client() as c:
                assert c.read(0, protocol.MAX_READ) == served_bytes[: protocol.MAX_READ]
                with refused(Status.ERANGE):
                    c.read(PAGES * PAGE, PAGE)
                assert c.freemap() == (image_dir / "vm.free").read_bytes()
                c.stats()
            (image_dir / "vm").unlink()
            keeper.read(0, PAGE)
            held = [greeted(srv) for _ in range(2)]
            assert closed_by_peer(srv.raw())  # a fourth client
            for sock in held:
                sock.close()
            wait_for_clients(srv, 2)  # keeper and the asker: the held ones are gone
            for junk in (b"\xff" * 30, protocol.hello(b"bad")):
                sock = srv.raw()
                sock.sendall(junk)
                assert closed_by_peer(sock)
            sock = srv.raw()
            sock.sendall(protocol.hello(SECRET)[:7])
            sock.close()
            fuzz(srv, seed=7, rounds=30)
            with client_when_room(srv, image=None) as c:
                with refused(Status.ESTATE):
                    c.freemap()
                with refused(Status.ENOENT):
                    c.open("vm")
            srv.proc.send_signal(signal.SIGUSR1)
            keeper.stats()
            status = srv.stop()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
    assert status == 0, srv.log.read_text()

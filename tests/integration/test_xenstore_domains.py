"""Domain connections on arbitrary streams, domain quotas and cloning, in-process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from sflib.xenstore.server import Connection, XenStoreServer
from sflib.xenstore.tree import Quotas
from sflib.xenstore.wire import Packet
from tests.xsclient import HDR, AsyncClient, XsError, payload

READ, WATCH, WRITE, MKDIR, SET_PERMS = 2, 4, 11, 12, 14


async def stream_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], AsyncClient, socket.socket
]:
    host, guest = socket.socketpair()
    server_side = await asyncio.open_connection(sock=host)
    client = AsyncClient(*await asyncio.open_connection(sock=guest))
    return server_side, client, guest


@pytest.fixture
async def server() -> AsyncIterator[XenStoreServer]:
    srv = XenStoreServer(Quotas(outstanding=5))
    yield srv
    await srv.close()


async def domain(srv: XenStoreServer, domid: int) -> AsyncClient:
    srv.local.make_domain(domid)
    (reader, writer), client, _ = await stream_pair()
    srv.attach(domid, reader, writer)
    return client


async def test_domain_uses_relative_paths_and_is_refused_others(server: XenStoreServer) -> None:
    d5 = await domain(server, 5)
    await domain(server, 6)
    assert await d5.call(WRITE, b"data/x\0hello") == b"OK\0"
    assert await d5.call(READ, payload("data/x")) == b"hello"
    assert await d5.call(READ, payload("/local/domain/5/data/x")) == b"hello"
    with pytest.raises(XsError, match="EACCES"):
        await d5.call(WRITE, b"/local/domain/6/x\0evil")
    with pytest.raises(XsError, match="EACCES"):
        await d5.call(WRITE, b"/tool/x\0evil")
    assert server.store.introduced >= {5, 6}


async def until(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_domain_outstanding_quota_pauses_reading(
    server: XenStoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = bytes(range(256)) * 15  # replies that fill the socket while the guest reads none
    server.local.make_domain(7)
    server.local.write("/local/domain/7/big", big)
    host, guest = socket.socketpair()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    reader, writer = await asyncio.open_connection(sock=host)
    processed = 0
    process = server.process

    def counting(conn: Connection, packet: Packet) -> None:
        nonlocal processed
        processed += 1
        process(conn, packet)

    monkeypatch.setattr(server, "process", counting)
    conn = server.attach(7, reader, writer)
    g_reader, g_writer = await asyncio.open_connection(sock=guest)
    for i in range(200):  # the guest writes requests but reads no replies yet
        g_writer.write(HDR.pack(READ, i, 0, 4) + b"big\0")
    await g_writer.drain()
    # Paused for good: the replies it holds are the quota's, and the one being written
    # waits for the guest to read.
    _, high = writer.transport.get_write_buffer_limits()
    await until("the server to stop reading", lambda: not conn.room.is_set()
                and writer.transport.get_write_buffer_size() > high)  # fmt: skip
    assert conn.queue.qsize() == server.quotas.outstanding
    assert processed < 200  # the rest wait unread
    for i in range(200):  # now it reads: every request is answered, in order
        _op, req, _tx, length = HDR.unpack(await g_reader.readexactly(16))
        assert (req, await g_reader.readexactly(length)) == (i, big)
    assert processed == 200


async def test_clone_inherits_subtree_and_pending_watch(server: XenStoreServer) -> None:
    parent = await domain(server, 5)
    await parent.call(WRITE, b"app/state\0loaded-scene")
    await parent.call(WATCH, payload("snowflock/reply", "clone"))
    assert await parent.next_event() == (b"snowflock/reply", b"clone")
    (reader, writer), child, _ = await stream_pair()
    server.clone_domain(5, 9, reader, writer)
    assert await child.call(READ, payload("app/state")) == b"loaded-scene"
    server.local.write("/local/domain/9/snowflock/reply", b"1")
    assert await child.next_event() == (b"snowflock/reply", b"clone")
    with pytest.raises(TimeoutError):
        await parent.next_event(timeout=0.3)
    with pytest.raises(XsError, match="EACCES"):
        await child.call(READ, payload("/local/domain/5/app/state"))


async def test_clone_to_an_existing_domain_changes_nothing(server: XenStoreServer) -> None:
    await domain(server, 5)
    await domain(server, 6)
    (reader, writer), _child, _ = await stream_pair()
    with pytest.raises(Exception, match="EEXIST"):
        server.clone_domain(5, 6, reader, writer)
    assert [c.domid for c in server.connections.values()].count(6) == 1


async def test_local_client_watch_calls_back(server: XenStoreServer) -> None:
    seen: list[tuple[str, bytes]] = []
    server.local.watch("/local/domain", b"mine", lambda p, t: seen.append((p, t)))
    d5 = await domain(server, 5)
    await d5.call(WRITE, b"snowflock/ready\0" + b"1")
    assert ("/local/domain/5/snowflock/ready", b"mine") in seen
    assert seen[0] == ("/local/domain", b"mine")
    server.local.unwatch("/local/domain", b"mine")
    seen.clear()
    await d5.call(WRITE, b"snowflock/ready\0" + b"2")
    assert seen == []


async def test_a_new_stream_can_resume_a_domains_session(server: XenStoreServer) -> None:
    """A VM continuing in a new QEMU process keeps its watches on the new stream."""
    server.local.make_domain(5)
    (reader, writer), old, _ = await stream_pair()
    first = server.attach(5, reader, writer)
    await old.call(WATCH, payload("snowflock/replies", "w"))
    assert await old.next_event() == (b"snowflock/replies", b"w")
    (reader, writer), new, _ = await stream_pair()
    second = server.attach(5, reader, writer, resume=first)
    assert second.session is first.session
    server.local.write("/local/domain/5/snowflock/replies/1", b"0")
    assert await new.next_event() == (b"snowflock/replies/1", b"w")
    assert await new.call(READ, payload("snowflock/replies/1")) == b"0"
    assert [c.domid for c in server.connections.values()] == [5]

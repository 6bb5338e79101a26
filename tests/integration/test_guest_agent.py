"""sf-guestd's agent (sflib.guest.agent) between real XenStore clients (pyxs, as
guest programs use it) and a real XenStore server that sees one domain connection,
as sfld's does for a VM. No VM: the port is the server's domain socket."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pyxs import Client

from sflib.errors import SystemFailure, UnreachableError
from sflib.guest import bus
from sflib.guest.agent import Agent
from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.tree import Quotas
from sflib.xenstore.wire import Op, Packet, PacketDecoder

DOMID = 1
WATCHES, TRANSACTIONS = 16, 8  # the domain's quotas (one connection's, all clients')


class Guest:
    def __init__(self, server: XenStoreServer, agent: Agent) -> None:
        self.server = server
        self.agent = agent
        self.socket = agent.socket_path

    def client(self) -> Client:
        return Client(unix_socket_path=str(self.socket))

    def held(self) -> tuple[int, int]:
        """The watches and transactions the host holds for the domain's connection."""
        [conn] = [c for c in self.server.connections.values() if c.domid == DOMID]
        return len(conn.session.watches), len(conn.session.transactions)

    async def released(self) -> None:
        """Until the host holds no watch or transaction of the domain (the agent's
        unwatches and aborts are answered). Fails the test after 10 s."""
        for _ in range(1000):
            if self.held() == (0, 0):
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"the host still holds (watches, transactions) {self.held()}")


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[Guest]:
    server = XenStoreServer(Quotas(watches=WATCHES, transactions=TRANSACTIONS))
    server.local.make_domain(DOMID)
    port = tmp_path / "port.sock"

    async def domain_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.attach(DOMID, reader, writer)

    port_server = await asyncio.start_unix_server(domain_connection, port)
    agent = Agent(port, tmp_path / "xenstored" / "socket")
    await agent.start()
    try:
        yield Guest(server, agent)
    finally:
        agent.close()
        port_server.close()
        await server.close()


def exchange(sock: socket.socket, packets: list[Packet]) -> list[Packet]:
    """Send raw requests on one client socket; their replies."""
    sock.sendall(b"".join(p.encode() for p in packets))
    decoder, replies = PacketDecoder(), []
    while len(replies) < len(packets):
        replies += [p for p in decoder.feed(sock.recv(65536)) if p.op != Op.WATCH_EVENT]
    return replies


def vanishing_client(path: Path, watches: int, transaction: bool) -> None:
    """A client that places watches (and starts a transaction), then is gone
    without undoing anything, as a killed process is."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        requests = [Packet(Op.WATCH, i + 1, 0, b"data/w%d\0tok\0" % i) for i in range(watches)]
        if transaction:
            requests.append(Packet(Op.TRANSACTION_START, 99, 0, b"\0"))
        assert all(r.op != Op.ERROR for r in exchange(sock, requests))


CLIENT = """
import sys
from pyxs import Client
k, key = sys.argv[2], b"data/c" + sys.argv[2].encode()
with Client(unix_socket_path=sys.argv[1]) as c, c.monitor() as m:
    m.watch(key, b"mine")
    events = m.wait()
    assert next(events) == (key, b"mine")  # the initial event
    c.write(key, b"v" + k.encode())
    assert next(events) == (key, b"mine")  # this client's own, not another's
    c.transaction()
    c.write(key + b"/tx", b"t" + k.encode())
    assert c.commit()
    print((c.read(key) + c.read(key + b"/tx")).decode())
"""


async def test_eight_clients_at_once_each_get_their_replies_and_events(guest: Guest) -> None:
    procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, str(guest.socket),
                                                  str(k), stdout=asyncio.subprocess.PIPE)
             for k in range(8)]  # fmt: skip
    try:
        outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0] * 8
    assert [out.decode().strip() for out, _ in outs] == [f"v{k}t{k}" for k in range(8)]
    await guest.released()


async def test_clients_that_vanish_leave_no_watches_or_transactions(guest: Guest) -> None:
    for _ in range(10):  # 30 watches and 10 transactions: more than the quotas
        await asyncio.to_thread(vanishing_client, guest.socket, 3, True)
    await guest.released()

    def after() -> None:  # the whole quotas are free
        vanishing_client(guest.socket, WATCHES, False)
        for _ in range(TRANSACTIONS):
            vanishing_client(guest.socket, 0, True)

    await asyncio.to_thread(after)
    await guest.released()


async def test_a_client_cannot_touch_another_clients_transaction(guest: Guest) -> None:
    def run() -> None:
        with socket.socket(socket.AF_UNIX) as owner, socket.socket(socket.AF_UNIX) as other:
            for sock in (owner, other):
                sock.settimeout(10)
                sock.connect(str(guest.socket))
            [started] = exchange(owner, [Packet(Op.TRANSACTION_START, 1, 0, b"\0")])
            tx = int(started.payload.rstrip(b"\0"))
            [stolen] = exchange(other, [Packet(Op.WRITE, 2, tx, b"data/x\0stolen")])
            assert (stolen.op, stolen.payload) == (Op.ERROR, b"EINVAL\0")
            replies = exchange(owner, [Packet(Op.WRITE, 3, tx, b"data/x\0mine"),
                                       Packet(Op.TRANSACTION_END, 4, tx, b"T\0")])  # fmt: skip
            assert [r.payload for r in replies] == [b"OK\0", b"OK\0"]
            [read] = exchange(other, [Packet(Op.READ, 5, 0, b"data/x\0")])
            assert read.payload == b"mine"

    await asyncio.to_thread(run)


async def test_a_second_agent_is_refused_while_the_first_serves(
        guest: Guest, tmp_path: Path) -> None:  # fmt: skip
    second = Agent(tmp_path / "port.sock", guest.socket)
    with pytest.raises(SystemFailure, match="another sf-guestd"):
        await second.start()
    second.close()
    assert guest.socket.exists()


def test_the_tools_fall_back_to_the_port_when_the_agents_socket_is_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    stale = tmp_path / "socket"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: as if it died
        dead.bind(str(stale))
    monkeypatch.setenv("XENSTORED_PATH", str(stale))
    monkeypatch.delenv("SF_XENBUS", raising=False)
    monkeypatch.setattr(bus, "PORT_PATH", str(tmp_path / "no-port"))
    with pytest.raises(UnreachableError, match=r"no XenStore port at .*no-port"):
        bus.open_bus()

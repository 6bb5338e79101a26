"""asyncio adapter: XenStore connections over byte streams.

Domain 0's clients connect to a Unix socket; a domain's connection is any stream
(its VM's virtio-serial port) attached with attach(). Each connection has a reader
task and a writer task joined by a queue, so a client that stops reading only
stalls itself: it is not read from while `outstanding` replies are unsent, and a
domain's watch events beyond `events` queued are dropped, as Xen does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sflib.xenstore import snapshot
from sflib.xenstore.names import domain_path
from sflib.xenstore.perms import parse_perms
from sflib.xenstore.requests import handle
from sflib.xenstore.store import Event, Session, Store
from sflib.xenstore.tree import Quotas, Tree
from sflib.xenstore.wire import HEADER, Packet, ProtocolError, XenStoreError, decode_header

log = logging.getLogger(__name__)
T = TypeVar("T")
WatchCallback = Callable[[str, bytes], None]

DOM0_OUTSTANDING = 1024


class Connection:
    def __init__(
        self,
        server: XenStoreServer,
        session: Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.session = session
        self.detached = False
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[Packet] = asyncio.Queue()
        self.room = asyncio.Event()
        self.room.set()
        self.dropped_events = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def domid(self) -> int:
        return self.session.domid

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"xs-read-{self.session.id}"),
            asyncio.create_task(self._write_loop(), name=f"xs-write-{self.session.id}"),
        ]

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """Drop the connection; what it had not committed is discarded."""
        self._finish()

    def deliver_event(self, packet: Packet) -> None:
        if not self.session.privileged and self.queue.qsize() >= self.server.quotas.events:
            self.dropped_events += 1
            log.warning("domain %d: watch event dropped, queue full", self.domid)
            return
        self._enqueue(packet)

    @property
    def outstanding_limit(self) -> int:
        # Domain 0 is trusted, but its clients' memory is still ours: bound it too.
        return DOM0_OUTSTANDING if self.session.privileged else self.server.quotas.outstanding

    def _enqueue(self, packet: Packet) -> None:
        self.queue.put_nowait(packet)
        if self.queue.qsize() >= self.outstanding_limit:
            self.room.clear()

    async def _read_loop(self) -> None:
        try:
            while True:
                await self.room.wait()
                header = await self.reader.readexactly(HEADER.size)
                op, req_id, tx_id, length = decode_header(header)
                payload = await self.reader.readexactly(length)
                self.server.process(self, Packet(op, req_id, tx_id, payload))
        except asyncio.IncompleteReadError:
            pass  # the peer went away: the normal end of a connection
        except ProtocolError as e:
            log.warning("domain %d: closing connection: %s", self.domid, e)
        except (ConnectionError, OSError) as e:
            log.info("domain %d: connection lost: %s", self.domid, e)
        finally:
            self._finish()

    async def _write_loop(self) -> None:
        try:
            while True:
                packet = await self.queue.get()
                self.writer.write(packet.encode())
                await self.writer.drain()
                if self.queue.qsize() < self.outstanding_limit:
                    self.room.set()
        except (ConnectionError, OSError) as e:
            log.info("domain %d: write failed: %s", self.domid, e)
            self._finish()

    def detach(self) -> Session:
        """Drop the stream but keep the session (its watches, its transactions) for a
        new stream: the same domain continuing in another QEMU process."""
        self.detached = True
        self._finish()
        return self.session

    def _finish(self) -> None:
        if self.server.connections.get(self.session.id) is self:
            if self.detached:
                del self.server.connections[self.session.id]
            else:
                self.server.forget(self)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


class XenStoreServer:
    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.store = Store(self.quotas)
        self.connections: dict[int, Connection] = {}
        self._servers: list[asyncio.Server] = []
        self.local = LocalClient(self)

    async def listen_unix(self, path: Path) -> None:
        """Serve domain 0 on a Unix socket at path (replacing a stale one)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.start_unix_server(self._accept_dom0, path=os.fspath(path))
        path.chmod(0o600)
        self._servers.append(server)

    async def _accept_dom0(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._start(Connection(self, self.store.open_session(0), reader, writer))

    def attach(
        self,
        domid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        resume: Connection | None = None,
    ) -> Connection:
        """Bind a stream to domain domid (which becomes introduced). With resume, the
        stream takes over that connection's session: watches placed before carry on."""
        if resume is not None and resume.domid == domid:
            conn = Connection(self, resume.detach(), reader, writer)
        else:
            conn = Connection(self, self.store.open_session(domid), reader, writer)
            self.deliver(self.store.introduce(domid))
        self._start(conn)
        return conn

    def clone_domain(
        self, src: int, dst: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Connection:
        """Domain dst becomes a copy of src: its subtree, and src's watches on a new stream.

        Raises XenStoreError (ENOENT, EEXIST, EINVAL) and then changes nothing.
        """
        return self.restore_domain(snapshot.take(self.store, src), dst, reader, writer)

    def restore_domain(
        self,
        snap: snapshot.DomainSnapshot,
        dst: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> Connection:
        """Domain dst becomes the snapshot's domain: its subtree, and its watches on a
        new stream. Raises XenStoreError (EEXIST, EINVAL) and then changes nothing."""
        conn = Connection(self, self.store.open_session(dst), reader, writer)
        try:
            events = snapshot.restore(self.store, snap, dst, conn.session)
        except Exception:
            self.store.close_session(conn.session)
            raise
        self._start(conn)
        self.deliver(events)
        return conn

    def release_domain(self, domid: int) -> None:
        """Forget a domain that is gone: close its connections, remove its subtree."""
        if domid in self.store.introduced:
            self.deliver(self.store.release(domid))
        for conn in [c for c in self.connections.values() if c.domid == domid]:
            conn.close()
        with contextlib.suppress(XenStoreError):
            self.local.rm(domain_path(domid))

    def _start(self, conn: Connection) -> None:
        self.connections[conn.session.id] = conn
        conn.start()

    def process(self, conn: Connection, packet: Packet) -> None:
        outcome = handle(self.store, conn.session, packet)
        conn._enqueue(outcome.reply)
        self.deliver(outcome.events)
        for domid in outcome.released:
            for other in list(self.connections.values()):
                if other.domid == domid:
                    other.close()

    def deliver(self, events: list[Event]) -> None:
        for session_id, packet in events:
            conn = self.connections.get(session_id)
            if conn is not None:
                conn.deliver_event(packet)
            elif session_id == self.local.session.id:
                self.local.dispatch(packet)

    def forget(self, conn: Connection) -> None:
        self.connections.pop(conn.session.id, None)
        self.store.close_session(conn.session)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        conns = list(self.connections.values())
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.wait_closed() for c in conns))


class LocalClient:
    """Domain 0's operations from inside the process (sfld), firing watches as usual.

    Raises XenStoreError as a remote client would see it.
    """

    def __init__(self, server: XenStoreServer) -> None:
        self.server = server
        self.session = server.store.open_session(0)
        self.callbacks: dict[bytes, WatchCallback] = {}

    def watch(self, path: str, token: bytes, callback: WatchCallback) -> None:
        """Call callback(path, token) on every event, starting with the initial one."""
        self.callbacks[token] = callback
        self.server.deliver(self.server.store.watch(self.session, path, token))

    def unwatch(self, path: str, token: bytes) -> None:
        self.server.store.unwatch(self.session, path, token)
        self.callbacks.pop(token, None)

    def dispatch(self, event: Packet) -> None:
        path, token, _ = event.payload.split(b"\0")
        callback = self.callbacks.get(token)
        if callback is not None:
            callback(path.decode(), token)

    def _run(self, action: Callable[[Tree], T]) -> T:
        tree = self.server.store.tree(self.session, 0)
        result = action(tree)
        self.server.deliver(self.server.store.fire(tree.changes))
        return result

    def read(self, path: str) -> bytes:
        return self._run(lambda t: t.read(path))

    def directory(self, path: str) -> list[str]:
        return list(self._run(lambda t: t.directory(path)))

    def write(self, path: str, value: bytes) -> None:
        self._run(lambda t: t.write(path, value))

    def mkdir(self, path: str) -> None:
        self._run(lambda t: t.mkdir(path))

    def rm(self, path: str) -> None:
        self._run(lambda t: t.rm(path))

    def set_perms(self, path: str, perms: list[str]) -> None:
        parsed = parse_perms(perms)
        self._run(lambda t: t.set_perms(path, parsed))

    def make_domain(self, domid: int) -> str:
        """Create /local/domain/<domid> owned by that domain; returns its path."""
        path = domain_path(domid)
        self.mkdir(path)
        self.set_perms(path, [f"n{domid}"])
        return path

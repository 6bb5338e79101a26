"""sf-guestd's I/O: the virtio-serial port on one side, a Unix socket on the other,
sflib.guest.mux deciding what goes where.

The socket is where Xen guests find xenstored (/run/xenstored/socket), so pyxs,
libxenstore and xenstore-utils work in the guest unchanged. A fork clones this
process with the rest of the guest: its port descriptor and its clients' sockets
go on in each clone, and a client waiting for a watch event (sf-clone's reply)
gets the event its clone's host fires there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from sflib.errors import SystemFailure, UsageError
from sflib.guest.mux import Mux, Out
from sflib.xenstore.wire import Packet, PacketDecoder, ProtocolError

log = logging.getLogger(__name__)

READ_SIZE = 65536
HOST_AWAY_RETRY = 0.05  # s between reads while nobody holds the port's host end
CLIENT_BACKLOG = 4 << 20  # bytes queued for a client that does not read: it is dropped


class Agent:
    def __init__(self, port: Path, socket_path: Path, mode: int = 0o600) -> None:
        self.port_path = port
        self.socket_path = socket_path
        self.mode = mode
        self.mux = Mux()
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self._port_fd = -1
        self._port_socket: socket.socket | None = None  # when the port is a server's socket
        self._port_decoder = PacketDecoder()
        self._port_out = bytearray()
        self._away = False  # the port's host end seemed gone (said once)
        self._server: asyncio.AbstractServer | None = None
        self.failed: asyncio.Future[None] | None = None

    # Start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the port and listen. Raises UsageError (no port: not a SnowFlock VM)
        or SystemFailure."""
        self.failed = asyncio.get_running_loop().create_future()
        self._open_port()
        self._send_host([self.mux.reset()])
        try:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.socket_path)
            self._server = await asyncio.start_unix_server(self._serve_client, self.socket_path)
            os.chmod(self.socket_path, self.mode)
        except OSError as e:
            self.close()
            raise SystemFailure(f"cannot listen on {self.socket_path}: {e.strerror}") from e
        except BaseException:
            self.close()  # the port too: the agent that serves needs it
            raise
        log.info("serving XenStore at %s over %s", self.socket_path, self.port_path)

    def _open_port(self) -> None:
        try:
            if stat.S_ISSOCK(os.stat(self.port_path).st_mode):  # a XenStore server's
                self._port_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._port_socket.connect(os.fspath(self.port_path))
                self._port_socket.setblocking(False)
                self._port_fd = self._port_socket.fileno()
            else:
                self._port_fd = os.open(self.port_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"no XenStore port at {self.port_path}",
                             hint="is this a SnowFlock VM?") from None  # fmt: skip
        except OSError as e:
            hint = "another sf-guestd holds it" if e.errno == errno.EBUSY else None
            raise SystemFailure(f"cannot open the XenStore port {self.port_path}: "
                                f"{e.strerror}", hint=hint) from e  # fmt: skip
        asyncio.get_running_loop().add_reader(self._port_fd, self._port_readable)

    def close(self) -> None:
        """Stop listening, drop every client, close the port."""
        if self.failed is not None and self.failed.done() and not self.failed.cancelled():
            self.failed.exception()  # seen: serve() raises it, a test may not ask
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self._port_fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._port_fd)
            loop.remove_writer(self._port_fd)
            if self._port_socket is not None:
                self._port_socket.close()
            else:
                os.close(self._port_fd)
            self._port_fd = -1
        for writer in list(self.writers.values()):
            writer.close()
        self.writers.clear()

    # The port ----------------------------------------------------------------------

    def _port_readable(self) -> None:
        try:
            data = os.read(self._port_fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            self._host_away(f"cannot read the XenStore port: {e.strerror}")
        if not data and self._port_socket is not None:
            self._fail(SystemFailure("the XenStore server closed the connection"))
            return
        if not data:  # the host end is not connected (yet, or for a moment)
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._port_fd)
            loop.call_later(HOST_AWAY_RETRY, self._watch_port)
            return
        self._host_back()
        try:
            packets = self._port_decoder.feed(data)
        except ProtocolError as e:
            self._fail(SystemFailure(f"the host sent what is not XenStore: {e}"))
            return
        for packet in packets:
            self._deliver(self.mux.from_host(packet))

    def _watch_port(self) -> None:
        if self._port_fd >= 0:
            asyncio.get_running_loop().add_reader(self._port_fd, self._port_readable)

    def _send_host(self, packets: list[Packet]) -> None:
        if not packets or self._port_fd < 0:  # closed: the clients' last words are moot
            return
        idle = not self._port_out
        self._port_out += b"".join(p.encode() for p in packets)
        if idle:
            self._flush_port()

    def _flush_port(self) -> None:
        if self._port_fd < 0:
            return
        try:
            while self._port_out:
                del self._port_out[: os.write(self._port_fd, self._port_out)]
        except BlockingIOError:
            pass  # the rest when the port takes it
        except OSError as e:  # the host end is away (sfld restarting): try again
            if self._port_socket is not None:
                self._fail(SystemFailure(f"cannot write to the XenStore server: {e.strerror}"))
                return
            self._host_away(f"cannot write the XenStore port: {e.strerror}")
            asyncio.get_running_loop().call_later(HOST_AWAY_RETRY, self._flush_port)
            return
        loop = asyncio.get_running_loop()
        if self._port_out:
            loop.add_writer(self._port_fd, self._flush_port)
        else:
            loop.remove_writer(self._port_fd)

    def _host_away(self, why: str) -> None:
        """Requests wait (buffered) while the host end is away; said once."""
        if not self._away:
            log.warning("%s; waiting for the host", why)
            self._away = True

    def _host_back(self) -> None:
        if self._away:
            log.info("the host is back on the XenStore port")
            self._away = False

    def _fail(self, error: SystemFailure) -> None:
        if self.failed is not None and not self.failed.done():
            self.failed.set_exception(error)

    # Clients -----------------------------------------------------------------------

    def _deliver(self, out: Out) -> None:
        self._send_host(out.host)
        for client, packet in out.clients:
            writer = self.writers.get(client)
            if writer is None or writer.is_closing():
                continue
            if writer.transport.get_write_buffer_size() > CLIENT_BACKLOG:
                log.warning("client %d takes none of its replies and events: disconnected",
                            client)  # fmt: skip
                writer.close()  # its reader sees the end and undoes what it held
                continue
            writer.write(packet.encode())

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:  # fmt: skip
        client = self.mux.connect()
        self.writers[client] = writer
        decoder = PacketDecoder()
        log.debug("client %d connected", client)
        try:
            while data := await reader.read(READ_SIZE):
                for packet in decoder.feed(data):
                    self._deliver(self.mux.from_client(client, packet))
                await writer.drain()
        except ProtocolError as e:
            log.warning("client %d sent what is not XenStore (%s): disconnected", client, e)
        except ConnectionError:
            pass  # it went: the same as EOF
        finally:
            self.writers.pop(client, None)
            self._deliver(self.mux.disconnect(client))
            writer.close()
            log.debug("client %d gone", client)


def _remove_stale(path: Path) -> None:
    """A socket left by an agent that died goes; one that answers means another
    agent runs (it would also hold the port). Raises SystemFailure."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SystemFailure(f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise SystemFailure(f"another sf-guestd listens on {path}")


async def serve(port: Path, socket_path: Path, mode: int, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Run until stop is set (or the port fails). Raises SnowFlockError."""
    agent = Agent(port, socket_path, mode)
    await agent.start()
    stop = stop or asyncio.Event()
    try:
        if ready is not None:
            ready.set()
        assert agent.failed is not None
        stopped = asyncio.ensure_future(stop.wait())
        waiting: list[asyncio.Future[Any]] = [stopped, agent.failed]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if agent.failed.done():
            agent.failed.result()  # raises the port's failure
    finally:
        agent.close()

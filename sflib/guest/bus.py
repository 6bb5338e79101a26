"""The guest's end of the XenStore channel: pyxs on sf-guestd's socket, which any
number of processes share, or on the virtio-serial port itself (one at a time).

pyxs treats a device path as Xen's /dev/xen/xenbus, whose kernel driver rewrites
request IDs, and so refuses watches (Monitor) on it. Our port carries the plain
wire protocol, so it is given to pyxs as a packet connection of its own.
"""

from __future__ import annotations

import errno
import logging
import os

from pyxs import Client, PyXSError
from pyxs.client import Router
from pyxs.connection import PacketConnection

from sflib.errors import UnreachableError

log = logging.getLogger(__name__)

XENBUS_PORT = "org.snowflock.xenbus"
PORT_PATH = f"/dev/virtio-ports/{XENBUS_PORT}"
AGENT_SOCKET = "/run/xenstored/socket"  # sf-guestd's, where Xen guests find xenstored


class _PortTransport:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int) -> bytes:
        chunks = []
        while size:
            data = os.read(self.fd, size)
            if not data:
                raise OSError(errno.ECONNRESET, "XenStore port closed")
            chunks.append(data)
            size -= len(data)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def close(self) -> None:
        os.close(self.fd)


class PortConnection(PacketConnection):  # type: ignore[misc]
    def __init__(self, path: str) -> None:
        self.path = path

    def create_transport(self) -> _PortTransport:
        return _PortTransport(self.path)


def check_reachable() -> None:
    """Raises UnreachableError, as open_bus would, when there is neither the agent's
    socket nor a port: before a call takes the guest's free memory (outside a VM it
    would take the machine's)."""
    port = os.environ.get("SF_XENBUS") or PORT_PATH
    agent = os.environ.get("XENSTORED_PATH", AGENT_SOCKET)
    if not os.path.exists(port) and ("SF_XENBUS" in os.environ or not os.path.exists(agent)):
        raise UnreachableError(f"no XenStore port at {port}", hint="is this a SnowFlock VM?")


def open_bus(path: str | None = None) -> Client:
    """A connected pyxs client, watches included: through sf-guestd(8)'s socket when
    it serves, else (or with $SF_XENBUS) on the port itself, which admits one
    process at a time. Raises UnreachableError."""
    path = path or os.environ.get("SF_XENBUS")
    agent = os.environ.get("XENSTORED_PATH", AGENT_SOCKET)
    if path is None and os.path.exists(agent):
        try:
            return _connected(Client(unix_socket_path=agent), agent)
        except UnreachableError as e:  # a dead agent's socket: the port is free then
            log.debug("%s; trying the port", e)
    path = path or PORT_PATH
    if not os.path.exists(path):
        raise UnreachableError(f"no XenStore port at {path}", hint="is this a SnowFlock VM?")
    return _connected(Client(router=Router(PortConnection(path))), path)


def _connected(client: Client, path: str) -> Client:
    try:
        client.connect()
    except (OSError, PyXSError) as e:
        raise UnreachableError(f"cannot open the XenStore connection {path}: {e}") from e
    return client

"""A blocking client of the memory server (c/memserver.c), for sfld and the tests.

memtap is the real client; this one serves checks and tools that want a page range
or the server's counters. Every byte on the wire goes through sflib.memory.protocol.
"""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any

from sflib.errors import UnreachableError
from sflib.memory import protocol
from sflib.memory.protocol import Op, ProtocolError, Reply

# The largest reply this client accepts: a STATS of a server with many clients. A
# FREEMAP reply may be longer: its bound is its image's, ceil(pages / 8) bytes.
MAX_REPLY = 16 * 1024 * 1024


class MemoryClient:
    """One connection to a memory server, greeted. Use connect() to make one."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock: socket.socket | None = sock
        self.where = where

    @classmethod
    def connect(
        cls, host: str, port: int, secret: bytes = b"", timeout: float = 10.0
    ) -> MemoryClient:
        """Connects and says HELLO. Raises UnreachableError, or ProtocolError if refused."""
        where = f"memory server {host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise UnreachableError(f"cannot connect to the {where}: {e}") from None
        client = cls(sock, where)
        try:
            client._call(Op.HELLO, protocol.hello(secret))
        except BaseException:
            client.close()
            raise
        return client

    def open(self, name: str) -> int:
        """Opens the image name for this connection; returns its size in bytes."""
        reply, _ = self._call(Op.OPEN, protocol.open_image(name))
        return reply.value

    def read_raw(self, offset: int, length: int) -> tuple[list[bool], bytes]:
        """For each page of the range, whether the server sent it; and the pages it sent."""
        reply, payload = self._read(offset, length)
        n = protocol.bitmap_bytes(reply.pages)
        present = protocol.pages_present(payload[:n], reply.pages)
        if len(payload) - n != protocol.PAGE * sum(present):
            raise ProtocolError(
                f"READ reply carries {len(payload) - n} bytes for {sum(present)} pages"
            )
        return present, payload[n:]

    def read(self, offset: int, length: int) -> bytes:
        """The range's bytes, the pages the server did not send filled with zeros."""
        reply, payload = self._read(offset, length)
        return protocol.assemble(payload, reply.pages)

    def freemap(self) -> bytes:
        """The open image's free-page map: bit i (of byte i // 8, least significant
        first) set when page i is free; all zero bytes if the image has none."""
        reply, payload = self._call(Op.FREEMAP, protocol.freemap())
        try:
            return protocol.decode_freemap(payload, reply.pages)
        except ProtocolError:
            self.close()
            raise

    def stats(self) -> dict[str, Any]:
        _, payload = self._call(Op.STATS, protocol.stats())
        return protocol.decode_stats(payload)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self, offset: int, length: int) -> tuple[Reply, bytes]:
        reply, payload = self._call(Op.READ, protocol.read(offset, length))
        if reply.pages != length // protocol.PAGE or reply.value != offset:
            self.close()
            raise ProtocolError(
                f"READ reply for {reply.pages} pages at {reply.value}"
                f" where {length // protocol.PAGE} at {offset} were asked"
            )
        return reply, payload

    def _call(self, op: Op, request: bytes) -> tuple[Reply, bytes]:
        """Sends request, returns its reply and payload. Raises ProtocolError if refused."""
        try:
            self._send(request)
            reply, payload = self._receive()
        except (UnreachableError, ProtocolError):
            self.close()  # the stream is gone, or out of step
            raise
        return protocol.check(reply, op), payload

    def _receive(self) -> tuple[Reply, bytes]:
        reply = protocol.decode_reply(self._recv(protocol.HEADER))
        limit = protocol.bitmap_bytes(reply.pages) if reply.op == Op.FREEMAP else MAX_REPLY
        if reply.length > limit:
            raise ProtocolError(f"reply of {reply.length} bytes is too long")
        return reply, self._recv(reply.length)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise UnreachableError(f"the connection to the {self.where} is closed")
        return self._sock

    def _send(self, data: bytes) -> None:
        try:
            self._socket().sendall(data)
        except OSError as e:
            raise UnreachableError(f"lost the {self.where}: {e}") from None

    def _recv(self, size: int) -> bytes:
        sock, out = self._socket(), bytearray()
        while len(out) < size:
            try:
                chunk = sock.recv(min(size - len(out), 1 << 20))
            except OSError as e:
                raise UnreachableError(f"lost the {self.where}: {e}") from None
            if not chunk:
                raise UnreachableError(f"the {self.where} closed the connection")
            out += chunk
        return bytes(out)

"""A minimal raw XenStore client for tests: sends exactly the bytes we say.

Independent of sflib's codec on purpose (struct by hand), so a codec bug cannot
hide itself.
"""

from __future__ import annotations

import asyncio
import socket
import struct

HDR = struct.Struct("<IIII")
ERROR = 16
EVENT = 15


class XsError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def payload(*args: str | bytes) -> bytes:
    return b"".join((a.encode() if isinstance(a, str) else a) + b"\0" for a in args)


class SyncClient:
    """Blocking client on a connected socket; events are kept apart from replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.events: list[tuple[bytes, bytes]] = []
        self.req = 0

    @classmethod
    def unix(cls, path: str) -> SyncClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        return cls(s)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_packet(self) -> tuple[int, int, int, bytes]:
        head = self._exact(HDR.size)
        op, req, tx, length = HDR.unpack(head)
        return op, req, tx, self._exact(length)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by the server")
            buf += chunk
        return buf

    def call(self, op: int, data: bytes, tx: int = 0) -> bytes:
        self.req += 1
        self.send_raw(HDR.pack(op, self.req, tx, len(data)) + data)
        while True:
            rop, req, _tx, body = self.recv_packet()
            if rop == EVENT:
                path, token, _ = body.split(b"\0")
                self.events.append((path, token))
                continue
            assert req == self.req, (req, self.req)
            if rop == ERROR:
                raise XsError(body.rstrip(b"\0").decode())
            assert rop == op
            return body

    def next_event(self) -> tuple[bytes, bytes]:
        if self.events:
            return self.events.pop(0)
        rop, _req, _tx, body = self.recv_packet()
        assert rop == EVENT, rop
        path, token, _ = body.split(b"\0")
        return path, token

    def close(self) -> None:
        self.sock.close()


class AsyncClient:
    """The same over asyncio streams (for domain connections in-process)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[tuple[bytes, bytes]] = []
        self.req = 0

    async def call(self, op: int, data: bytes, tx: int = 0) -> bytes:
        self.req += 1
        self.writer.write(HDR.pack(op, self.req, tx, len(data)) + data)
        while True:
            rop, req, _tx, body = await self._packet()
            if rop == EVENT:
                path, token, _ = body.split(b"\0")
                self.events.append((path, token))
                continue
            assert req == self.req
            if rop == ERROR:
                raise XsError(body.rstrip(b"\0").decode())
            return body

    async def next_event(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        if self.events:
            return self.events.pop(0)
        rop, _req, _tx, body = await asyncio.wait_for(self._packet(), timeout)
        assert rop == EVENT, rop
        path, token, _ = body.split(b"\0")
        return path, token

    async def _packet(self) -> tuple[int, int, int, bytes]:
        op, req, tx, length = HDR.unpack(await self.reader.readexactly(HDR.size))
        return op, req, tx, await self.reader.readexactly(length)

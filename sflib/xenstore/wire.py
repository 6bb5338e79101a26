"""The XenStore wire protocol (Xen's xs_wire.h and docs/misc/xenstore.txt).

Pure functions and a pure incremental decoder: no I/O here.

A packet is a 16-byte header of four little-endian uint32 (type, req_id, tx_id,
len) followed by len <= 4096 bytes of payload. Most payloads are NUL-terminated
strings; WRITE's value is raw bytes after the path's NUL.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048


class Op(IntEnum):
    CONTROL = 0  # was DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


# xsd_errors[] of xs_wire.h: the only error strings a client understands.
ERROR_NAMES: dict[int, str] = {
    errno.EINVAL: "EINVAL",
    errno.EACCES: "EACCES",
    errno.EEXIST: "EEXIST",
    errno.EISDIR: "EISDIR",
    errno.ENOENT: "ENOENT",
    errno.ENOMEM: "ENOMEM",
    errno.ENOSPC: "ENOSPC",
    errno.EIO: "EIO",
    errno.ENOTEMPTY: "ENOTEMPTY",
    errno.ENOSYS: "ENOSYS",
    errno.EROFS: "EROFS",
    errno.EBUSY: "EBUSY",
    errno.EAGAIN: "EAGAIN",
    errno.EISCONN: "EISCONN",
    errno.E2BIG: "E2BIG",
    errno.EPERM: "EPERM",
}


class XenStoreError(Exception):
    """A request failed with one of Xen's errors; sent back as an ERROR packet."""

    def __init__(self, err: int, detail: str = "") -> None:
        if err not in ERROR_NAMES:
            raise ValueError(f"not a XenStore error: {err}")
        super().__init__(f"{ERROR_NAMES[err]}{': ' + detail if detail else ''}")
        self.errno = err
        self.detail = detail

    @property
    def name(self) -> str:
        return ERROR_NAMES[self.errno]


class ProtocolError(Exception):
    """The byte stream is not XenStore: the connection must be closed."""


@dataclass(frozen=True)
class Packet:
    op: int  # an Op, or an unknown number a client sent
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        if len(self.payload) > PAYLOAD_MAX:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {PAYLOAD_MAX}")
        return HEADER.pack(self.op, self.req_id, self.tx_id, len(self.payload)) + self.payload


def reply(request: Packet, payload: bytes) -> Packet:
    return Packet(request.op, request.req_id, request.tx_id, payload)


def error_reply(request: Packet, err: XenStoreError) -> Packet:
    return Packet(Op.ERROR, request.req_id, request.tx_id, err.name.encode() + b"\0")


def watch_event(path: str, token: bytes) -> Packet:
    return Packet(Op.WATCH_EVENT, 0, 0, path.encode() + b"\0" + token + b"\0")


def decode_header(data: bytes) -> tuple[int, int, int, int]:
    """(type, req_id, tx_id, len) of a 16-byte header; ProtocolError if len is too big."""
    op, req_id, tx_id, length = HEADER.unpack(data)
    if length > PAYLOAD_MAX:
        raise ProtocolError(f"payload length {length} exceeds {PAYLOAD_MAX}")
    return op, req_id, tx_id, length


class PacketDecoder:
    """Turns a byte stream into packets, whatever the chunking."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """Add bytes; return every packet now complete. Raises ProtocolError."""
        self._buf += data
        packets = []
        while len(self._buf) >= HEADER.size:
            op, req_id, tx_id, length = decode_header(bytes(self._buf[: HEADER.size]))
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            packets.append(Packet(op, req_id, tx_id, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return packets

    @property
    def pending(self) -> int:
        return len(self._buf)


def split_strings(payload: bytes, count: int) -> list[str]:
    """Exactly count NUL-terminated ASCII strings, or EINVAL."""
    if not payload.endswith(b"\0"):
        raise XenStoreError(errno.EINVAL, "payload not NUL-terminated")
    parts = payload[:-1].split(b"\0")
    if len(parts) != count:
        raise XenStoreError(errno.EINVAL, f"expected {count} argument(s), got {len(parts)}")
    return [_ascii(p) for p in parts]


def split_list(payload: bytes) -> list[str]:
    """One or more NUL-terminated ASCII strings (e.g. SET_PERMS)."""
    if not payload.endswith(b"\0"):
        raise XenStoreError(errno.EINVAL, "payload not NUL-terminated")
    return [_ascii(p) for p in payload[:-1].split(b"\0")]


def split_path_value(payload: bytes) -> tuple[str, bytes]:
    """WRITE: a NUL-terminated path, then the value's raw bytes."""
    path, sep, value = payload.partition(b"\0")
    if not sep:
        raise XenStoreError(errno.EINVAL, "path not NUL-terminated")
    return _ascii(path), value


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XenStoreError(errno.EINVAL, "argument is not ASCII") from None


def join_strings(items: list[str]) -> bytes:
    return b"".join(s.encode() + b"\0" for s in items)

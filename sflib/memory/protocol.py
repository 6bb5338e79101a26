"""The memory server's wire protocol: pure encoders and decoders, no I/O.

The C programs (c/memserver.c, c/memtap.c) and this module speak the format that
c/memproto.h documents; the constants below must match it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sflib.errors import SnowFlockError

MAGIC = 0x4D504653
VERSION = 1
PAGE = 4096
HEADER = 24
MAX_NAME = 255
MAX_SECRET = 1024
MAX_READ = 1024 * 1024
MAX_FREEMAP = 512 * 1024 * 1024  # a FREEMAP reply's payload: ceil(2**32 - 1 pages / 8)

_REQUEST = struct.Struct("<IHHIIQ")
_REPLY = struct.Struct("<IHHIIQ")


class Op(IntEnum):
    HELLO = 1
    OPEN = 2
    READ = 3
    STATS = 4
    FREEMAP = 5


class Status(IntEnum):
    OK = 0
    EINVAL = 1
    ENOENT = 2
    ERANGE = 3
    EACCES = 4
    ESTATE = 5
    EIO = 6
    EVERSION = 7


class ProtocolError(SnowFlockError):
    """A memory server broke the protocol, or answered with an error status."""

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Reply:
    op: Op
    status: Status
    length: int
    pages: int
    value: int


def encode_request(
    op: Op, payload: bytes = b"", offset: int = 0, length: int | None = None
) -> bytes:
    """A request header and its payload. length defaults to the payload's."""
    size = len(payload) if length is None else length
    return _REQUEST.pack(MAGIC, op, 0, size, 0, offset) + payload


def hello(secret: bytes) -> bytes:
    return encode_request(Op.HELLO, secret, offset=VERSION)


def open_image(name: str) -> bytes:
    return encode_request(Op.OPEN, name.encode())


def read(offset: int, length: int) -> bytes:
    return encode_request(Op.READ, offset=offset, length=length)


def stats() -> bytes:
    return encode_request(Op.STATS)


def freemap() -> bytes:
    return encode_request(Op.FREEMAP)


@dataclass(frozen=True)
class Request:
    op: Op
    length: int
    offset: int


def decode_request(header: bytes) -> Request:
    """A request header, as a server reads it. Raises ProtocolError for a bad magic
    (status None: close the connection) or an unknown op (status EINVAL)."""
    if len(header) != HEADER:
        raise ProtocolError(f"short request header: {len(header)} bytes")
    magic, op, _flags, length, _reserved, offset = _REQUEST.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#x} in a request")
    try:
        return Request(Op(op), length, offset)
    except ValueError:
        raise ProtocolError(f"unknown op {op} in a request", Status.EINVAL) from None


def encode_reply(
    op: Op, status: Status = Status.OK, payload: bytes = b"", pages: int = 0, value: int = 0
) -> bytes:
    """A reply header and its payload."""
    return _REPLY.pack(MAGIC, op, status, len(payload), pages, value) + payload


def read_payload(pages: list[bytes | None]) -> bytes:
    """A READ reply's payload, the inverse of assemble: None for a page not sent."""
    bitmap = bytearray(bitmap_bytes(len(pages)))
    for i, page in enumerate(pages):
        if page is not None:
            if len(page) != PAGE:
                raise ValueError(f"page {i} has {len(page)} bytes")
            bitmap[i // 8] |= 1 << (i % 8)
    return bytes(bitmap) + b"".join(page for page in pages if page is not None)


def decode_reply(header: bytes) -> Reply:
    """A reply header. Raises ProtocolError for a bad magic, op or status."""
    if len(header) != HEADER:
        raise ProtocolError(f"short reply header: {len(header)} bytes")
    magic, op, status, length, pages, value = _REPLY.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic:#x} in a reply")
    try:
        return Reply(Op(op), Status(status), length, pages, value)
    except ValueError:
        raise ProtocolError(f"unknown op {op} or status {status} in a reply") from None


def check(reply: Reply, op: Op) -> Reply:
    """reply, if it answers op with success. Raises ProtocolError."""
    if reply.op != op:
        raise ProtocolError(f"reply to {reply.op.name} where {op.name} was asked")
    if reply.status != Status.OK:
        raise ProtocolError(f"{op.name} refused: {reply.status.name}", reply.status)
    return reply


def bitmap_bytes(pages: int) -> int:
    return (pages + 7) // 8


def pages_present(bitmap: bytes, pages: int) -> list[bool]:
    """For each page of a READ reply: whether its data follows. Raises ProtocolError."""
    if len(bitmap) < bitmap_bytes(pages):
        raise ProtocolError(f"READ bitmap of {len(bitmap)} bytes for {pages} pages")
    return [bool(bitmap[i // 8] >> (i % 8) & 1) for i in range(pages)]


def assemble(payload: bytes, pages: int) -> bytes:
    """The range a READ reply describes, zero pages filled in. Raises ProtocolError."""
    n = bitmap_bytes(pages)
    present = pages_present(payload[:n], pages)
    data = payload[n:]
    if len(data) != PAGE * sum(present):
        raise ProtocolError(f"READ reply carries {len(data)} bytes for {sum(present)} pages")
    out, at = bytearray(), 0
    for sent in present:
        if sent:
            out += data[at : at + PAGE]
            at += PAGE
        else:
            out += bytes(PAGE)
    return bytes(out)


def decode_stats(payload: bytes) -> dict[str, Any]:
    try:
        result = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed STATS reply: {e}") from None
    if not isinstance(result, dict):
        raise ProtocolError("malformed STATS reply: not an object")
    return result


def decode_freemap(payload: bytes, pages: int) -> bytes:
    """A FREEMAP reply's map (the reply's pages: the image's), the bits past the last
    page cleared. Raises ProtocolError if it is not ceil(pages / 8) bytes."""
    if len(payload) != bitmap_bytes(pages):
        raise ProtocolError(f"FREEMAP reply of {len(payload)} bytes for {pages} pages")
    if not pages % 8:
        return payload
    return payload[:-1] + bytes([payload[-1] & ((1 << pages % 8) - 1)])


def free_map(free_pages: set[int] | list[int], total_pages: int) -> bytes:
    """The NAME.free file for an image: bit i set when page i is free."""
    out = bytearray(bitmap_bytes(total_pages))
    for page in free_pages:
        if not 0 <= page < total_pages:
            raise ValueError(f"page {page} outside an image of {total_pages} pages")
        out[page // 8] |= 1 << (page % 8)
    return bytes(out)

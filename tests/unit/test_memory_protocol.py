"""The memory server's wire codec (sflib/memory/protocol.py), and its agreement with
c/memproto.h, which the C programs compile against."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from sflib.memory import protocol
from sflib.memory.protocol import Op, ProtocolError, Status

HEADER_FILE = Path(__file__).resolve().parents[2] / "c/memproto.h"


def reply(op: int, status: int = 0, length: int = 0, pages: int = 0, value: int = 0) -> bytes:
    return struct.pack("<IHHIIQ", protocol.MAGIC, op, status, length, pages, value)


def c_constants() -> dict[str, int]:
    """Every `#define MP_X value` and `MP_X = value` of memproto.h, evaluated."""
    text = HEADER_FILE.read_text()
    found: dict[str, int] = {}
    for name, value in re.findall(r"#define (MP_\w+) ([^/\n]+)", text):
        expr = re.sub(r"(\d+|0x[0-9a-fA-F]+)u\b", r"\1", value).strip()
        if re.fullmatch(r"[\w\s()*+]+", expr):
            found[name] = eval(expr, {}, dict(found))
    for name, value in re.findall(r"\b(MP_\w+) = (\d+)", text):
        found[name] = int(value)
    return found


def test_constants_match_the_c_header() -> None:
    c = c_constants()
    assert c["MP_MAGIC"] == protocol.MAGIC
    assert c["MP_VERSION"] == protocol.VERSION
    assert c["MP_PAGE"] == protocol.PAGE
    assert c["MP_HEADER"] == protocol.HEADER
    assert c["MP_MAX_NAME"] == protocol.MAX_NAME
    assert c["MP_MAX_SECRET"] == protocol.MAX_SECRET
    assert c["MP_MAX_READ"] == protocol.MAX_READ
    assert c["MP_MAX_FREEMAP"] == protocol.MAX_FREEMAP == protocol.bitmap_bytes(2**32 - 1)
    assert {op.name: op.value for op in Op} == {
        k.removeprefix("MP_OP_"): v for k, v in c.items() if k.startswith("MP_OP_")
    }
    statuses = {
        k.removeprefix("MP_"): v for k, v in c.items() if k in {f"MP_{s.name}" for s in Status}
    }
    assert statuses == {s.name: s.value for s in Status}


def test_magic_reads_sfpm_on_the_wire() -> None:
    assert protocol.hello(b"")[:4] == b"SFPM"


def test_hello_carries_the_secret_and_the_version() -> None:
    raw = protocol.hello(b"s3cret")
    assert struct.unpack("<IHHIIQ", raw[:24]) == (protocol.MAGIC, Op.HELLO, 0, 6, 0, 1)
    assert raw[24:] == b"s3cret"


def test_open_carries_the_name() -> None:
    raw = protocol.open_image("vm-1.mem")
    assert struct.unpack("<IHHIIQ", raw[:24])[1:4] == (Op.OPEN, 0, 8)
    assert raw[24:] == b"vm-1.mem"


def test_read_has_no_payload_and_its_length_is_the_range() -> None:
    raw = protocol.read(3 * 4096, 2 * 4096)
    assert raw == struct.pack("<IHHIIQ", protocol.MAGIC, Op.READ, 0, 8192, 0, 12288)


def test_stats_is_a_bare_header() -> None:
    assert protocol.stats() == struct.pack("<IHHIIQ", protocol.MAGIC, Op.STATS, 0, 0, 0, 0)


def test_freemap_is_a_bare_header() -> None:
    assert protocol.freemap() == struct.pack("<IHHIIQ", protocol.MAGIC, Op.FREEMAP, 0, 0, 0, 0)
    assert protocol.decode_request(protocol.freemap()) == protocol.Request(Op.FREEMAP, 0, 0)


def test_freemap_reply_round_trip() -> None:
    free = protocol.free_map({0, 9, 10, 5000}, 9001)
    raw = protocol.encode_reply(Op.FREEMAP, payload=free, pages=9001)
    assert len(free) == 1126 > protocol.MAX_SECRET  # longer than any request's payload
    got = protocol.decode_reply(raw[: protocol.HEADER])
    assert got == protocol.Reply(Op.FREEMAP, Status.OK, 1126, 9001, 0)
    decoded = protocol.decode_freemap(raw[protocol.HEADER :], got.pages)
    assert decoded == free
    assert [i for i, p in enumerate(protocol.pages_present(decoded, 9001)) if p] == [0, 9, 10, 5000]


def test_decode_freemap_clears_the_bits_past_the_last_page() -> None:
    assert protocol.decode_freemap(bytes([0xFF, 0xFF]), 11) == bytes([0xFF, 0b0000_0111])
    assert protocol.decode_freemap(bytes([0xFF]), 8) == bytes([0xFF])
    assert protocol.decode_freemap(b"", 0) == b""


@pytest.mark.parametrize(("payload", "pages"), [(bytes(2), 8), (bytes(1), 9), (b"", 1)])
def test_decode_freemap_raises_on_the_wrong_size(payload: bytes, pages: int) -> None:
    with pytest.raises(ProtocolError, match="FREEMAP"):
        protocol.decode_freemap(payload, pages)


def test_reply_round_trip() -> None:
    got = protocol.decode_reply(reply(Op.READ, 0, 4100, 3, 1 << 40))
    assert got == protocol.Reply(Op.READ, Status.OK, 4100, 3, 1 << 40)


@pytest.mark.parametrize(
    "header",
    [
        reply(Op.OPEN)[:23],
        reply(Op.OPEN) + b"\0",
        b"MPFS" + reply(Op.OPEN)[4:],
        reply(99),
        reply(Op.OPEN, status=99),
    ],
    ids=["short", "long", "bad-magic", "bad-op", "bad-status"],
)
def test_malformed_reply_headers_raise(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode_reply(header)


def test_check_passes_success_and_raises_refusals_with_their_status() -> None:
    ok = protocol.decode_reply(reply(Op.OPEN, value=8192, pages=2))
    assert protocol.check(ok, Op.OPEN) is ok
    with pytest.raises(ProtocolError, match="READ"):
        protocol.check(ok, Op.READ)
    refused = protocol.decode_reply(reply(Op.OPEN, status=Status.ENOENT))
    with pytest.raises(ProtocolError) as raised:
        protocol.check(refused, Op.OPEN)
    assert raised.value.status is Status.ENOENT


def test_bitmap_is_least_significant_bit_first() -> None:
    present = protocol.pages_present(bytes([0b0000_0101, 0b1000_0000]), 16)
    assert [i for i, p in enumerate(present) if p] == [0, 2, 15]
    assert protocol.bitmap_bytes(1) == 1
    assert protocol.bitmap_bytes(8) == 1
    assert protocol.bitmap_bytes(9) == 2
    assert protocol.bitmap_bytes(256) == 32


def test_assemble_fills_the_pages_not_sent_with_zeros() -> None:
    page_a, page_c = b"a" * 4096, b"c" * 4096
    payload = bytes([0b101]) + page_a + page_c
    assert protocol.assemble(payload, 3) == page_a + bytes(4096) + page_c


def test_assemble_of_nothing_sent_is_all_zeros() -> None:
    assert protocol.assemble(bytes(2), 10) == bytes(10 * 4096)


@pytest.mark.parametrize(
    ("payload", "pages"),
    [
        (bytes([0b11]) + b"x" * 4096, 2),  # a page missing
        (bytes([0b01]) + b"x" * 8192, 2),  # a page too many
        (bytes([0b01]) + b"x" * 100, 1),  # a partial page
        (b"", 9),  # no bitmap
        (bytes([0xFF]), 9),  # half a bitmap
    ],
)
def test_assemble_raises_on_malformed_replies(payload: bytes, pages: int) -> None:
    with pytest.raises(ProtocolError):
        protocol.assemble(payload, pages)


def test_stats_decodes_an_object_only() -> None:
    assert protocol.decode_stats(json.dumps({"clients": 2}).encode()) == {"clients": 2}
    for bad in (b"[1, 2]", b"{", b"\xff\xfe", b""):
        with pytest.raises(ProtocolError):
            protocol.decode_stats(bad)


def test_free_map_sets_one_bit_per_free_page() -> None:
    assert protocol.free_map([0, 9, 10], 11) == bytes([0b0000_0001, 0b0000_0110])
    assert protocol.free_map(set(), 17) == bytes(3)
    present = protocol.pages_present(protocol.free_map({3, 7, 8}, 16), 16)
    assert [i for i, p in enumerate(present) if p] == [3, 7, 8]


@pytest.mark.parametrize("page", [-1, 16])
def test_free_map_refuses_pages_outside_the_image(page: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        protocol.free_map([page], 16)


def test_protocol_error_is_a_snowflock_error() -> None:
    from sflib.errors import SnowFlockError

    assert issubclass(ProtocolError, SnowFlockError)

"""The packet codec, including a hypothesis fuzz test of the decoder."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sflib.xenstore.wire import (
    Op,
    Packet,
    PacketDecoder,
    ProtocolError,
    XenStoreError,
    split_path_value,
    split_strings,
)


def test_header_is_four_little_endian_words() -> None:
    raw = Packet(Op.READ, 7, 3, b"/a\0").encode()
    assert raw[:16] == struct.pack("<IIII", 2, 7, 3, 3)
    assert raw[16:] == b"/a\0"


def test_decoder_reassembles_any_chunking() -> None:
    packets = [Packet(Op.WRITE, i, 0, b"/k\0" + bytes([i]) * i) for i in range(20)]
    stream = b"".join(p.encode() for p in packets)
    decoder = PacketDecoder()
    out = []
    for i in range(0, len(stream), 7):
        out += decoder.feed(stream[i : i + 7])
    assert out == packets
    assert decoder.pending == 0


def test_oversized_length_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        PacketDecoder().feed(struct.pack("<IIII", 2, 1, 0, 4097))


def test_payload_over_4096_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Packet(Op.WRITE, 1, 0, b"x" * 4097).encode()


def test_split_strings_demands_exact_count_and_terminator() -> None:
    assert split_strings(b"/a\0tok\0", 2) == ["/a", "tok"]
    for bad in (b"/a", b"/a\0b\0", b"\xff\0"):
        with pytest.raises(XenStoreError) as e:
            split_strings(bad, 1)
        assert e.value.name == "EINVAL"


def test_write_value_is_raw_bytes_after_the_path() -> None:
    assert split_path_value(b"/a\0\x00\xffvalue") == ("/a", b"\x00\xffvalue")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=40))
def test_fuzz_decoder_never_fails_except_by_protocol_error(chunks: list[bytes]) -> None:
    decoder = PacketDecoder()
    try:
        for chunk in chunks:
            for packet in decoder.feed(chunk):
                assert len(packet.payload) <= 4096
                assert Packet(packet.op, packet.req_id, packet.tx_id, packet.payload).encode()
    except ProtocolError:
        pass  # the only allowed failure: the server closes such a connection


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.binary(max_size=4096),
        ),
        max_size=5,
    ),
    st.integers(1, 50),
)
def test_fuzz_roundtrip(fields: list[tuple[int, int, int, bytes]], step: int) -> None:
    packets = [Packet(*f) for f in fields]
    stream = b"".join(p.encode() for p in packets)
    decoder = PacketDecoder()
    out = []
    for i in range(0, len(stream), step):
        out += decoder.feed(stream[i : i + step])
    assert out == packets

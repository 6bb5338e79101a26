"""Bad clients: the offender gets Xen's error or is closed; everyone else carries on."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.xsclient import HDR, SyncClient, XsError, payload

READ, WRITE, RM, TX_START, TX_END = 2, 11, 13, 6, 7


def closed_by_server(c: SyncClient) -> bool:
    try:
        c.recv_packet()
    except (ConnectionError, OSError):
        return True
    return False


@pytest.fixture
def good(xenstored: Path) -> SyncClient:
    c = SyncClient.unix(str(xenstored))
    c.call(WRITE, b"/kept\0committed")
    return c


def test_length_over_4096_closes_only_that_connection(xenstored: Path, good: SyncClient) -> None:
    bad = SyncClient.unix(str(xenstored))
    bad.send_raw(HDR.pack(READ, 1, 0, 4097))
    assert closed_by_server(bad)
    assert good.call(READ, payload("/kept")) == b"committed"


def test_garbage_bytes_close_the_connection(xenstored: Path, good: SyncClient) -> None:
    bad = SyncClient.unix(str(xenstored))
    bad.send_raw(b"\xff" * 64)
    assert closed_by_server(bad)
    assert good.call(READ, payload("/kept")) == b"committed"


def test_unknown_type_gets_einval_and_the_connection_lives(good: SyncClient) -> None:
    with pytest.raises(XsError, match="EINVAL"):
        good.call(77, b"whatever\0")
    assert good.call(READ, payload("/kept")) == b"committed"


@pytest.mark.parametrize(
    "data",
    [b"/a//b\0", b"/trailing/\0", b"relative with space\0", b"/no-terminator", b"\xff\xfe\0", b""],
)
def test_invalid_paths_and_payloads_get_einval(good: SyncClient, data: bytes) -> None:
    with pytest.raises(XsError, match="EINVAL"):
        good.call(READ, data)


def test_write_of_an_invalid_path_changes_nothing(good: SyncClient) -> None:
    with pytest.raises(XsError, match="EINVAL"):
        good.call(WRITE, b"/kept/../x\0v")
    with pytest.raises(XsError, match="ENOENT"):
        good.call(READ, payload("/kept/x"))


def test_disconnect_mid_transaction_commits_nothing(xenstored: Path, good: SyncClient) -> None:
    c = SyncClient.unix(str(xenstored))
    tx = int(c.call(TX_START, b"\0").rstrip(b"\0"))
    c.call(WRITE, b"/half\0done", tx)
    c.call(RM, payload("/kept"), tx)
    c.close()
    with pytest.raises(XsError, match="ENOENT"):
        good.call(READ, payload("/half"))
    assert good.call(READ, payload("/kept")) == b"committed"


def test_half_a_header_then_hangup(xenstored: Path, good: SyncClient) -> None:
    c = SyncClient.unix(str(xenstored))
    c.send_raw(HDR.pack(WRITE, 1, 0, 100)[:10])
    c.close()
    assert good.call(READ, payload("/kept")) == b"committed"


def test_flooding_client_does_not_starve_others(xenstored: Path, good: SyncClient) -> None:
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(str(xenstored))
    flood.setblocking(False)
    request = HDR.pack(WRITE, 1, 0, 8) + b"/flood\0x"
    sent = 0
    for _ in range(50_000):  # bounded: stops when the server stops reading
        try:
            flood.send(request * 64)
            sent += 64
        except BlockingIOError:
            break
    assert good.call(READ, payload("/kept")) == b"committed"
    assert good.call(READ, payload("/flood")) == b"x"
    flood.close()
    assert good.call(WRITE, b"/after\0ok") == b"OK\0"
    assert sent > 0


def test_unknown_transaction_id_is_enoent(good: SyncClient) -> None:
    with pytest.raises(XsError, match="ENOENT"):
        good.call(READ, payload("/kept"), tx=12345)


def test_transaction_end_with_bad_flag_is_einval_and_ends_nothing(good: SyncClient) -> None:
    tx = int(good.call(TX_START, b"\0").rstrip(b"\0"))
    good.call(WRITE, b"/pending\0v", tx)
    with pytest.raises(XsError, match="EINVAL"):
        good.call(TX_END, b"maybe\0", tx)
    assert good.call(READ, payload("/pending"), tx) == b"v"  # the transaction lives on
    with pytest.raises(XsError, match="ENOENT"):
        good.call(READ, payload("/pending"))  # and has committed nothing
    assert good.call(TX_END, b"F\0", tx) == b"OK\0"  # an abort
    with pytest.raises(XsError, match="ENOENT"):
        good.call(READ, payload("/pending"))
    with pytest.raises(XsError, match="ENOENT"):
        good.call(READ, payload("/kept"), tx)  # the ID is gone with it

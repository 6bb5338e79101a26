"""The guest agent's decisions (sflib.guest.mux): requests and replies matched by
the agent's own IDs, watch events to the client that placed the watch, and what a
client leaves behind undone when it goes."""

from __future__ import annotations

from sflib.guest.mux import Mux
from sflib.xenstore.wire import Op, Packet


def request(op: int, payload: bytes, req_id: int = 7, tx_id: int = 0) -> Packet:
    return Packet(op, req_id, tx_id, payload)


def ok(sent: Packet, payload: bytes = b"OK\0") -> Packet:
    return Packet(sent.op, sent.req_id, sent.tx_id, payload)


def test_two_clients_with_the_same_request_id_each_get_their_own_reply() -> None:
    mux = Mux()
    a, b = mux.connect(), mux.connect()
    [to_a] = mux.from_client(a, request(Op.READ, b"x\0", req_id=5)).host
    [to_b] = mux.from_client(b, request(Op.READ, b"y\0", req_id=5)).host
    assert to_a.req_id != to_b.req_id
    assert mux.from_host(ok(to_b, b"B")).clients == [(b, Packet(Op.READ, 5, 0, b"B"))]
    assert mux.from_host(ok(to_a, b"A")).clients == [(a, Packet(Op.READ, 5, 0, b"A"))]
    assert mux.from_host(ok(to_a, b"A")).clients == []  # answered once only
    assert mux.pending == {}


def test_a_watch_event_goes_to_the_client_that_placed_the_watch_with_its_token() -> None:
    mux = Mux()
    a, b = mux.connect(), mux.connect()
    [wa] = mux.from_client(a, request(Op.WATCH, b"data\0tok\0")).host
    [wb] = mux.from_client(b, request(Op.WATCH, b"data\0tok\0")).host
    assert wa.payload != wb.payload  # the same path and token: two watches on the port
    mux.from_host(ok(wa))
    mux.from_host(ok(wb))
    token_of_b = wb.payload.split(b"\0")[1]
    event = mux.from_host(Packet(Op.WATCH_EVENT, 0, 0, b"data/k\0" + token_of_b + b"\0"))
    assert event.clients == [(b, Packet(Op.WATCH_EVENT, 0, 0, b"data/k\0tok\0"))]
    assert mux.from_host(Packet(Op.WATCH_EVENT, 0, 0, b"data\0stranger\0")).clients == []


def test_a_client_that_goes_leaves_no_watch_and_no_transaction() -> None:
    mux = Mux()
    a, b = mux.connect(), mux.connect()
    [w] = mux.from_client(a, request(Op.WATCH, b"p\0t\0")).host
    mux.from_host(ok(w))
    [t] = mux.from_client(a, request(Op.TRANSACTION_START, b"\0")).host
    mux.from_host(ok(t, b"42\0"))
    mux.from_client(b, request(Op.WATCH, b"p\0t\0"))
    undo = mux.disconnect(a).host
    assert [(p.op, p.tx_id, p.payload) for p in undo] == [
        (Op.UNWATCH, 0, w.payload), (Op.TRANSACTION_END, 42, b"F\0")]  # fmt: skip
    for packet in undo:  # their replies are the agent's own: nobody gets them
        assert mux.from_host(ok(packet)).clients == []
    assert mux.disconnect(a).host == []


def test_a_watch_or_transaction_granted_after_its_client_went_is_undone() -> None:
    mux = Mux()
    a = mux.connect()
    [w] = mux.from_client(a, request(Op.WATCH, b"p\0t\0")).host
    [t] = mux.from_client(a, request(Op.TRANSACTION_START, b"\0")).host
    assert mux.disconnect(a).host == []  # nothing granted yet
    [unwatch] = mux.from_host(ok(w)).host
    assert (unwatch.op, unwatch.payload) == (Op.UNWATCH, w.payload)
    [abort] = mux.from_host(ok(t, b"9\0")).host
    assert (abort.op, abort.tx_id, abort.payload) == (Op.TRANSACTION_END, 9, b"F\0")


def test_a_client_may_use_only_its_own_transactions() -> None:
    mux = Mux()
    a, b = mux.connect(), mux.connect()
    [t] = mux.from_client(a, request(Op.TRANSACTION_START, b"\0")).host
    mux.from_host(ok(t, b"3\0"))
    refused = mux.from_client(b, request(Op.WRITE, b"k\0v", req_id=1, tx_id=3))
    assert refused.host == [] and refused.clients == [(b, Packet(Op.ERROR, 1, 3, b"EINVAL\0"))]
    [write] = mux.from_client(a, request(Op.WRITE, b"k\0v", tx_id=3)).host
    assert write.tx_id == 3
    [end] = mux.from_client(a, request(Op.TRANSACTION_END, b"T\0", tx_id=3)).host
    mux.from_host(Packet(Op.ERROR, end.req_id, 3, b"EAGAIN\0"))  # a conflict ends it too
    assert mux.disconnect(a).host == []


def test_reset_watches_resets_only_the_clients_own() -> None:
    mux = Mux()
    a, b = mux.connect(), mux.connect()
    for client in (a, b):
        [w] = mux.from_client(client, request(Op.WATCH, b"p\0t\0")).host
        mux.from_host(ok(w))
    out = mux.from_client(a, request(Op.RESET_WATCHES, b"", req_id=4))
    assert [p.op for p in out.host] == [Op.UNWATCH]
    assert out.clients == [(a, Packet(Op.RESET_WATCHES, 4, 0, b"OK\0"))]
    assert mux.disconnect(a).host == []
    assert [p.op for p in mux.disconnect(b).host] == [Op.UNWATCH]


def test_bad_requests_are_refused_without_reaching_the_host() -> None:
    mux = Mux()
    a = mux.connect()
    for bad in (request(Op.WATCH, b"path-only\0"), request(Op.WATCH_EVENT, b"p\0t\0")):
        out = mux.from_client(a, bad)
        assert out.host == [] and out.clients == [(a, Packet(Op.ERROR, 7, 0, b"EINVAL\0"))]


def test_an_unwatch_forgets_the_watch_and_errors_pass_through() -> None:
    mux = Mux()
    a = mux.connect()
    [w] = mux.from_client(a, request(Op.WATCH, b"p\0t\0")).host
    mux.from_host(ok(w))
    [u] = mux.from_client(a, request(Op.UNWATCH, b"p\0t\0")).host
    assert u.payload == w.payload
    mux.from_host(ok(u))
    [r] = mux.from_client(a, request(Op.READ, b"nope\0", req_id=2)).host
    assert mux.from_host(Packet(Op.ERROR, r.req_id, 0, b"ENOENT\0")).clients == [
        (a, Packet(Op.ERROR, 2, 0, b"ENOENT\0"))]  # fmt: skip
    assert mux.disconnect(a).host == []


def test_the_first_request_resets_what_an_earlier_agent_left() -> None:
    mux = Mux()
    reset = mux.reset()
    assert reset.op == Op.RESET_WATCHES
    assert mux.from_host(ok(reset)).clients == []

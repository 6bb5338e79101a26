"""The store's logic alone: requests in, replies and events out (no sockets)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sflib.xenstore import snapshot
from sflib.xenstore.requests import handle
from sflib.xenstore.store import Store
from sflib.xenstore.tree import Quotas
from sflib.xenstore.wire import Op, Packet
from tests.xsclient import payload


class Caller:
    """Drives handle() as one connection would."""

    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.session = store.open_session(domid)
        self.events: list[tuple[str, bytes]] = []

    def __call__(self, op: Op, data: bytes, tx: int = 0) -> bytes:
        out = handle(self.store, self.session, Packet(op, 1, tx, data))
        for session_id, event in out.events:
            caller = CALLERS.get(session_id)
            if caller is not None:
                path, token, _ = event.payload.split(b"\0")
                caller.events.append((path.decode(), token))
        if out.reply.op == Op.ERROR:
            raise XsErr(out.reply.payload.rstrip(b"\0").decode())
        return out.reply.payload


CALLERS: dict[int, Caller] = {}


class XsErr(Exception):
    pass


@pytest.fixture
def store() -> Store:
    CALLERS.clear()
    return Store(Quotas(nodes=20, value_size=100, watches=3, transactions=2))


def caller(store: Store, domid: int) -> Caller:
    c = Caller(store, domid)
    CALLERS[c.session.id] = c
    return c


def err(fn: object, *args: object) -> str:
    with pytest.raises(XsErr) as e:
        fn(*args)  # type: ignore[operator]
    return str(e.value)


def make_domain(dom0: Caller, domid: int) -> None:
    dom0(Op.MKDIR, payload(f"/local/domain/{domid}"))
    dom0(Op.SET_PERMS, payload(f"/local/domain/{domid}", f"n{domid}"))


def test_write_read_directory_rm(store: Store) -> None:
    d0 = caller(store, 0)
    assert d0(Op.WRITE, b"/a/b/c\0value") == b"OK\0"
    assert d0(Op.READ, payload("/a/b/c")) == b"value"
    assert d0(Op.DIRECTORY, payload("/a")) == b"b\0"
    assert d0(Op.READ, payload("/a/b")) == b""  # created implicitly
    d0(Op.RM, payload("/a/b"))
    assert err(d0, Op.READ, payload("/a/b/c")) == "ENOENT"
    assert d0(Op.DIRECTORY, payload("/a")) == b""
    assert d0(Op.RM, payload("/a/missing")) == b"OK\0"  # Xen: parent exists, so OK
    assert err(d0, Op.RM, payload("/nope/missing")) == "ENOENT"
    assert err(d0, Op.RM, payload("/")) == "EINVAL"


def test_relative_paths_resolve_in_own_domain(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    d5 = caller(store, 5)
    d5(Op.WRITE, b"data/x\0hi")
    assert d0(Op.READ, payload("/local/domain/5/data/x")) == b"hi"
    assert d0(Op.GET_PERMS, payload("/local/domain/5/data/x")) == b"n5\0"


def test_domain_is_refused_another_domains_keys(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    make_domain(d0, 6)
    d0(Op.WRITE, b"/local/domain/6/secret\0s")
    d5 = caller(store, 5)
    assert err(d5, Op.WRITE, b"/local/domain/6/x\0v") == "EACCES"
    assert err(d5, Op.READ, payload("/local/domain/6/secret")) == "EACCES"
    # Existence does not leak: a missing node under an unreadable parent is EACCES.
    assert err(d5, Op.READ, payload("/local/domain/6/missing")) == "EACCES"
    assert err(d5, Op.SET_PERMS, payload("/local/domain/6", "b5")) == "EACCES"


def test_permission_letters_and_owner(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    make_domain(d0, 6)
    d5, d6 = caller(store, 5), caller(store, 6)
    d5(Op.WRITE, b"shared\0x")
    d5(Op.SET_PERMS, payload("shared", "n5", "r6"))
    assert d6(Op.READ, payload("/local/domain/5/shared")) == b"x"
    assert err(d6, Op.WRITE, b"/local/domain/5/shared\0y") == "EACCES"
    assert err(d5, Op.SET_PERMS, payload("shared", "n6")) == "EPERM"  # no giving away
    assert err(d5, Op.SET_PERMS, payload("shared", "q5")) == "EINVAL"


def test_invalid_paths(store: Store) -> None:
    d0 = caller(store, 0)
    for bad in ("/a//b", "/a/", "/a b", "/a@b", "", "/" + "x" * 3072):
        assert err(d0, Op.WRITE, payload(bad) + b"v") == "EINVAL", bad


def test_quotas(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    d5 = caller(store, 5)
    assert err(d5, Op.WRITE, b"big\0" + b"x" * 101) == "ENOSPC"
    with pytest.raises(XsErr, match="ENOSPC"):
        for i in range(30):
            d5(Op.WRITE, f"n{i}\0".encode())
    for i in range(3):
        d5(Op.WATCH, payload(f"w{i}", "t"))
    assert err(d5, Op.WATCH, payload("w9", "t")) == "E2BIG"
    d5(Op.TRANSACTION_START, b"\0")
    d5(Op.TRANSACTION_START, b"\0")
    assert err(d5, Op.TRANSACTION_START, b"\0") == "ENOSPC"


def test_watch_fires_initially_then_on_changes_below(store: Store) -> None:
    d0 = caller(store, 0)
    d0(Op.WATCH, payload("/w", "tok"))
    assert d0.events == [("/w", b"tok")]
    d0(Op.WRITE, b"/w/a/b\0v")
    d0(Op.WRITE, b"/other\0v")
    assert ("/w/a/b", b"tok") in d0.events
    assert all(not p.startswith("/other") for p, _ in d0.events)
    d0.events.clear()
    d0(Op.WATCH, payload("/w/a/b", "deep"))
    d0.events.clear()
    d0(Op.RM, payload("/w/a"))  # removing an ancestor fires the deeper watch too
    assert ("/w/a", b"tok") in d0.events
    assert ("/w/a/b", b"deep") in d0.events
    assert err(d0, Op.WATCH, payload("/w", "tok")) == "EEXIST"
    d0(Op.UNWATCH, payload("/w", "tok"))
    assert err(d0, Op.UNWATCH, payload("/w", "tok")) == "ENOENT"


def test_relative_watch_reports_relative_paths_and_needs_read_access(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    make_domain(d0, 6)
    d5, d6 = caller(store, 5), caller(store, 6)
    d5(Op.WATCH, payload("reply", "r"))
    d6(Op.WATCH, payload("/local/domain/5", "spy"))
    d5.events.clear()
    d6.events.clear()
    d0(Op.WRITE, b"/local/domain/5/reply\0go")
    assert d5.events == [("reply", b"r")]
    assert d6.events == []  # domain 6 may not read domain 5's node


def test_transaction_commits_atomically_and_conflicts_with_eagain(store: Store) -> None:
    a, b = caller(store, 0), caller(store, 0)
    a(Op.WRITE, b"/k\0one")
    tx = int(a(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert a(Op.READ, payload("/k"), tx) == b"one"
    a(Op.WRITE, b"/k\0two", tx)
    a(Op.WRITE, b"/new/node\0x", tx)
    assert b(Op.READ, payload("/k")) == b"one"  # not visible before commit
    assert err(b, Op.READ, payload("/new/node")) == "ENOENT"
    a(Op.TRANSACTION_END, b"T\0", tx)
    assert b(Op.READ, payload("/k")) == b"two"
    assert b(Op.READ, payload("/new/node")) == b"x"
    tx = int(a(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    a(Op.READ, payload("/k"), tx)
    b(Op.WRITE, b"/k\0three")
    a(Op.WRITE, b"/k2\0x", tx)
    assert err(a, Op.TRANSACTION_END, b"T\0", tx) == "EAGAIN"
    assert err(b, Op.READ, payload("/k2")) == "ENOENT"  # nothing of it committed
    assert err(a, Op.TRANSACTION_END, b"T\0", tx) == "ENOENT"  # it is gone
    assert err(a, Op.TRANSACTION_START, b"\0", 99) == "EBUSY"


def test_watch_events_of_a_transaction_come_at_commit(store: Store) -> None:
    d0 = caller(store, 0)
    d0(Op.WATCH, payload("/t", "tok"))
    d0.events.clear()
    tx = int(d0(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    d0(Op.WRITE, b"/t/x\0v", tx)
    assert d0.events == []
    d0(Op.TRANSACTION_END, b"T\0", tx)
    assert d0.events == [("/t/x", b"tok")]


def test_directory_part_pages_through_long_lists(store: Store) -> None:
    d0 = caller(store, 0)
    names = [f"child-{i:04d}-" + "x" * 40 for i in range(150)]
    for n in names:
        d0(Op.MKDIR, payload(f"/big/{n}"))
    assert err(d0, Op.DIRECTORY, payload("/big")) == "E2BIG"
    got: list[str] = []
    offset = 0
    generations = set()
    while True:
        body = d0(Op.DIRECTORY_PART, payload("/big", str(offset)))
        gen, _, rest = body.partition(b"\0")
        generations.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            got += [x.decode() for x in rest[:-2].split(b"\0") if x]
            break
        chunk = [x.decode() for x in rest[:-1].split(b"\0")]
        got += chunk
        offset += len(rest)
    assert got == names
    assert len(generations) == 1


def test_domain_messages(store: Store) -> None:
    d0 = caller(store, 0)
    d0(Op.WATCH, payload("@introduceDomain", "i"))
    d0(Op.WATCH, payload("@releaseDomain", "r"))
    d0.events.clear()
    assert d0(Op.IS_DOMAIN_INTRODUCED, payload("7")) == b"F\0"
    d0(Op.INTRODUCE, payload("7", "0", "0"))
    assert d0(Op.IS_DOMAIN_INTRODUCED, payload("7")) == b"T\0"
    assert d0(Op.GET_DOMAIN_PATH, payload("7")) == b"/local/domain/7\0"
    d0(Op.RELEASE, payload("7"))
    assert d0.events == [("@introduceDomain", b"i"), ("@releaseDomain", b"r")]
    assert err(d0, Op.RELEASE, payload("7")) == "ENOENT"
    d5 = caller(store, 5)
    assert err(d5, Op.INTRODUCE, payload("8", "0", "0")) == "EACCES"
    assert err(d0, Op.GET_DOMAIN_PATH, payload("x")) == "EINVAL"


def test_unknown_and_unsupported_messages(store: Store) -> None:
    d0 = caller(store, 0)
    assert err(d0, 99, b"") == "EINVAL"  # type: ignore[arg-type]
    assert err(d0, Op.WATCH_EVENT, b"") == "EINVAL"
    assert err(d0, Op.SET_TARGET, payload("1", "2")) == "ENOSYS"


def test_reset_watches_forgets_watches_and_transactions(store: Store) -> None:
    d0 = caller(store, 0)
    d0(Op.WATCH, payload("/r", "t"))
    tx = int(d0(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    d0(Op.RESET_WATCHES, b"\0")
    d0.events.clear()
    d0(Op.WRITE, b"/r\0x")
    assert d0.events == []
    assert err(d0, Op.TRANSACTION_END, b"T\0", tx) == "ENOENT"


def test_clone_domain_copies_subtree_and_watches(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    d5 = caller(store, 5)
    d5(Op.WRITE, b"state\0before-fork")
    d5(Op.WATCH, payload("snowflock/reply", "wait"))
    d5(Op.WATCH, payload("/local/domain/5/abs", "abs"))
    d5.events.clear()
    clone = caller(store, 9)
    snapshot.restore(store, snapshot.take(store, 5), 9, clone.session)
    assert d0(Op.READ, payload("/local/domain/9/state")) == b"before-fork"
    assert d0(Op.GET_PERMS, payload("/local/domain/9/state")) == b"n9\0"
    assert d0(Op.GET_PERMS, payload("/local/domain/9")) == b"n9\0"
    assert clone(Op.READ, payload("state")) == b"before-fork"
    d0(Op.WRITE, b"/local/domain/9/snowflock/reply\0" + b"1")
    assert clone.events == [("snowflock/reply", b"wait")]
    assert d5.events == []  # the parent's own watch did not fire
    d0(Op.WRITE, b"/local/domain/5/snowflock/reply\0" + b"0")
    assert d5.events == [("snowflock/reply", b"wait")]
    with pytest.raises(Exception, match="EEXIST"):
        snapshot.restore(store, snapshot.take(store, 5), 9, clone.session)
    with pytest.raises(Exception, match="ENOENT"):
        snapshot.take(store, 42)


def test_a_snapshot_leaves_out_what_it_is_told_and_other_domains(store: Store) -> None:
    d0 = caller(store, 0)
    for domid in (5, 6):
        make_domain(d0, domid)
    d5, d6 = caller(store, 5), caller(store, 6)
    d5(Op.WRITE, b"snowflock/share/t1/1/result/0\0big")
    d5(Op.WRITE, b"snowflock/identity\0me")
    d5(Op.WRITE, b"a/b/c\0deep")
    d6(Op.WRITE, b"other\0not mine")
    snap = snapshot.take(store, 5, leave_out=("snowflock/share",))
    paths = [p for p, _, _ in snap.nodes]
    assert "/snowflock/identity" in paths and "/a/b/c" in paths and "" in paths
    assert not any(p.startswith("/snowflock/share") for p in paths)
    assert not any("other" in p for p in paths)
    assert paths == sorted(paths)
    clone = caller(store, 9)
    snapshot.restore(store, snap, 9, clone.session)
    assert clone(Op.READ, payload("a/b/c")) == b"deep"
    assert clone(Op.DIRECTORY, payload("snowflock")) == b"identity\0"
    assert err(clone, Op.READ, payload("snowflock/share/t1/1/result/0")) == "ENOENT"
    clone(Op.WRITE, b"snowflock/share/t2/1/x/0\0mine")  # its own shares, when it forks
    assert clone(Op.READ, payload("snowflock/share/t2/1/x/0")) == b"mine"


def test_snapshot_survives_json_and_later_changes(store: Store) -> None:
    d0 = caller(store, 0)
    make_domain(d0, 5)
    d5 = caller(store, 5)
    d5(Op.WRITE, b"app/state\0at-checkpoint")
    d5(Op.WATCH, payload("snowflock/replies", "ckpt"))
    snap = snapshot.DomainSnapshot.from_json(
        json.loads(json.dumps(snapshot.take(store, 5).to_json()))
    )
    d5(Op.WRITE, b"app/state\0moved-on")  # the parent goes on after the checkpoint
    clone = caller(store, 12)
    snapshot.restore(store, snap, 12, clone.session)
    assert clone(Op.READ, payload("app/state")) == b"at-checkpoint"
    assert clone(Op.DIRECTORY, payload("app")) == b"state\0"
    assert d0(Op.DIRECTORY, payload("/local/domain")).split(b"\0")[:-1] == [b"5", b"12"]
    clone.events.clear()
    d0(Op.WRITE, b"/local/domain/12/snowflock/replies/1\0k")
    assert clone.events == [("snowflock/replies/1", b"ckpt")]


PATHS = st.sampled_from(["/a", "/a/b", "x", "x/y", "/local/domain/5/q", "/", "@releaseDomain",
                         "/local/domain/6", "bad//", ""])  # fmt: skip
ARGS = st.lists(st.one_of(PATHS, st.sampled_from(["T", "F", "0", "5", "n5", "r0", "tok"])),
                max_size=4)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*Op, 99]),
            st.one_of(ARGS.map(lambda a: payload(*a)), st.binary(max_size=64)),
            st.sampled_from([0, 0, 1, 2, 7]),
            st.sampled_from([0, 5, 6]),
        ),
        max_size=25,
    )
)
def test_fuzz_any_request_sequence_gets_a_reply_and_never_crashes(
    requests: list[tuple[int, bytes, int, int]],
) -> None:
    store = Store(Quotas(nodes=10, watches=3, transactions=2))
    sessions = {d: store.open_session(d) for d in (0, 5, 6)}
    for op, data, tx, domid in requests:
        out = handle(store, sessions[domid], Packet(op, 1, tx, data))
        assert out.reply.op in (op, Op.ERROR)
        assert len(out.reply.encode()) <= 16 + 4096
        for session_id, event in out.events:
            assert session_id in store.sessions
            assert event.op == Op.WATCH_EVENT
    assert store.nodes.get("/") is not None

"""The cluster's parts alone: the allocator, the daemons' handshake, the master's
database and its calls, with no network and no VM."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sflib.cluster import allocator, wire
from sflib.cluster.grants import EmbeddedAllocator, Quota, parse_node_map, placement_of
from sflib.cluster.master import Master
from sflib.cluster.registry import Registry
from sflib.errors import AuthError, NotFoundError, SystemFailure, UsageError, WrongStateError
from sflib.fork.tickets import Ticket
from sflib.guest import layout
from sflib.paths import Paths
from sflib.settings import MASTER_SETTINGS, resolve, to_toml


def test_clones_go_to_other_hosts_first_and_spread() -> None:
    free = {"a": 8, "b": 8, "c": 8}
    assert allocator.place(2, free, "a") == {"b": 1, "c": 1}
    assert allocator.place(5, free, "a") == {"b": 2, "c": 2, "a": 1}
    assert allocator.place(3, {"a": 8, "b": 1, "c": 0}, "a") == {"b": 1, "a": 2}


def test_a_ticket_gets_what_is_free_and_no_more() -> None:
    assert allocator.place(100, {"a": 2, "b": 3}, "a") == {"b": 3, "a": 2}
    with pytest.raises(WrongStateError):
        allocator.place(1, {"a": 0, "b": 0}, "a")
    for n in (0, -1, allocator.MAX_REQUEST + 1):
        with pytest.raises(UsageError):
            allocator.place(n, {"a": 1}, "a")
    assert allocator.free_slots({"a": 8, "b": 4}, {"a": 3}) == {"a": 5, "b": 4}


def test_clone_ids_follow_the_placement() -> None:
    ticket = Ticket("t", "vm", 4, 4, placement={"b": 2, "c": 1, "a": 1})
    assert ticket.ids_by_host("a") == {"b": [1, 2], "c": [3], "a": [4]}
    assert Ticket("t", "vm", 3, 2).ids_by_host("here") == {"here": [1, 2]}


def test_a_finished_share_is_recognised() -> None:
    path = "/local/domain/7/snowflock/share/m1a2b/3/result/chunks"
    assert layout.parse_share_done(path) == (7, "m1a2b", 3, "result")
    assert layout.parse_share_done(path.replace("chunks", "0")) is None
    assert layout.parse_share_done("/local/domain/7/snowflock/requests/x") is None


def test_handshake_proofs_depend_on_secret_role_and_nonces() -> None:
    p = wire.proof(b"s" * 16, "client", "n1", "n2")
    assert wire.verify(b"s" * 16, "client", "n1", "n2", p)
    assert not wire.verify(b"t" * 16, "client", "n1", "n2", p)
    assert not wire.verify(b"s" * 16, "server", "n1", "n2", p)  # no replaying it back
    assert not wire.verify(b"s" * 16, "client", "n1", "n3", p)
    assert not wire.verify(b"s" * 16, "client", "n1", "n2", None)


def test_short_or_missing_secrets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(UsageError, match="too short"):
        wire.read_secret(tmp_path / "short")
    with pytest.raises(UsageError, match="cannot read"):
        wire.read_secret(tmp_path / "missing")


async def test_daemons_talk_only_with_the_same_secret() -> None:
    async def echo(op: str, args: dict[str, object]) -> object:
        if op == "missing":
            raise NotFoundError("no such thing")
        return {"op": op, **args}

    server = await wire.serve("127.0.0.1", 0, b"k" * 32, echo)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        good = wire.PeerClient(address, b"k" * 32, timeout=5)
        assert await good.call("ping", x=1) == {"op": "ping", "x": 1}
        with pytest.raises(NotFoundError, match="no such thing"):  # errors travel typed
            await good.call("missing")
        with pytest.raises(AuthError):
            await wire.PeerClient(address, b"z" * 32, timeout=5).call("ping")
    finally:
        server.close()
        await server.wait_closed()


def test_registry_keeps_hosts_and_tickets_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "master.db"
    master = Master(Registry(db), heartbeat=1, host_timeout=5)
    master.register({"host": "a", "address": "10.0.0.1:1", "slots": 2})
    master.register({"host": "b", "address": "10.0.0.2:1", "slots": 2})
    granted = asyncio.run(master.request_ticket({"host": "a", "vm": "web", "n": 3}))
    assert granted["placement"] == {"b": 2, "a": 1}
    assert granted["addresses"] == {"b": "10.0.0.2:1", "a": "10.0.0.1:1"}
    master.registry.close()
    again = Master(Registry(db), heartbeat=1, host_timeout=5)  # a restarted master
    assert again.registry.reserved() == {"b": 2, "a": 1}
    second = asyncio.run(again.request_ticket({"host": "a", "vm": "web", "n": 5}))
    assert second["granted"] == 1  # what was left
    assert asyncio.run(again.release_ticket({"ticket": granted["ticket"]}))["released"] is True
    assert asyncio.run(again.release_ticket({"ticket": granted["ticket"]}))["released"] is False
    with pytest.raises(NotFoundError):
        asyncio.run(again.release_ticket({"ticket": "nope"}))


def test_silent_hosts_die_with_their_slots_and_their_tickets(tmp_path: Path) -> None:
    master = Master(Registry(tmp_path / "m.db"), heartbeat=1, host_timeout=5)
    for name in ("a", "b"):
        master.register({"host": name, "address": f"{name}:1", "slots": 4})
    owned_by_b = asyncio.run(master.request_ticket({"host": "b", "vm": "x", "n": 2}))
    assert master.check_hosts(time.time()) == []
    master.heartbeat_call({"host": "a"})
    ended = master.check_hosts(time.time() + 6)  # both silent: dead
    assert [t.id for t in ended] == [owned_by_b["ticket"]]
    master.register({"host": "a", "address": "a:1", "slots": 4})  # a comes back
    assert master.heartbeat_call({"host": "a"}) == {"dead": ["b"], "revoked": []}
    with pytest.raises(NotFoundError):
        master.heartbeat_call({"host": "b"})  # b must register again
    assert master.registry.ticket(owned_by_b["ticket"]).ended is not None  # type: ignore[union-attr]
    assert asyncio.run(master.request_ticket({"host": "a", "vm": "y", "n": 8}))["placement"] == {
        "a": 4
    }


def test_master_refuses_bad_calls(tmp_path: Path) -> None:
    master = Master(Registry(tmp_path / "m.db"), heartbeat=1, host_timeout=5)
    with pytest.raises(UsageError):
        asyncio.run(master.dispatch("nonsense", {}))
    with pytest.raises(UsageError):
        master.register({"host": "a", "address": "x", "slots": "many"})
    with pytest.raises(NotFoundError):
        asyncio.run(master.request_ticket({"host": "ghost", "vm": "v", "n": 1}))


def test_master_settings_have_their_own_table(tmp_path: Path) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text('[sfmasterd]\nlisten = "10.0.0.1:7001"\nhost_timeout = 9\n')
    values = resolve(MASTER_SETTINGS, Paths(tmp_path), conf, {}, {}, table="sfmasterd")
    assert values["listen"] == "10.0.0.1:7001" and values["host_timeout"] == 9
    assert to_toml(MASTER_SETTINGS, values, "sfmasterd").startswith("[sfmasterd]\n")
    conf.write_text("[sfld]\nmemory = 1\n")
    with pytest.raises(UsageError, match="unknown"):
        resolve(MASTER_SETTINGS, Paths(tmp_path), conf, {}, {}, table="sfmasterd")


def test_the_embedded_allocator_caps_a_familys_clones(tmp_path: Path) -> None:
    master = Master(Registry(tmp_path / "m.db"), heartbeat=1, host_timeout=5,
                    grants=EmbeddedAllocator(Quota(family=3, host=5)))  # fmt: skip
    master.register({"host": "a", "address": "a:1", "slots": 8})
    assert asyncio.run(master.request_ticket({"host": "a", "vm": "web", "n": 2}))["granted"] == 2
    assert asyncio.run(master.request_ticket({"host": "a", "vm": "web", "n": 2}))["granted"] == 1
    with pytest.raises(WrongStateError, match="max_family_clones"):
        asyncio.run(master.request_ticket({"host": "a", "vm": "web", "n": 1}))
    assert asyncio.run(master.request_ticket({"host": "a", "vm": "db", "n": 3}))["granted"] == 2
    with pytest.raises(WrongStateError, match="max_host_clones 5"):  # a's parents hold 5
        asyncio.run(master.request_ticket({"host": "a", "vm": "ftp", "n": 1}))


def test_slurm_nodes_map_to_hosts() -> None:
    assert parse_node_map("n1=a, n2=a,n3=b") == {"n1": "a", "n2": "a", "n3": "b"}
    assert placement_of(["n1", "n2", "b"], {"n1": "a", "n2": "a"}, {"a", "b"}) == {"a": 2, "b": 1}
    with pytest.raises(UsageError):
        parse_node_map("n1")
    with pytest.raises(SystemFailure, match="n9 is no live SnowFlock host"):
        placement_of(["n9"], {}, {"a"})

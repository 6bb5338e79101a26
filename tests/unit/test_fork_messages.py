"""The messages of a fork (sflib.fork.messages): both hosts' ends of clone.start
use the one codec, and what is not one is refused."""

from __future__ import annotations

import json

import pytest

from sflib.errors import UsageError
from sflib.fork.messages import NET_PREPARE, CloneStart, FamilyPeers, Identity, clone_reply


def order() -> CloneStart:
    return CloneStart(ticket="t1-abc", ids=[2, 3], family="farm", parent_domid=4,
                      owner_host="h1", owner_address="10.0.0.1:7000", rid="12-ab",
                      reply={"checkpoint": "c1"}, manifest={"id": "k1", "named": False},
                      devstate=b"\x00\xffQEVM", memserver="10.0.0.1:7001", image="k1.mem",
                      network={"family": 1, "base": 0, "peers": ["10.0.0.2"]})  # fmt: skip


def test_a_clone_start_survives_the_wire() -> None:
    sent = order()
    wire = json.loads(json.dumps(sent.to_json()))  # what crosses between hosts
    assert CloneStart.from_json(wire) == sent


@pytest.mark.parametrize("damage", [
    {"ids": "2,3"}, {"ids": [2, "x"]}, {"parent_domid": "4"}, {"parent_domid": True},
    {"devstate": "not base64!"}, {"manifest": []}, {"network": "none"}, {"ticket": None},
])  # fmt: skip
def test_a_malformed_clone_start_is_refused(damage: dict[str, object]) -> None:
    wire = {**order().to_json(), **damage}
    with pytest.raises(UsageError, match=r"clone\.start: malformed"):
        CloneStart.from_json(wire)


def test_a_clone_start_missing_a_field_is_refused() -> None:
    wire = order().to_json()
    del wire["memserver"]
    with pytest.raises(UsageError, match="memserver"):
        CloneStart.from_json(wire)


def test_every_member_hears_its_own_id_and_seed() -> None:
    replies = [clone_reply(k, {"checkpoint": "c1"}) for k in (0, 1, 2)]
    assert [r["id"] for r in replies] == [0, 1, 2]
    assert all(r["checkpoint"] == "c1" for r in replies)
    assert len({r["seed"] for r in replies}) == 3
    assert all(len(bytes.fromhex(r["seed"])) == 32 for r in replies)


def test_an_identity_is_the_same_keys_on_every_host() -> None:
    here = Identity(1, "farm", "t1", 7, 4, "h1", "h1", "/local/domain/4/x").to_json(
        {"ip": "10.0.16.3/20"}
    )
    there = Identity(2, "farm", "t1", 3, 4, "h2", "h1", "/local/domain/3/x").to_json()
    assert set(here) - {"ip"} == set(there)
    assert here["parent_domid"] == there["parent_domid"] == 4
    assert there["host"] == "h2" and there["parent_host"] == "h1"


def test_family_peers_cross_hosts_as_json_and_bad_ones_are_refused() -> None:
    message = FamilyPeers(3, ["10.250.0.11", "10.250.0.12"])
    wire = json.loads(json.dumps(message.to_json()))
    assert FamilyPeers.from_json(NET_PREPARE, wire) == message
    for bad in ({"peers": []}, {"family": "3", "peers": []}, {"family": 3, "peers": "a"},
                {"family": 3, "peers": [7]}, {"family": True, "peers": []}):  # fmt: skip
        with pytest.raises(UsageError, match=r"net\.prepare: malformed request"):
            FamilyPeers.from_json(NET_PREPARE, bad)

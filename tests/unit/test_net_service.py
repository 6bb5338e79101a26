"""sfld's family networks with their commands faked: awaited, run off the loop,
and a family's pieces made once and removed once whatever the members do at the
same time."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sflib import looplag, run
from sflib.errors import CommandFailed, SystemFailure
from sflib.net import identity, service
from sflib.net.service import FamilyNetworks, Member

COMMAND_TIME = 0.02  # seconds a fake command takes (blocking its thread)


class FakeCommands:
    """Stands in for run.run: records each command, takes COMMAND_TIME, and keeps
    the devices and tables made, so that the listings see them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # called from worker threads
        self.seconds = COMMAND_TIME
        self.threads: set[int] = set()
        self.argvs: list[list[str]] = []
        self.inputs: list[str] = []
        self.fail: str | None = None  # the command with these words fails
        self.links: set[str] = set()
        self.tables: dict[str, set[str]] = {"bridge": set(), "inet": set()}

    def __call__(self, argv: Any, **kw: Any) -> run.Completed:
        cmd, text = [str(a) for a in argv], str(kw.get("input") or "")
        time.sleep(self.seconds)
        with self.lock:
            self.threads.add(threading.get_ident())
            self.argvs.append(cmd)
            self.inputs.append(text)
            if self.fail and self.fail in " ".join(cmd) + text:
                raise CommandFailed(cmd, 2, "RTNETLINK answers: File exists")
            self._apply(" ".join(cmd) + "\n" + text)
            return run.Completed(cmd, 0, self._listing(cmd), "")

    def _apply(self, text: str) -> None:
        self.links |= set(re.findall(r"link add (\S+)", text))
        self.links -= set(re.findall(r"link del (\S+)", text))
        for kind, name in re.findall(r"^table (bridge|inet) (\S+) \{", text, re.M):
            self.tables[kind].add(name)
        for kind, name in re.findall(r"delete table (bridge|inet) (\S+)", text):
            self.tables[kind].discard(name)

    def _listing(self, cmd: list[str]) -> str:
        if cmd[-3:] == ["list", "tables", "bridge"] or cmd[-3:] == ["list", "tables", "inet"]:
            names = sorted(self.tables[cmd[-1]])
            return json.dumps({"nftables": [{"table": {"name": n}} for n in names]})
        if cmd[-2:] == ["link", "show"]:
            return json.dumps([{"ifname": n} for n in sorted(self.links)])
        return "[]" if "-j" in cmd else ""

    def count(self, words: str) -> int:
        return sum(words in " ".join(a) + i for a, i in zip(self.argvs, self.inputs, strict=True))


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> FakeCommands:
    fake = FakeCommands()
    monkeypatch.setattr(run, "run", fake)

    async def no_dhcp(self: FamilyNetworks, family: service.FamilyHere) -> None:
        return None

    monkeypatch.setattr(FamilyNetworks, "_dhcp", no_dhcp)
    return fake


def networks(tmp_path: Path, router: str = "distributed") -> FamilyNetworks:
    settings = {"router": router, "inbound_ports": [22], "bandwidth": 8,
                "state_dir": tmp_path}  # fmt: skip
    nets = FamilyNetworks(settings, None)
    nets.dir.mkdir(parents=True)
    return nets


def add_member(nets: FamilyNetworks, vm: str, family: int, clone_id: int) -> None:
    """A member as open() makes it, with /dev/null for its tap."""
    me = identity.identity(family, clone_id)
    nets.members[vm] = Member(vm, me, f"sft{family}-{clone_id}", os.open(os.devnull, os.O_RDONLY))


async def test_members_joining_at_once_make_their_familys_network_once(
    tmp_path: Path, commands: FakeCommands
) -> None:
    nets = networks(tmp_path)
    for k in range(3):
        add_member(nets, f"vm{k}", 7, k)
    await asyncio.gather(*(nets.join(f"vm{k}", parent_here=k == 0) for k in range(3)))
    assert commands.count("link add sfb7") == 1
    assert commands.count("table inet sf_r7") == 1  # the router's table, once
    assert sorted(nets.families[7].members) == [0, 1, 2]
    for k in range(3):
        assert commands.count(f"link set sft7-{k} master sfb7 up") == 1
    await asyncio.gather(*(nets.leave(f"vm{k}") for k in range(3)))
    assert nets.families == {} and nets.members == {}
    assert commands.links == set() and commands.tables == {"bridge": set(), "inet": set()}


async def test_a_member_joining_while_its_family_goes_gets_a_new_network(
    tmp_path: Path, commands: FakeCommands
) -> None:
    nets = networks(tmp_path)
    add_member(nets, "a", 7, 0)
    await nets.join("a", parent_here=True)
    add_member(nets, "b", 7, 1)
    await asyncio.gather(nets.leave("a"), nets.join("b", parent_here=False))
    assert list(nets.families[7].members) == [1]  # made again after the removal
    assert commands.count("link add sfb7") == 2
    await nets.close()
    assert nets.families == {} and commands.links == set()


async def test_the_network_commands_do_not_hold_the_loop_up(
    tmp_path: Path, commands: FakeCommands, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "sflib.looplag")
    nets = networks(tmp_path)
    add_member(nets, "a", 7, 0)
    commands.seconds = 0.2
    async with looplag.watching(0.05):
        await nets.join("a", parent_here=True)
        await nets.leave("a")
    assert len(commands.argvs) > 10
    assert threading.get_ident() not in commands.threads  # none ran in the loop's thread
    # Held up by no command, let alone a chain of them (a busy machine's own delays,
    # the thread waiting for a CPU, do not count).
    held = looplag.held("\n".join(r.getMessage() for r in caplog.records))
    assert max(held, default=0) < commands.seconds * 1000


async def test_a_failed_command_is_reported_and_leaves_nothing(
    tmp_path: Path, commands: FakeCommands
) -> None:
    nets = networks(tmp_path)
    add_member(nets, "a", 7, 0)
    commands.fail = "master sfb7"
    with pytest.raises(SystemFailure, match="cannot attach sft7-0"):
        await nets.join("a", parent_here=True)
    commands.fail = "table inet sf_r8"  # the router fails: the network is undone too
    add_member(nets, "b", 8, 0)
    with pytest.raises(SystemFailure, match="cannot make family 8's network"):
        await nets.join("b", parent_here=True)
    assert 8 not in nets.families
    assert commands.count("link del sfb8") == 1
    assert commands.links == {"sfb7"} and commands.tables["bridge"] == {"sf_f7"}


async def test_connect_reaches_each_peer_once(tmp_path: Path, commands: FakeCommands) -> None:
    nets = networks(tmp_path)
    nets.underlay = "10.0.0.1"
    add_member(nets, "a", 7, 0)
    await nets.join("a", parent_here=True)
    await asyncio.gather(nets.connect(7, ["10.0.0.2", "10.0.0.1"]), nets.connect(7, ["10.0.0.2"]))
    assert commands.count("fdb append") == 1
    assert nets.families[7].fabric.peers == {"10.0.0.2"}
    await nets.connect(9, ["10.0.0.3"])  # no such family here: nothing
    assert commands.count("10.0.0.3") == 0
    await nets.close()


async def test_a_prepared_network_serves_the_clones_that_come_then_goes(
    tmp_path: Path, commands: FakeCommands
) -> None:
    """Made when a ticket placed clones here (net.prepare): a clone then only plugs
    its tap in; the network outlives a clone gone before its hold ends, and goes
    when the hold ends without members. One nobody joins goes too."""
    nets = networks(tmp_path)
    nets.underlay = "10.0.0.2"
    await nets.prepare(7, ["10.0.0.1", "10.0.0.2"], hold=0.5)
    assert commands.count("link add sfb7") == 1 and commands.count("fdb append") == 1
    before = len(commands.argvs)
    add_member(nets, "a", 7, 1)
    await nets.join("a", parent_here=False, peers=["10.0.0.1"])
    after = [" ".join(a) for a in commands.argvs[before:]]
    assert [a for a in after if "master sfb7" in a] == [a for a in after if "sft7-1" in a]
    assert len(after) == 1  # its tap put on the bridge, no more
    await nets.leave("a")
    assert 7 in nets.families  # held: the ticket's next clone may still come
    await nets.prepare(8, [], hold=0.2)
    await asyncio.sleep(0.8)
    assert nets.families == {} and commands.count("link del sfb7") == 1
    assert commands.count("link del sfb8") == 1
    await nets.close()

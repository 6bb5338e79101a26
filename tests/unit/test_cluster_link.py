"""An sfld's link to the master against a fake master: its heartbeats keep their
beat while the host acts on what a reply asked for (killing clones, whose network
goes with them)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sflib.cluster import wire
from sflib.cluster.link import ClusterLink

SECRET = b"s" * 16
BEAT = 0.1  # seconds between heartbeats
HANDLING = 2.0  # seconds the host takes to act on a reply


class FakeMaster:
    """Answers register and heartbeat; the first heartbeat's reply declares h9 dead
    and revokes ticket t1."""

    def __init__(self) -> None:
        self.beats: list[float] = []

    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        if op == "register":
            return {"heartbeat": BEAT, "host_timeout": 5}
        self.beats.append(time.monotonic())
        first = len(self.beats) == 1
        return {"dead": ["h9"], "revoked": ["t1"] if first else []}


async def test_heartbeats_go_on_while_the_host_acts_on_a_reply() -> None:
    master = FakeMaster()
    server = await wire.serve("127.0.0.1", 0, SECRET, master.dispatch)
    port = server.sockets[0].getsockname()[1]
    link = ClusterLink("h1", f"127.0.0.1:{port}", "127.0.0.1:0", SECRET, 4)
    acted: list[str] = []

    async def slow(what: list[str]) -> None:  # stopping VMs and their networks
        acted.extend(what)
        await asyncio.sleep(HANDLING)
        acted.append("done")

    link.on_dead = link.on_revoked = slow

    async def ignore(op: str, args: dict[str, Any]) -> Any:
        return {}

    try:
        await link.start(ignore)
        await asyncio.sleep(HANDLING * 0.6)
        assert sorted(acted) == ["h9", "t1"]  # both at once, neither done yet
        gaps = [b - a for a, b in zip(master.beats, master.beats[1:], strict=False)]
        # Awaited in the heartbeat's task, the handlers would leave a gap of HANDLING.
        assert len(master.beats) >= 4 and max(gaps) < HANDLING / 2
    finally:
        await link.close()  # stops the handlers too
        server.close()
        await server.wait_closed()
    assert "done" not in acted

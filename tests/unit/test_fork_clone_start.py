"""A clone's tap joins its family network while its QEMU starts (sflib.fork.local):
whichever of the two fails, or when the start is cancelled, the clone is not left
half made: its tap is taken off the network only once the join is over. QEMU and
the network are fakes that record what was done, in order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from sflib.errors import SystemFailure
from sflib.fork import mechanics
from sflib.fork.local import LocalClones
from sflib.fork.tickets import CloneState, Ticket, TicketState


class FakeNetwork:
    def __init__(self, events: list[str], plug_fails: bool) -> None:
        self.events = events
        self.plug_fails = plug_fails

    def open(self, _parent: object, name: str, _member: int) -> object:
        self.events.append(f"open {name}")
        return object()  # a card

    async def plug(self, name: str) -> None:
        await asyncio.sleep(0.02)  # longer than the fake QEMU's start
        if self.plug_fails:
            self.events.append(f"plug {name} failed")
            raise SystemFailure(f"cannot attach {name}")
        self.events.append(f"plugged {name}")

    async def unplug(self, name: str) -> None:
        self.events.append(f"unplugged {name}")


class FakeVMs:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def register(self, clone: Any) -> None:
        self.events.append(f"registered {clone.machine.spec.name}")

    async def stop(self, name: str) -> None:
        self.events.append(f"stopped {name}")


def clones(events: list[str], plug_fails: bool = False) -> LocalClones:
    requests = SimpleNamespace(answer=lambda *_: events.append("answered"))
    return LocalClones(FakeVMs(events), requests, "h1", FakeNetwork(events, plug_fails),  # type: ignore[arg-type]
                       None, tapped=False)  # fmt: skip


def fake_qemu(monkeypatch: pytest.MonkeyPatch, events: list[str], fails: bool = False,
              delay: float = 0.0) -> None:  # fmt: skip
    async def restore_clone(_vms: object, _qemu: str, _ckpt: object, order: Any) -> Any:
        await asyncio.sleep(delay)
        if fails:
            events.append(f"QEMU {order.name} failed")
            raise SystemFailure("QEMU exited")
        events.append(f"QEMU {order.name}")

        async def resume() -> None:
            events.append(f"resumed {order.name}")

        spec = SimpleNamespace(name=order.name, domid=7)
        return SimpleNamespace(machine=SimpleNamespace(spec=spec, resume=resume))

    monkeypatch.setattr(mechanics, "restore_clone", restore_clone)


PARENT: Any = SimpleNamespace(machine=SimpleNamespace(spec=SimpleNamespace(name="web", domid=3),
                                                      qemu="qemu"))  # fmt: skip
CKPT: Any = SimpleNamespace(rid="r1")


def ticket() -> Ticket:
    return Ticket("t1", "web", 1, 1)


async def test_the_tap_joins_while_qemu_starts_and_the_clone_runs_after_both(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    events: list[str] = []
    fake_qemu(monkeypatch, events)
    local = clones(events)
    monkeypatch.setattr(local, "_introduce", lambda *_: events.append("introduced"))
    t = ticket()
    await local.start(PARENT, CKPT, t, 1, {})
    assert events == ["open t1-1", "QEMU t1-1", "registered t1-1", "plugged t1-1",
                      "introduced", "resumed t1-1", "answered"]  # fmt: skip
    assert t.clones[1].state == CloneState.RUNNING


async def test_a_qemu_that_fails_leaves_no_tap_once_the_join_is_over(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    events: list[str] = []
    fake_qemu(monkeypatch, events, fails=True)
    t = ticket()
    await clones(events).start(PARENT, CKPT, t, 1, {})
    assert events == ["open t1-1", "QEMU t1-1 failed", "plugged t1-1", "unplugged t1-1"]
    assert t.clones[1].state == CloneState.CRASHED


async def test_a_tap_that_cannot_join_stops_the_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    fake_qemu(monkeypatch, events)
    t = ticket()
    await clones(events, plug_fails=True).start(PARENT, CKPT, t, 1, {})
    await asyncio.sleep(0)  # stop_soon's task
    assert events == ["open t1-1", "QEMU t1-1", "registered t1-1", "plug t1-1 failed",
                      "stopped t1-1"]  # fmt: skip
    assert t.clones[1].state == CloneState.CRASHED


async def test_a_cancelled_start_unplugs_after_the_join(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    fake_qemu(monkeypatch, events, delay=10)
    start = asyncio.create_task(clones(events).start(PARENT, CKPT, ticket(), 1, {}))
    await asyncio.sleep(0.005)
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert events == ["open t1-1", "plugged t1-1", "unplugged t1-1"]


async def test_a_ticket_killed_while_cloning_stops_the_clone(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    events: list[str] = []
    fake_qemu(monkeypatch, events)
    t = ticket()
    t.state = TicketState.ENDED
    await clones(events).start(PARENT, CKPT, t, 1, {})
    await asyncio.sleep(0)
    assert events == ["open t1-1", "QEMU t1-1", "registered t1-1", "plugged t1-1",
                      "stopped t1-1"]  # fmt: skip
    assert t.clones[1].state == CloneState.KILLED

"""Which standby QEMU a fork may use (sflib.fork.standby), with QEMU left out:
start_next is replaced by a fake that records what it started."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sflib.fork import standby
from sflib.fork.standby import Standbys

VMS = SimpleNamespace(images={})  # no VM maps a frozen image


class FakeMachine:
    def __init__(self, memory: Path) -> None:
        self.files = SimpleNamespace(memory=memory)
        self.running = True
        self.stopped = False

    async def stop(self) -> None:
        self.running, self.stopped = False, True


def vm(memory: Path, name: str = "web") -> Any:
    return SimpleNamespace(machine=SimpleNamespace(spec=SimpleNamespace(name=name),
                                                   files=SimpleNamespace(memory=memory),
                                                   running=True))  # fmt: skip


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[FakeMachine]:
    machines: list[FakeMachine] = []

    async def fake_start_next(_vms: object, _vm: object, memory: Path) -> FakeMachine:
        await asyncio.sleep(0.01)  # still starting when a fork comes
        machines.append(FakeMachine(memory))
        return machines[-1]

    monkeypatch.setattr(standby, "start_next", fake_start_next)
    return machines


async def test_a_fork_takes_the_standby_that_maps_what_it_freezes(started: list[Any]) -> None:
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    web = vm(Path("/m/web.mem"))
    standbys.prepare(web)
    standbys.prepare(web)  # one at a time
    machine = await standbys.take(web, Path("/m/web.mem"))
    assert machine is started[0] and len(started) == 1 and not machine.stopped
    assert await standbys.take(web, Path("/m/web.mem")) is None  # it was taken


async def test_a_standby_mapping_another_file_is_stopped_not_used(started: list[Any]) -> None:
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    web = vm(Path("/m/k1.mem"))
    standbys.prepare(web)
    assert await standbys.take(web, Path("/m/k2.mem")) is None  # the fork copies the image
    assert started[0].stopped


async def test_a_dead_standby_is_not_used(started: list[Any]) -> None:
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    web = vm(Path("/m/web.mem"))
    standbys.prepare(web)
    await asyncio.sleep(0.05)
    started[0].running = False  # QEMU died meanwhile
    assert await standbys.take(web, Path("/m/web.mem")) is None


async def test_a_standby_that_failed_to_start_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(*_: object) -> None:
        raise RuntimeError("no QEMU")

    monkeypatch.setattr(standby, "start_next", failing)
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    web = vm(Path("/m/web.mem"))
    standbys.prepare(web)
    assert await standbys.take(web, Path("/m/web.mem")) is None


async def test_the_standby_stops_with_its_vm(started: list[Any]) -> None:
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    standbys.prepare(vm(Path("/m/a.mem"), "a"))
    standbys.prepare(vm(Path("/m/b.mem"), "b"))
    await asyncio.sleep(0.05)
    await standbys.drop("a")
    assert [m.stopped for m in started] == [True, False]
    standbys.prepare(vm(Path("/m/c.mem"), "c"))  # still starting: cancelled
    await standbys.drop_all()
    assert [m.stopped for m in started] == [True, True]
    await standbys.drop("nobody")


async def test_no_standby_for_a_clone_through_memtap(started: list[Any]) -> None:
    vms = SimpleNamespace(images={"web-1": SimpleNamespace(owned=False)})
    standbys = Standbys(vms, enabled=True)  # type: ignore[arg-type]
    standbys.prepare(vm(Path("/m/tap/k1.mem"), "web-1"))  # its forks copy the image
    await asyncio.sleep(0.05)
    assert started == []


async def test_no_standby_when_the_setting_is_off(started: list[Any]) -> None:
    standbys = Standbys(VMS, enabled=False)  # type: ignore[arg-type]
    web = vm(Path("/m/web.mem"))
    standbys.prepare(web)
    assert await standbys.take(web, Path("/m/web.mem")) is None
    assert started == []


async def test_dropping_a_standby_that_failed_to_start_is_quiet(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    async def failing(*_: object) -> None:
        raise RuntimeError("no QEMU")

    monkeypatch.setattr(standby, "start_next", failing)
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    standbys.prepare(vm(Path("/m/web.mem")))
    await asyncio.sleep(0.01)
    await standbys.drop("web")  # no exception: there was nothing to stop


async def test_a_caller_cancelled_while_it_drops_a_standby_is_cancelled(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    async def slow(*_: object) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # stopping what it started takes a while
            raise

    monkeypatch.setattr(standby, "start_next", slow)
    standbys = Standbys(VMS, enabled=True)  # type: ignore[arg-type]
    standbys.prepare(vm(Path("/m/web.mem")))
    await asyncio.sleep(0.01)
    dropping = asyncio.create_task(standbys.drop("web"))
    await asyncio.sleep(0.01)
    dropping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dropping

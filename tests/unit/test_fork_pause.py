"""The pause's unhappy paths (sflib.fork.mechanics._freeze), with QEMU left out: a
pause that fails leaves the VM running in its QEMU, with its tap its own again
(sflib.net.tap.Hold), and the next QEMU stopped."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sflib.errors import SystemFailure
from sflib.fork import mechanics


class FakeMachine:
    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.calls: list[str] = []
        self.spec = SimpleNamespace(name="web", domid=1)
        self.pid = 0

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if what == self.fail:
            raise SystemFailure(f"QMP {what} failed")

    def set_tap_held(self, held: bool) -> None:
        self._call(f"held {held}")

    async def pause(self) -> None:
        self._call("pause")

    async def save_devices(self, _path: Path) -> None:
        self._call("save")

    async def resume(self) -> None:
        self._call("resume")

    async def stop(self) -> None:
        self._call("stop")


def plan(tmp_path: Path) -> Any:
    return mechanics._Plan(base=None, mapped=tmp_path / "web.mem", target=tmp_path / "web.mem",
                           in_place=False)  # fmt: skip


async def freeze(old: FakeMachine, new: FakeMachine, tmp_path: Path) -> None:
    vm = SimpleNamespace(machine=old)
    with pytest.raises(SystemFailure):
        await mechanics._freeze(SimpleNamespace(), vm, new, plan(tmp_path),  # type: ignore[arg-type]
                                tmp_path / "c1.mem", tmp_path / "c1")  # fmt: skip


async def test_a_qemu_that_does_not_stop_gets_its_tap_back(tmp_path: Path) -> None:
    old, new = FakeMachine(fail="pause"), FakeMachine()
    await freeze(old, new, tmp_path)
    assert old.calls == ["held True", "pause", "held False"]
    assert new.calls == ["stop"]


async def test_a_pause_that_fails_runs_the_vm_again_with_its_tap(tmp_path: Path) -> None:
    (tmp_path / "c1").mkdir()
    old, new = FakeMachine(fail="save"), FakeMachine()
    await freeze(old, new, tmp_path)
    assert old.calls == ["held True", "pause", "save", "held False", "resume"]
    assert new.calls == ["stop"]
    assert not (tmp_path / "c1").exists()

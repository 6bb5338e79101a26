"""The daemons' event-loop lag monitor (sflib.looplag), its setting, and the
master's loop watched by it."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sflib import looplag
from sflib.cluster.master import Master
from sflib.cluster.registry import Registry
from sflib.paths import Paths
from sflib.settings import LOOP_STALL_WARNING, MASTER_SETTINGS, SFLD_SETTINGS, resolve


def stalls(caplog: pytest.LogCaptureFixture) -> list[int]:
    return looplag.stalls("\n".join(r.getMessage() for r in caplog.records))


async def test_a_blocking_callback_is_reported_as_a_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "sflib.looplag")
    async with looplag.watching(0.1, interval=0.02) as monitor:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # what a synchronous subprocess in a handler does to the loop
        await asyncio.sleep(0.05)
    # (A busy machine may add stalls of its own, shorter.)
    assert 250 <= max(stalls(caplog)) < 1000
    assert monitor.stalls >= 1 and monitor.worst >= 0.25
    assert "(on CPU " in caplog.records[0].getMessage()


async def test_the_threshold_is_honoured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "sflib.looplag")
    async with looplag.watching(0.5, interval=0.02) as monitor:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # held up, but less than 0.5 s
        await asyncio.sleep(0.05)
    assert stalls(caplog) == []
    assert monitor.stalls == 0 and 0.15 <= monitor.worst < 0.5


async def test_an_idle_loop_does_not_stall(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "sflib.looplag")
    async with looplag.watching(0.5) as monitor:  # (a busy machine delays it a little)
        await asyncio.sleep(0.3)
    assert stalls(caplog) == [] and monitor.worst < 0.5


def test_stall_lines_are_parsed_and_counted_from_a_log() -> None:
    monitor = looplag.LagMonitor(0.1)
    monitor.note(0.05)
    monitor.note(1.2345, cpu=1.2)
    assert (monitor.stalls, monitor.worst) == (1, 1.2345)
    log = ("sfld: ready\nsflib.looplag: event loop stalled 1234 ms (on CPU 1200 ms)\n"
           "x\nevent loop stalled 99 ms (on CPU 0 ms)\n")  # fmt: skip
    assert looplag.stalls(log) == [1234, 99]
    assert looplag.stalls("nothing to see") == []
    log += "sfld: WARNING: event loop stalled 1500 ms (on CPU 0 ms, waiting for a CPU 1400 ms)\n"
    assert looplag.stalls(log) == [1234, 99, 1500]
    assert looplag.held(log) == [1234, 99, 100]  # a starved daemon held its loop 100 ms


def test_time_waiting_for_a_cpu_is_told_apart() -> None:
    spent = looplag.run_delay()
    assert 0 <= spent < 1e6
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # compete with them for the CPUs
            pass
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert looplag.run_delay() > spent  # this thread waited for a CPU meanwhile


@pytest.mark.parametrize("daemon", ["sfld", "sfmasterd"])
def test_each_daemon_has_the_setting_with_a_default(tmp_path: Path, daemon: str) -> None:
    table = SFLD_SETTINGS if daemon == "sfld" else MASTER_SETTINGS

    def value(cli: dict[str, object], env: dict[str, str]) -> object:
        return resolve(table, Paths(tmp_path), None, cli, env, daemon)["loop_stall_warning"]

    assert value({}, {}) == LOOP_STALL_WARNING == 0.1
    assert value({}, {"SF_LOOP_STALL_WARNING": "0.5"}) == 0.5
    assert value({"loop_stall_warning": "2"}, {"SF_LOOP_STALL_WARNING": "0.5"}) == 2.0


async def test_the_master_reports_its_own_stalls_past_its_threshold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "sflib.looplag")
    master = Master(Registry(tmp_path / "m.db"), heartbeat=1, host_timeout=5,
                    loop_stall_warning=0.1)  # fmt: skip
    stopping, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(master.run("127.0.0.1:0", b"s" * 16, stopping, ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    await asyncio.sleep(0.1)
    time.sleep(0.3)
    await asyncio.sleep(0.1)
    stopping.set()
    await asyncio.wait_for(running, 10)
    assert len([s for s in stalls(caplog) if s >= 250]) == 1

"""How late a daemon's event loop runs (DESIGN: no work blocks a daemon's loop).

A task sleeps INTERVAL seconds over and over and measures how late it woke: as
late as something held the loop (a blocking call in a handler), less at most
INTERVAL. Past the daemon's threshold it logs a warning, one line per stall,
which tests parse (STALL):

    event loop stalled 1234 ms (on CPU 1200 ms, waiting for a CPU 10 ms)

"on CPU" is the time the loop's thread ran meanwhile: near the stall, the daemon
itself computed. "waiting for a CPU" is the time it was ready to run but the
machine ran others (from /proc/thread-self/schedstat): a busy machine's doing,
not the daemon's. The rest of a stall the thread waited in a system call (a
synchronous subprocess, say). held() is what the daemon itself held its loop for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable

log = logging.getLogger(__name__)

INTERVAL = 0.05  # seconds between wake-ups: stalls are measured to within this
STALL = re.compile(r"event loop stalled (\d+) ms(?: \(on CPU \d+ ms, waiting for a CPU (\d+) ms)?")


class LagMonitor:
    """Use run() as a task, or watching(). worst is the longest lag seen (s)."""

    def __init__(self, threshold: float, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.threshold = threshold
        self.interval = interval
        self.clock = clock
        self.worst = 0.0
        self.stalls = 0

    async def run(self) -> None:
        while True:
            start, cpu, waited = self.clock(), time.thread_time(), run_delay()
            await asyncio.sleep(self.interval)
            self.note(self.clock() - start - self.interval, time.thread_time() - cpu,
                      run_delay() - waited)  # fmt: skip

    def note(self, late: float, cpu: float = 0.0, waited: float = 0.0) -> None:
        """One wake-up late seconds late, the loop's thread having run cpu seconds
        and waited for a CPU waited seconds."""
        self.worst = max(self.worst, late)
        if late > self.threshold:
            self.stalls += 1
            log.warning("event loop stalled %d ms (on CPU %d ms, waiting for a CPU %d ms)",
                        round(late * 1000), round(cpu * 1000),
                        round(min(waited, late) * 1000))  # fmt: skip


@contextlib.asynccontextmanager
async def watching(threshold: float, interval: float = INTERVAL) -> AsyncIterator[LagMonitor]:
    """The running loop watched by a LagMonitor while the block runs."""
    monitor = LagMonitor(threshold, interval)
    task = asyncio.create_task(monitor.run(), name="loop-lag")
    try:
        yield monitor
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def stalls(log_text: str) -> list[int]:
    """The stalls (ms) a daemon's log reports."""
    return [int(m.group(1)) for m in STALL.finditer(log_text)]


def held(log_text: str) -> list[int]:
    """Of each stall a daemon's log reports, the part the daemon itself held its loop
    (ms): the stall less the time its thread waited for a CPU."""
    return [int(m.group(1)) - int(m.group(2) or 0) for m in STALL.finditer(log_text)]


def run_delay() -> float:
    """Seconds this thread has spent ready to run but not running (0 where the
    kernel does not tell)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0

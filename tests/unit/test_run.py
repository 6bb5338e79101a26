"""sflib.run's children die with the process that started them, however it dies.

A helper Python process calls run.run (in its main thread, or from a worker thread as
asyncio.to_thread does) or run.run_async on a child that writes its pid to a file and
sleeps; the test signals the helper and the child must go. No test depends on how
fast the machine is: each waits for an event, with a generous deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sflib import run
from sflib.errors import OperationTimeout

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0  # seconds: only a broken run.py waits this long

HELPER = """
import asyncio, signal, sys
from sflib import run
how, pidfile = sys.argv[1:]
child = [sys.executable, "-c", "import os, signal, sys, time; "
         "signal.signal(signal.SIGTERM, signal.SIG_IGN) if sys.argv[2] == 'stubborn' else 0; "
         "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)", pidfile, how]
if how == "run":
    run.run(child, timeout=600)
elif how == "stubborn":
    run.run(child, timeout=600, death_signal=signal.SIGKILL)
elif how == "thread":
    asyncio.run(asyncio.to_thread(run.run, child, timeout=600))
else:
    asyncio.run(run.run_async(child, timeout=600))
"""


def wait_for(what: Callable[[], bool], why: str) -> None:
    end = time.monotonic() + DEADLINE
    while not what():
        assert time.monotonic() < end, why
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def started(pidfile: Path) -> bool:
    return pidfile.exists() and pidfile.read_text() != ""


CASES = [
    (how, sig)
    for how in ("run", "thread", "async")
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
    # ^C does not end a process whose asyncio.run waits for a worker thread: the
    # executor is joined, so run() in it finishes (or times out) first.
    if (how, sig) != ("thread", signal.SIGINT)
] + [("stubborn", signal.SIGKILL)]  # a child that ignores SIGTERM, given SIGKILL


@pytest.mark.parametrize(("how", "sig"), CASES, ids=[f"{h}-{s.name}" for h, s in CASES])
def test_a_child_dies_with_its_parent(tmp_path: Path, how: str, sig: signal.Signals) -> None:
    pidfile = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    helper = subprocess.Popen([sys.executable, "-c", HELPER, how, str(pidfile)], env=env,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    child = 0
    try:
        wait_for(lambda: started(pidfile), "no child started")
        child = int(pidfile.read_text())
        assert alive(child)
        helper.send_signal(sig)
        helper.wait(DEADLINE)
        wait_for(lambda: not alive(child), f"the child outlived a parent killed by {sig.name}")
    finally:
        helper.kill()
        helper.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_timeout_stops_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    with pytest.raises(OperationTimeout, match=r"did not finish within 0\.5 s"):
        run.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 600"], timeout=0.5)
    if started(pidfile):  # on a loaded machine the shell may not even have started
        assert not alive(int(pidfile.read_text()))


def test_a_ready_line_is_read_whole_or_the_wait_ends() -> None:
    """A daemon's --ready-fd line: read across writes; b"" when it closed the pipe
    (it exited); OperationTimeout when it says nothing (stuck), in about the time."""
    r, w = os.pipe()
    os.write(w, b"rea")
    os.write(w, b"dy\n")
    assert run.ready_line(r, 5) == b"ready\n"
    os.close(w)
    assert run.ready_line(r, 5) == b""
    os.close(r)
    r, w = os.pipe()
    started = time.monotonic()
    with pytest.raises(OperationTimeout, match=r"no ready line within 0\.3 s"):
        run.ready_line(r, 0.3)
    assert 0.3 <= time.monotonic() - started < 5
    os.close(r)
    os.close(w)

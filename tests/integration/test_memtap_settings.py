"""sfld's --memtap-prefetch and --memtap-timeout, seen from a real clone (TCG) whose
memory comes through memtap (clone_memory = memtap: the path a clone on another
host takes, over loopback) (issue 16)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from sflib.image import build as image
from sflib.paths import Paths
from tests.integration.conftest import GO, Host, boot, console, processes, running_host
from tests.integration.test_memtap_clones import clones_shared, go

pytestmark = pytest.mark.vm

TIMEOUT = 2.0  # --memtap-timeout; the default is 10
# memtap waits once for the server, reconnects once and waits again: with the default,
# 20 s at least. With TIMEOUT, about 4 s, plus the guest's and sfld's own delays.
CRASH_WITHIN = 15.0

CLONE = (
    """
t=$(sf-ticket 1)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" | sed 's/^/JOINED /'; echo SF-DONE
else
  echo up | sf-share put up
  """
    + GO
    + """
  dd if=/dev/urandom of=/tmp/scratch bs=1M count=64 2>/dev/null
  sf-exit 0
fi
"""
)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def memory_server_pid(host: Host) -> int:
    (line,) = processes(f"build/memserver --dir {host.memory_dir} ")
    return int(line.split()[0])


def clone_state(host: Host) -> str:
    (ticket,) = host.vm_json("tickets")
    (clone,) = ticket["clones"].values()
    return str(clone["state"])


def seconds_until_crashed(host: Host, limit: float = 120) -> float:
    start = time.monotonic()
    while clone_state(host) != "crashed":
        assert time.monotonic() - start < limit, host.log.read_text()[-3000:]
        time.sleep(0.2)
    return time.monotonic() - start


def test_memtap_prefetch_0_fetches_only_missing_pages_and_the_timeout_fails_a_stalled_clone(
    guest_image: image.Result,
) -> None:
    """--memtap-prefetch 0: every request to the memory server is for one page
    (with the default, up to 9). --memtap-timeout 2: a clone whose memory server
    stops answering crashes within seconds, not the default's 20, and sf-join says so."""
    args = ("--clone-memory", "memtap", "--memtap-prefetch", "0",
            "--memtap-timeout", f"{TIMEOUT:g}")  # fmt: skip
    with running_host(guest_image, *args) as h:
        parent = boot(h, "farm", CLONE)
        clones = clones_shared(h, parent, "up", 1)
        (tap,) = h.vm_json("memory")["taps"]
        assert tap["prefetch"] == 0 and tap["requests"] > 100, tap
        assert tap["pages_cached"] == tap["requests"], tap  # nothing beyond what was asked
        with stopped(memory_server_pid(h)):
            go(h, clones)  # 64 MiB of new data: pages the clone has not fetched
            seconds = seconds_until_crashed(h)
        print(f"crashed {seconds:.1f} s after the clone was let go")
        assert TIMEOUT < seconds < CRASH_WITHIN
        out = console(h, "farm")
        assert re.search(r"^JOINED 1 crashed", out, re.M), out[-3000:]
        logs = "".join(p.read_text() for p in (Paths(h.root).state_dir / "memory").glob("memtap-*"))
        assert "no answer within the timeout" in logs, logs

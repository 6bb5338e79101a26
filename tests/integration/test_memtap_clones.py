"""Clones whose memory comes lazily from the memory server through memtap, on real
VMs (TCG): sfld with clone_memory = memtap takes the path a clone on another host
takes (DESIGN §2 step 4), over loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sflib.image import build as image
from tests.integration.conftest import (
    GO,
    Host,
    boot,
    console,
    memtap_mounts,
    processes,
    running_host,
    vm_names,
)

pytestmark = pytest.mark.vm


@pytest.fixture
def tapped(guest_image: image.Result) -> Iterator[Host]:
    with running_host(guest_image, "--clone-memory", "memtap") as h:
        yield h


CLONES = (
    """
dd if=/dev/urandom of=/tmp/state bs=1M count=8 2>/dev/null
h=$(sha256sum /tmp/state | cut -c1-16)
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" > /tmp/join; echo "JOIN rc=$?"; sed 's/^/JOINED /' /tmp/join
  for k in 1 2; do echo "FROM $k $(sf-share get "$t" $k result)"; done
  echo "PARENT $h"; echo SF-DONE
else
  echo "$id $(sha256sum /tmp/state | cut -c1-16)" | sf-share put result
  """
    + GO
    + """
  dd if=/dev/urandom of=/tmp/scratch bs=1M count=64 2>/dev/null
  sf-exit 0
fi
"""
)


def clones_shared(host: Host, parent: dict[str, Any], key: str, n: int) -> list[dict[str, Any]]:
    """The clones of parent, once all n have stored key in the family share."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        tickets = host.vm_json("tickets")
        if tickets:
            share = f"/local/domain/{parent['domid']}/snowflock/share/{tickets[0]['ticket']}"
            done = [host.xenstore("xenstore-read", f"{share}/{k}/{key}/chunks").returncode == 0
                    for k in range(1, n + 1)]  # fmt: skip
            if all(done):
                return [v for v in host.vm_json("ls") if v["family"] == parent["name"]]
        time.sleep(1)
    raise AssertionError(f"clones did not share {key}:\n{host.log.read_text()[-3000:]}")


def go(host: Host, vms: list[dict[str, Any]]) -> None:
    for vm in vms:
        host.xenstore("xenstore-write", f"/local/domain/{vm['domid']}/go", "1")


def test_clones_fetch_their_memory_lazily_through_memtap(tapped: Host) -> None:
    parent = boot(tapped, "farm", CLONES)
    clones = clones_shared(tapped, parent, "result", 2)
    assert sorted(c["clone_id"] for c in clones) == [1, 2]
    memory = tapped.vm_json("memory")
    (tap,) = memory["taps"]  # one mount serves both clones of the image
    assert sorted(tap["users"]) == sorted(c["name"] for c in clones)
    assert tap["server"] == memory["memserver"] and tap["server_alive"] is True
    # Lazy: the clones ran a shell and Python, yet most of the 256 MiB never moved.
    assert 0 < tap["pages_cached"] < tap["pages"] // 2, tap
    assert tap["pages_fetched"] + tap["pages_zero"] <= tap["pages_cached"]
    for clone in clones:  # their QEMUs map the memtap file, not the frozen image
        cmdline = Path(f"/proc/{clone['pid']}/cmdline").read_bytes().decode()
        assert f"mem-path={tap['file']}," in cmdline
    served = json.loads(tapped.tool("sf-memserver", "stats", memory["memserver"], "--json",
                                    "--secret-file", str(tapped.root / "etc/snowflock/secret"))
                        .stdout)  # fmt: skip
    assert served["pages_sent"] >= tap["pages_fetched"]  # the clones ran on in between
    go(tapped, clones)
    out = console(tapped, "farm")
    parent_hash = re.search(r"^PARENT (\w+)", out, re.M).group(1)  # type: ignore[union-attr]
    for k in (1, 2):
        assert f"FROM {k} {k} {parent_hash}" in out  # the memory from before the fork
        assert f"JOINED {k} exited 0" in out
    assert vm_names(tapped) == ["farm"]
    assert tapped.vm_json("memory")["taps"] == []  # the last clone out unmounted it
    assert memtap_mounts(tapped.memory_dir) == []


def test_a_dead_memory_server_fails_the_clones_not_the_parent(tapped: Host) -> None:
    parent = boot(tapped, "farm", CLONES)
    clones = clones_shared(tapped, parent, "result", 2)
    (line,) = processes(f"build/memserver --dir {tapped.memory_dir} ")
    os.kill(int(line.split()[0]), signal.SIGKILL)
    go(tapped, clones)  # 64 MiB of new data: pages no clone has fetched yet
    out = console(tapped, "farm")
    assert "JOIN rc=1" in out
    for k in (1, 2):
        assert f"JOINED {k} crashed -" in out
    assert vm_names(tapped) == ["farm"]  # the parent runs on
    assert tapped.vm_json("memory")["taps"] == []
    assert memtap_mounts(tapped.memory_dir) == []
    assert "ended without sf-exit" in tapped.log.read_text()


def test_sfld_killed_with_tapped_clones_cleans_up_on_restart(tapped: Host) -> None:
    parent = boot(tapped, "farm", CLONES)
    clones_shared(tapped, parent, "result", 2)
    assert tapped.stop(signal.SIGKILL) == -signal.SIGKILL
    tapped.start("--clone-memory", "memtap")  # finds what the dead sfld left, removes it
    deadline = time.monotonic() + 30
    while tapped.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tapped.leftovers() == []
    assert vm_names(tapped) == []


SCRATCH = """
free=$(awk '/^MemFree/ { print int($2 / 1024) - 16 }' /proc/meminfo)
dd if=/dev/urandom of=/tmp/junk bs=1M count="$free" 2>/dev/null; rm /tmp/junk
t=$(sf-ticket 1)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" | sed 's/^/JOINED /'; echo SF-DONE
else
  dd if=/dev/urandom of=/tmp/scratch bs=1M count=64 2>/dev/null  # new data, free pages
  sf-exit 0
fi
"""


SCRATCH_PAGES = 64 << 8  # what the clone writes, in pages


def test_free_pages_are_never_fetched(tapped: Host) -> None:
    """The avoidance heuristic: the pages a guest had free when it was cloned are
    never fetched, and its clone writes 64 MiB of new data into them without
    fetching them. The parent first fills and frees its free memory, as a job that
    loads and drops its input would. Without avoidance, the free pages are not
    fetched either: the guests boot with init_on_free=1, so a freed page is zero,
    and sfld punches zero pages out of the image, which memtap fills locally."""
    taps = []
    for name, avoidance in (("without", "0"), ("with", "1")):
        boot(tapped, name, f"export SF_AVOIDANCE={avoidance}\n{SCRATCH}")
        assert "JOINED 1 exited 0" in console(tapped, name)
        taps.append(tapped.vm_json("memory")["unmounted"][-1])
        tapped.tool("sf-vm", "stop", name)
    without, with_ = taps
    log = tapped.log.read_text()
    reported = [int(n) for n in re.findall(r"for checkpoint \S+ \((\d+) free pages\)", log)]
    assert reported[0] == 0 and reported[1] > 8192  # a 256 MiB guest has 32+ MiB free
    assert without["pages_free"] == 0
    assert with_["pages_free"] == reported[1]  # memtap knew them all from the start...
    served = json.loads(tapped.tool("sf-memserver", "stats", tapped.vm_json("memory")["memserver"],
                                    "--json", "--secret-file",
                                    str(tapped.root / "etc/snowflock/secret")).stdout)  # fmt: skip
    assert served["freemaps"] == 2
    # ...and the clone's 64 MiB went into free pages, fetched in neither case.
    assert with_["pages_fetched"] < SCRATCH_PAGES and without["pages_fetched"] < SCRATCH_PAGES
    assert with_["pages_fetched"] < without["pages_fetched"] * 1.1, (without, with_)

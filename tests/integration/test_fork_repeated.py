"""Fork as a primitive, on real VMs (TCG): the same VM forks again and again, on one
host and across hosts, with tickets that overlap, and every clone of every fork
sees exactly its parent's memory at that fork and random numbers of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sflib.fork import procmem
from sflib.image import build as image
from sflib.image.overlay import overlay
from tests.integration.conftest import Cluster, Host, boot, console, qemu_processes, running_cluster

pytestmark = pytest.mark.vm

# Each round the parent writes new data, so each fork's memory differs from the
# last; each clone reports what it sees. sf-clone's avoidance is on (the default).
ROUNDS = """
for r in 1 2 3 4 5; do
  dd if=/dev/urandom of=/tmp/s$r bs=1M count=2 2>/dev/null
  h=$(cat /tmp/s* | sha256sum | cut -c1-16)
  t=$(sf-ticket 2)
  free=$(awk '/^MemFree:/ {print $2}' /proc/meminfo)
  id=$(sf-clone "$t")
  if [ "$id" = 0 ]; then
    echo "FREE $r $free"
    sf-join "$t" >/dev/null; echo "JOIN $r rc=$?"
    for k in 1 2; do echo "SEEN $r $k $(sf-share get "$t" $k s) WANT $h"; done
  else
    cat /tmp/s* | sha256sum | cut -c1-16 | sf-share put s
    sf-exit 0
  fi
done
echo SF-DONE
"""


def test_five_forks_in_a_row_each_see_the_memory_at_their_fork(host: Host) -> None:
    boot(host, "rounds", ROUNDS)
    out = console(host, "rounds", timeout=600)
    for r in range(1, 6):
        assert f"JOIN {r} rc=0" in out
        for k in (1, 2):
            seen = re.search(rf"^SEEN {r} {k} (\w*) WANT (\w+)$", out, re.M)
            assert seen, f"round {r} clone {k}: {out[-2000:]}"
            assert seen.group(1) == seen.group(2), f"round {r}: clone {k} saw other memory"
    log = host.log.read_text()
    assert len(re.findall(r"rounds paused [\d.]+ ms", log)) == 5
    # Joined clones are gone, so every later fork updated the one image in place.
    assert "copying memory image" not in log
    images = list(host.memory_dir.glob("*.mem"))
    assert len(images) == 1, images
    # Sparse: the image holds what the guest used at the last fork, its free pages
    # are holes (the guest zeroes them, init_on_free), and so are the zero pages its
    # clones' faults filled (punched again as they ended), give or take what the
    # parent touched since.
    free = re.search(r"^FREE 5 (\d+)$", out, re.M)
    assert free, out[-2000:]
    used = (256 << 20) - int(free.group(1)) * 1024
    deadline = time.monotonic() + 10
    while images[0].stat().st_blocks * 512 > used + (16 << 20) and time.monotonic() < deadline:
        time.sleep(0.2)  # the last clones' exit: their refilled pages are punched
    held = images[0].stat().st_blocks * 512
    assert held <= used + (16 << 20), f"image {held >> 20} MiB, guest used {used >> 20} MiB"
    # Each fork went on in the QEMU started before it was asked for (sfld --standby),
    # and the next one waits: the VM's QEMU and its standby, which stops with it.
    assert len(re.findall(r"rounds: goes on in its standby QEMU", log)) == 5
    deadline = time.monotonic() + 60
    while len(qemu_processes(host.memory_dir)) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # the last fork's standby is started once its clones are
    assert len(qemu_processes(host.memory_dir)) == 2, qemu_processes(host.memory_dir)
    # The kernel tracks what both write (c/wptrack.c), so forks 2-5 copied the pages
    # the guest wrote before their pause, and the pause only those written after.
    for line in qemu_processes(host.memory_dir):
        assert procmem.tracks_writes(int(line.split()[0])), line
    ahead = [int(n) for n in re.findall(r"rounds: \d+ pages written into its image, (\d+) of "
                                        r"them before the pause", log)]  # fmt: skip
    assert len(ahead) == 5 and ahead[0] == 0 and all(n > 0 for n in ahead[1:]), ahead
    host.tool("sf-vm", "stop", "rounds")
    assert host.leftovers() == []


OVERLAP = """\
import hashlib, json, os, subprocess, sys, time
from sflib.guest import api

def write(size, offset):
    with open("/tmp/state", "r+b" if offset else "wb") as f:
        f.seek(offset)
        f.write(os.urandom(size))
    return seen()

def seen():
    with open("/tmp/state", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]

def share(value):
    subprocess.run(["sf-share", "put", "h"], input=value.encode(), check=True)

def shared(ticket, k):
    for _ in range(600):
        got = subprocess.run(["sf-share", "get", ticket, str(k), "h"], capture_output=True)
        if got.returncode == 0:
            return got.stdout.decode()
        time.sleep(0.5)
    return "none"

n1 = int(sys.argv[1])
want1 = write(4 << 20, 0)
t1, t2 = api.request_ticket(n1), api.request_ticket(2)
if api.clone(t1.id, avoidance=False):  # a clone of the first fork runs on
    share(seen())
    while True:
        time.sleep(3600)
# At once: the first fork's clones are still starting, and run while this one forks.
want2 = write(256 << 10, 1 << 20)
if api.clone(t2.id, avoidance=False):
    share(seen())
    api.exit_clone(0)
print("WANT", want1, want2, t1.granted, flush=True)
joined = api.join(t2.id)
print("JOIN2", json.dumps({k: c["state"] for k, c in joined["clones"].items()}), flush=True)
for k in range(1, t2.granted + 1):
    print("SEEN2", k, shared(t2.id, k), flush=True)
for k in range(1, t1.granted + 1):
    print("SEEN1", k, shared(t1.id, k), flush=True)
killed = api.kill(t1.id)
print("KILL1", json.dumps({k: c["state"] for k, c in killed["clones"].items()}), flush=True)
print("SF-DONE", flush=True)
"""


def overlapping_forks(host: Host, image: Path, n1: int,
                      meanwhile: Callable[[], None] | None = None) -> str:  # fmt: skip
    """The parent forks n1 clones, then 2 more at once; both forks' clones must see
    the memory of their own fork. meanwhile runs after the parent started."""
    host.vm_json("run", "--name", "over", "--image", str(image), "--memory", "256",
                 "--append", f'sf.run="python3 /root/overlap.py {n1}; sleep 100000"',
                 "--wait-ready")  # fmt: skip
    if meanwhile is not None:
        meanwhile()
    out = console(host, "over", timeout=600)
    want = re.search(r"^WANT (\w+) (\w+) (\d+)$", out, re.M)
    assert want, out[-3000:]
    want1, want2, granted1 = want.group(1), want.group(2), int(want.group(3))
    assert granted1 == n1
    joined = json.loads(re.search(r"^JOIN2 (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert joined == {"1": "exited", "2": "exited"}, out[-3000:]
    for k in (1, 2):
        assert f"SEEN2 {k} {want2}" in out, f"clone {k} of the second fork: {out[-3000:]}"
    for k in range(1, n1 + 1):
        assert f"SEEN1 {k} {want1}" in out, f"clone {k} of the first fork: {out[-3000:]}"
    killed = json.loads(re.search(r"^KILL1 (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
    assert set(killed.values()) == {"killed"} and len(killed) == n1
    return out


@pytest.fixture
def overlap_image(guest_image: image.Result, tmp_path: Path) -> Path:
    return overlay(guest_image.out, tmp_path / "image",
                   {"/root/overlap.py": (OVERLAP.encode(), 0o644)})  # fmt: skip


def test_a_fork_while_the_last_ones_clones_run(host: Host, overlap_image: Path) -> None:
    overlapping_forks(host, overlap_image, n1=6)
    log = host.log.read_text()
    # The first fork's clones still mapped its image: the second one is a copy, and
    # the standby QEMU, which maps the image the clones map, is not used.
    assert "over: copying memory image" in log
    assert "over: standby QEMU not used" in log


@pytest.mark.timeout(1800)  # three hosts' VMs under TCG
def test_overlapping_forks_across_hosts(guest_image: image.Result, overlap_image: Path) -> None:
    with running_cluster(guest_image, 3) as cluster:
        h1 = cluster.hosts[0]
        overlapping_forks(h1, overlap_image, n1=6)
        # The first fork's clones on h1 still mapped its image: the second is a copy.
        assert "over: copying memory image" in h1.log.read_text()
        assert _hosts_of_clones(cluster) == {"h1", "h2", "h3"}


@pytest.mark.timeout(1800)  # three hosts' VMs under TCG
def test_a_fork_while_the_last_ones_clones_are_still_starting(
    guest_image: image.Result, overlap_image: Path
) -> None:
    """h2's sfld is stopped (SIGSTOP) before the parent forks: the first fork's
    clones placed on h2 cannot start, and the parent forks again while they are
    still starting (its request to h2 in flight, the ticket still cloning on h1).
    Then h2 goes on, and every clone of both forks sees the memory of its fork.
    The master's host timeout outlasts the stop, so h2 is late, not dead."""
    with running_cluster(guest_image, 3, host_timeout=600, stalled=("h2",)) as cluster:
        h1, h2 = cluster.hosts[0], cluster.bed.hosts[1]
        assert h2.proc is not None
        h2_pid = h2.proc.pid

        def stall_h2_until_the_second_fork() -> None:
            forks = re.compile(r"over paused [\d.]+ ms for checkpoint")
            deadline = time.monotonic() + 600
            while len(forks.findall(h1.log.read_text())) < 2:
                assert time.monotonic() < deadline, h1.log.read_text()[-3000:]
                time.sleep(0.2)
            os.kill(h2_pid, signal.SIGCONT)

        os.kill(h2_pid, signal.SIGSTOP)
        try:
            overlapping_forks(h1, overlap_image, n1=6, meanwhile=stall_h2_until_the_second_fork)
        finally:
            os.kill(h2_pid, signal.SIGCONT)
        first = re.findall(r"over: forking for ticket (\S+)", h1.log.read_text())[0]
        # h2 had clones of the first fork, which it started only after the second.
        started_on_h2 = re.findall(r"clone \d+ of ticket (\S+) running", h2.log.read_text())
        assert first in started_on_h2, h2.log.read_text()[-3000:]
        assert "over: copying memory image" in h1.log.read_text()


# A parent up for more than 2 minutes: its kernel no longer reseeds its RNG on its
# own every few seconds, so only the fork's new generation ID (and sf-clone's seed)
# tells its members apart. Each member reads 16 bytes right after sf-clone, and
# counts the reseeds its kernel logged for a VM fork.
ENTROPY = """
tr -d - </proc/sys/kernel/random/uuid >/etc/machine-id
while [ "$(cut -d. -f1 /proc/uptime)" -lt 130 ]; do sleep 5; done
for r in 1 2 3 4 5; do
  dd if=/dev/urandom of=/tmp/s$r bs=1M count=2 2>/dev/null
  h=$(cat /tmp/s* | sha256sum | cut -c1-16)
  t=$(sf-ticket 3)
  id=$(sf-clone "$t")
  rnd=$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n')
  n=$(dmesg | grep -c 'reseeded due to virtual machine fork')
  m=$(cat /etc/machine-id)
  if [ "$id" = 0 ]; then
    echo "RND $r 0 $rnd $n $m"
    sf-join "$t" >/dev/null; echo "JOIN $r rc=$?"
    for k in 1 2 3; do echo "SEEN $r $k $(sf-share get "$t" $k s) WANT $h"; done
  else
    echo "$(cat /tmp/s* | sha256sum | cut -c1-16) $rnd $n $m" | sf-share put s
    sf-exit 0
  fi
done
echo SF-DONE
"""


@pytest.mark.timeout(1800)  # 2 minutes of uptime first, then five forks over three hosts
def test_five_forks_across_hosts_each_clone_unique(guest_image: image.Result) -> None:
    with running_cluster(guest_image, 3) as cluster:
        h1 = cluster.hosts[0]
        boot(h1, "old", ENTROPY)
        out = console(h1, "old", timeout=900)
        every: list[str] = []
        for r in range(1, 6):
            assert f"JOIN {r} rc=0" in out, out[-3000:]
            parent = re.search(rf"^RND {r} 0 (\w+) (\d+) (\w+)$", out, re.M)
            assert parent and int(parent.group(2)) == r  # its new QEMU: a new generation
            members, machine_ids = [parent.group(1)], {parent.group(3)}
            for k in (1, 2, 3):
                seen = re.search(rf"^SEEN {r} {k} (\w+) (\w+) (\d+) (\w+) WANT (\w+)$", out,
                                 re.M)  # fmt: skip
                assert seen, f"round {r} clone {k}: {out[-3000:]}"
                assert seen.group(1) == seen.group(5), f"round {r}: clone {k} saw other memory"
                assert int(seen.group(3)) == r, f"round {r}: clone {k}'s kernel did not reseed"
                members.append(seen.group(2))
                machine_ids.add(seen.group(4))
            assert len(set(members)) == 4, f"round {r}: members read the same bytes"
            assert len(machine_ids) == 4, f"round {r}: members share a machine ID"
            every += members
        assert len(set(every)) == len(every) == 20
        placed = _hosts_of_clones(cluster)
        assert placed == {"h1", "h2", "h3"}, placed
        assert "copying memory image" not in h1.log.read_text()


def _hosts_of_clones(cluster: Cluster) -> set[str]:
    tickets = cluster.hosts[0].vm_json("tickets")
    return {c["host"] or "h1" for t in tickets for c in t["clones"].values()}

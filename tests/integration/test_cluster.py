"""Clones on other hosts, in a cluster of network-namespace hosts on this machine
(DESIGN §6): a parent on h1, its clones placed by sfmasterd on h2 and h3, their
memory fetched lazily from h1's memory server through memtap; and the faults the
issue names: a memory server killed, a clone host's sfld killed, the master
restarted during a ticket."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sflib.image import build as image
from tests.integration.conftest import (
    GO,
    Cluster,
    Host,
    boot,
    console,
    processes,
    qemu_processes,
    running_cluster,
)
from tests.integration.test_fork import CHECKPOINT, moved_on

pytestmark = pytest.mark.vm

FORK = (
    """
dd if=/dev/urandom of=/tmp/state bs=1M count=8 2>/dev/null
h=$(sha256sum /tmp/state | cut -c1-16)
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  until [ "$(sf-share ls "$t" | grep -c result)" = 2 ]; do sleep 1; done
  echo "SHARED $t"
  sf-join "$t" > /tmp/join; echo "JOIN rc=$?"; sed 's/^/JOINED /' /tmp/join
  for k in 1 2; do echo "FROM $k $(sf-share get "$t" $k result)"; done
  echo "PARENT $h"; echo SF-DONE
else
  echo "$id $(sha256sum /tmp/state | cut -c1-16) $(hostname)" | sf-share put result
  """
    + GO
    + """
  dd if=/dev/urandom of=/tmp/scratch bs=1M count=64 2>/dev/null
  sf-exit $((id + 20))
fi
"""
)


@pytest.fixture
def cluster(guest_image: image.Result) -> Iterator[Cluster]:
    with running_cluster(guest_image, 3) as c:
        yield c


def clones_on(host: Host) -> list[dict[str, Any]]:
    return [v for v in host.vm_json("ls") if v["clone_id"] is not None]


def wait_for(what: str, check: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def release_clones(hosts: list[Host]) -> None:
    for host in hosts:
        for vm in clones_on(host):
            host.xenstore("xenstore-write", f"/local/domain/{vm['domid']}/go", "1")


def dead_hosts(host: Host) -> list[str]:
    return list(json.loads(host.tool("sf-cluster", "status", "--json").stdout)["dead_hosts"])


def master_tickets(cluster: Cluster) -> list[tuple[str, float | None]]:
    db = cluster.bed.master.root / "var/lib/snowflock-master/master.db"
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT id, ended FROM tickets").fetchall()


def test_clones_run_on_other_hosts_with_the_parents_memory(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    boot(h1, "farm", FORK)
    console(h1, "farm", "SHARED")
    # The master put one clone on each other host; the parent's host runs none.
    assert clones_on(h1) == []
    (c2,), (c3,) = clones_on(h2), clones_on(h3)
    assert {c2["clone_id"], c3["clone_id"]} == {1, 2}
    for host, clone in ((h2, c2), (h3, c3)):
        (tap,) = host.vm_json("memory")["taps"]  # its memory comes from h1's server
        assert tap["server"].startswith(cluster.bed.hosts[0].address + ":")
        assert tap["users"] == [clone["name"]]
        assert 0 < tap["pages_cached"] < tap["pages"] // 2, tap  # lazily: a fraction
        cmdline = Path(f"/proc/{clone['pid']}/cmdline").read_bytes().decode()
        assert f"mem-path={tap['file']}," in cmdline
    release_clones([h2, h3])
    out = console(h1, "farm")
    parent_hash = re.search(r"^PARENT (\w+)", out, re.M).group(1)  # type: ignore[union-attr]
    for k in (1, 2):
        assert re.search(rf"^FROM {k} {k} {parent_hash} \S+-{k}$", out, re.M), out[-2000:]
        assert f"JOINED {k} exited {k + 20}" in out
    (ticket,) = h1.vm_json("tickets")
    assert {c["host"] for c in ticket["clones"].values()} == {"h2", "h3"}
    assert ticket["placement"] == {"h2": 1, "h3": 1}
    assert clones_on(h2) == clones_on(h3) == []
    assert h2.vm_json("memory")["taps"] == [] and h3.vm_json("memory")["taps"] == []
    ((ticket_id, ended),) = master_tickets(cluster)
    assert ticket_id == ticket["ticket"] and ended is not None  # its slots went back


def test_a_dead_memory_server_fails_the_remote_clones_not_the_parent(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    boot(h1, "farm", FORK)
    console(h1, "farm", "SHARED")
    (line,) = processes(f"build/memserver --dir {h1.memory_dir} ")
    os.kill(int(line.split()[0]), signal.SIGKILL)
    release_clones([h2, h3])  # 64 MiB of new data: pages nobody fetched yet
    out = console(h1, "farm")
    assert "JOIN rc=1" in out
    for k in (1, 2):
        assert f"JOINED {k} crashed -" in out
    assert [v["name"] for v in h1.vm_json("ls")] == ["farm"]  # the parent runs on
    assert clones_on(h2) == clones_on(h3) == []
    assert h2.vm_json("memory")["taps"] == [] and h3.vm_json("memory")["taps"] == []


def test_a_clone_hosts_sfld_killed(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    boot(h1, "farm", FORK)
    console(h1, "farm", "SHARED")
    victim = cluster.bed.hosts[1]
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    # The master declares h2 dead (host_timeout); h1 reports its clone crashed.
    wait_for("h1 to learn that h2 died", lambda: "h2" in dead_hosts(h1), timeout=60)
    release_clones([h3])
    out = console(h1, "farm")
    states = {int(k): c["state"] for k, c in h1.vm_json("tickets")[0]["clones"].items()}
    k2 = next(k for k, c in h1.vm_json("tickets")[0]["clones"].items() if c["host"] == "h2")
    assert states[int(k2)] == "crashed"
    assert f"JOINED {k2} crashed -" in out and "JOIN rc=1" in out
    # Restarted, h2 cleans up what its dead sfld left and joins the cluster again.
    victim.start()
    wait_for("h2 to clean up", lambda: h2.leftovers() == [], timeout=60)
    wait_for("h2 to be alive again", lambda: "h2" not in dead_hosts(h1), timeout=60)


def test_the_master_restarted_during_a_ticket(cluster: Cluster) -> None:
    h1, h2, h3 = cluster.hosts
    boot(h1, "farm", FORK)
    console(h1, "farm", "SHARED")
    master = cluster.bed.master
    assert master.stop() == 0
    master.start()  # it finds its hosts and the live ticket in its database
    release_clones([h2, h3])
    out = console(h1, "farm")
    assert "JOIN rc=1" in out and "JOINED 1 exited 21" in out and "JOINED 2 exited 22" in out
    (ticket,) = h1.vm_json("tickets")
    ((ticket_id, ended),) = master_tickets(cluster)
    assert ticket_id == ticket["ticket"] and ended is not None
    hosts = json.loads(h1.tool("sf-cluster", "hosts", "--json").stdout)
    assert sorted(h["host"] for h in hosts if h["alive"]) == ["h1", "h2", "h3"]


def test_a_checkpoint_cloned_later_onto_other_hosts(cluster: Cluster) -> None:
    h1 = cluster.hosts[0]
    info = boot(h1, "ckpt", CHECKPOINT)
    ckpt = re.search(r"^CKPT (\S+)", console(h1, "ckpt", "CKPT"), re.M).group(1)  # type: ignore[union-attr]
    before, moved = moved_on(h1, "ckpt")
    h1.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go", "1")
    out = console(h1, "ckpt")
    assert "CREATE 0" in out and "JOIN rc=0" in out
    for k in (1, 2):  # resumed inside sf-checkpoint, on h2 and h3, with the old memory
        assert f"FROM {k} {ckpt} {k} before {before}" in out, out[-2000:]
    assert moved != before
    (ticket,) = h1.vm_json("tickets")
    assert {c["host"] for c in ticket["clones"].values()} == {"h2", "h3"}


# Two clones, placed on h2 and h3, wait; the parent kills them from h1 once the host
# says go, and tries its ticket again. Then it forks two more: clone 1 exits, and
# once the host says go2 the parent kills the one left.
KILL = (
    """
up() { echo "$1 $(hostname)" | sf-share put up; }
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" != 0 ]; then up "$id"; sleep 100000; fi
until [ "$(sf-share ls "$t" | wc -l)" = 2 ]; do sleep 1; done
echo "CLONES-UP $t"
"""
    + GO
    + """
echo "KILLED $(sf-kill "$t") rc=$?"
echo KILL-RETURNED
"""
    + GO.replace("b'go'", "b'go1'")  # the test looks at h2 and h3 before the next ticket
    + """
sf-join "$t"; echo "JOIN-AFTER-KILL rc=$?"
sf-kill "$t"; echo "KILL-AGAIN rc=$?"
u=$(sf-ticket 2)
id=$(sf-clone "$u")
if [ "$id" != 0 ]; then up "$id"; [ "$id" = 1 ] && sf-exit 3; sleep 100000; fi
until [ "$(sf-share ls "$u" | wc -l)" = 2 ]; do sleep 1; done
echo "SECOND-UP $u"
"""
    + GO.replace("b'go'", "b'go2'")
    + """
echo "KILLED-REST $(sf-kill "$u") rc=$?"
echo SF-DONE
"""
)


def clone_states(host: Host, ticket: str) -> dict[str, tuple[str, str]]:
    """A ticket's clones on host's listing: ID: (where it ran, its state)."""
    (record,) = [t for t in host.vm_json("tickets") if t["ticket"] == ticket]
    return {k: (c["host"], c["state"]) for k, c in record["clones"].items()}


def test_sf_kill_ends_clones_on_other_hosts(cluster: Cluster) -> None:
    """sf-kill in a parent on h1 ends its clones on h2 and h3 and returns when they
    are gone there: no clone VM, QEMU or memtap left on their hosts. Of a ticket
    whose clone 1 has exited, it kills the other one only."""
    h1, h2, h3 = cluster.hosts
    info = boot(h1, "boss", KILL)
    ticket = re.search(r"^CLONES-UP (\S+)$", console(h1, "boss", "CLONES-UP"), re.M).group(1)  # type: ignore[union-attr]
    for host in (h2, h3):
        assert len(clones_on(host)) == 1
        assert qemu_processes(host.memory_dir) != [] and host.vm_json("memory")["taps"] != []
    h1.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go", "1")
    out = console(h1, "boss", "KILL-RETURNED")
    for host in (h2, h3):  # sf-kill has returned: they are gone already
        assert clones_on(host) == [], host.log.read_text()[-3000:]
        assert qemu_processes(host.memory_dir) == []
        assert host.vm_json("memory")["taps"] == []
    assert re.search(r"^KILLED 1 2 rc=0$", out, re.M), out[-2000:]
    assert set(clone_states(h1, ticket).values()) == {("h2", "killed"), ("h3", "killed")}
    h1.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go1", "1")
    out = console(h1, "boss", "SECOND-UP")
    assert "JOIN-AFTER-KILL rc=4" in out and "KILL-AGAIN rc=4" in out
    second = re.search(r"^SECOND-UP (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    wait_for("clone 1 to exit", lambda: clone_states(h1, second)["1"][1] == "exited")
    host_of_2 = {"h2": h2, "h3": h3}[clone_states(h1, second)["2"][0]]
    h1.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go2", "1")
    out = console(h1, "boss")
    assert re.search(r"^KILLED-REST 2 rc=0$", out, re.M), out[-2000:]
    assert [state for _, (_, state) in sorted(clone_states(h1, second).items())] == [
        "exited", "killed"]  # fmt: skip
    assert clones_on(host_of_2) == [] and qemu_processes(host_of_2.memory_dir) == []
    ended = [e for _, e in master_tickets(cluster)]
    assert len(ended) == 2 and None not in ended  # their slots went back

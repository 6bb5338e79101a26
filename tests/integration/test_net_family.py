"""Family networks on real VMs (issue 6): every VM has a card on its family's private
network; a clone wakes with its link down and its parent's identity, takes its own
in hooks.d/clone-post.d/10-network, and only then talks. Across hosts, families
are apart, and the router admits from the outside only what the policy says."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import Iterator

import pytest

from sflib.image import build as image
from sflib.net import fabric, router
from sflib.net.identity import identity, mac
from tests.integration.conftest import (
    GO,
    Host,
    boot,
    console,
    processes,
    running_cluster,
    running_host,
)
from tests.integration.test_cluster import wait_for

pytestmark = pytest.mark.vm

ADDRESS = "ip -4 -o addr show dev eth0 | awk '{print $4}'"

# The parent reports its address, makes two clones, and waits for their reports;
# each clone reports its address and MAC, pings its parent and its sibling, renews
# its DHCP lease, and waits for "go" before it exits.
FAMILY = (
    f"""
me=$({ADDRESS}); echo "ADDR $me"
base=${{me%.*}}
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  until [ "$(sf-share ls "$t" | grep -c report)" = 2 ]; do sleep 1; done
  for k in 1 2; do echo "REPORT $k $(sf-share get "$t" $k report)"; done
  for k in 1 2; do
    ping -c 1 -W 3 "$base.$((2 + k))" >/dev/null && echo "PING $k ok" || echo "PING $k no"
  done
  ip neigh | sed 's/^/NEIGH /'
  echo SF-DONE
  sf-join "$t" >/dev/null
else
  other=$((3 - id))
  p=no; ping -c 1 -W 3 "$base.2" >/dev/null && p=ok
  s=no; ping -c 1 -W 3 "$base.$((2 + other))" >/dev/null && s=ok
  was=$({ADDRESS})
  lease=$(udhcpc -i eth0 -n -q -t 4 -T 1 2>&1 \\
    | sed -n 's/.*lease of \\([0-9.]*\\) obtained.*/\\1/p')
  echo "$was $(cat /sys/class/net/eth0/address) parent=$p sibling=$s lease=$lease" \\
    "now=$({ADDRESS})" | sf-share put report
  """
    + GO
    + """
  sf-exit 0
fi
"""
)


@pytest.fixture
def host(guest_image: image.Result) -> Iterator[Host]:
    with running_host(guest_image) as h:
        yield h


def clone_domains(host: Host) -> dict[int, int]:
    return {v["clone_id"]: v["domid"] for v in host.vm_json("ls") if v["clone_id"] is not None}


def learned_on(host: Host, tap: str) -> set[str]:
    """The MACs the bridge learned behind a tap: who ever spoke through it."""
    out = subprocess.run(["bridge", "-n", str(host.netns), "fdb", "show", "dev", tap],
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return {line.split()[0] for line in out.stdout.splitlines() if "permanent" not in line}


def test_clones_take_their_ids_identity_before_they_talk(host: Host) -> None:
    boot(host, "fam", FAMILY)
    out = console(host, "fam")
    parent = identity(1, 0)
    assert f"ADDR {parent.ip}" in out
    for k in (1, 2):
        me = identity(1, k)
        address = me.ip.split("/")[0]
        report = f"REPORT {k} {me.ip} {me.mac} parent=ok sibling=ok lease={address} now={me.ip}"
        assert report in out, out[-3000:]
        assert f"PING {k} ok" in out
        # The parent knows each clone by the clone's own MAC.
        assert re.search(rf"^NEIGH {address} .*lladdr {me.mac}", out, re.M)
    # sfld published each member's identity in its XenStore domain.
    for k, domid in clone_domains(host).items():
        raw = host.xenstore("xenstore-read", f"/local/domain/{domid}/snowflock/network").stdout
        assert json.loads(raw) == {**identity(1, k).to_json()}
        # Its card's link was down until it had its own MAC: the parent's never
        # went out through its tap.
        assert mac(1, 0) not in learned_on(host, fabric.tap_name(1, k))
        assert mac(1, k) in learned_on(host, fabric.tap_name(1, k))
    (family,) = host.vm_json("network")["families"]
    assert (family["family"], family["bridge"], family["members"]) == (1, "sfb1", [0, 1, 2])
    for domid in clone_domains(host).values():
        host.xenstore("xenstore-write", f"/local/domain/{domid}/go", "1")
    host.tool("sf-vm", "stop", "fam")
    wait_for("the family's network to go", lambda: not networks_on(host))
    assert routers_on(host) == []


# The parent forks 4 times, a clone each time, with a second between forks.
FORKS = """
sleep 3
for n in 1 2 3 4; do
  t=$(sf-ticket 1)
  id=$(sf-clone "$t")
  [ "$id" = 0 ] || sf-exit 0
  sf-join "$t" >/dev/null; echo "FORK $n"; sleep 1
done
sleep 2; echo SF-DONE
"""
PING_INTERVAL = 0.02  # seconds: each pause and each standby QEMU's start sees pings


def test_a_forking_parent_answers_every_ping(host: Host) -> None:
    """A parent that forks and forks again, and whose next QEMUs start beside its
    running one on the same tap, misses no frame sent to it."""
    boot(host, "pinged", FORKS)
    address = identity(1, 0).ip.split("/")[0]
    ping = subprocess.Popen(["ip", "netns", "exec", str(host.netns), "ping", "-n", "-i",
                             str(PING_INTERVAL), address], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        out = console(host, "pinged")
    finally:
        ping.send_signal(signal.SIGINT)
        replies, _ = ping.communicate(timeout=30)
    assert [f"FORK {n}" for n in (1, 2, 3, 4)] == re.findall(r"^FORK \d", out, re.M)
    sent = int(re.search(r"(\d+) packets transmitted", replies).group(1))  # type: ignore[union-attr]
    answered = {int(n) for n in re.findall(r"icmp_seq=(\d+) ", replies)}
    # All but the last second's, whose answers may still have been on their way.
    asked = set(range(1, sent - int(1 / PING_INTERVAL)))
    assert len(asked) > 400, replies[-500:]
    assert asked - answered == set(), f"pings never answered: {sorted(asked - answered)}"
    text = host.log.read_text()
    assert text.count("goes on in its standby QEMU") == 4, text[-3000:]


def networks_on(host: Host) -> list[int]:
    """The families whose network pieces are on host."""
    return asyncio.run(fabric.leftovers(host.netns))


def routers_on(host: Host) -> list[int]:
    """The families whose routing pieces are on host."""
    return asyncio.run(router.leftovers(host.netns))


def test_a_crashed_sflds_network_is_removed_when_it_starts_again(host: Host) -> None:
    boot(host, "fam", FAMILY)
    console(host, "fam")
    assert networks_on(host) == [1] and routers_on(host) == [1]
    host.stop(signal.SIGKILL)
    assert networks_on(host) == [1]  # nobody removed them
    assert processes(f"dnsmasq .*{host.root}/")  # it outlives sfld
    host.start()
    assert networks_on(host) == [] and routers_on(host) == []
    assert "removed the networks of families 1" in host.log.read_text()
    assert not processes(f"dnsmasq .*{host.root}/")


# Across hosts: the parent on h1 listens on 9090 (its clones inherit the listener),
# its clones on h2 and h3 on 8080 too; each answers with its hostname.
SERVE = """
serve() { python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('', $1)); s.listen(8)
while True:
    c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()
" & }
"""
SPREAD = (
    SERVE
    + """
serve 9090
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  until [ "$(sf-share ls "$t" | grep -c report)" = 2 ]; do sleep 1; done
  for k in 1 2; do echo "REPORT $k $(sf-share get "$t" $k report)"; done
  echo SHARED
  sf-join "$t" >/dev/null; echo SF-DONE
else
  serve 8080
  other=$((3 - id))
  p=no; ping -c 2 -W 3 10.0.16.2 >/dev/null && p=ok
  s=no; ping -c 2 -W 3 "10.0.16.$((2 + other))" >/dev/null && s=ok
  echo "parent=$p sibling=$s mtu=$(cat /sys/class/net/eth0/mtu)" | sf-share put report
  """
    + GO
    + """
  sf-exit 0
fi
"""
)

# Another family's parent: it reaches its own gateway, but not family 1, neither
# routed through its host nor with a MAC and an address of family 1's.
INTRUDER = (
    GO
    + """
g=no; ping -c 2 -W 3 10.0.32.1 >/dev/null && g=ok
r=no; ping -c 2 -W 3 10.0.16.2 >/dev/null && r=ok
ip link set dev eth0 address 02:53:46:00:10:32
ip addr flush dev eth0; ip addr add 10.0.16.50/20 dev eth0
s=no; ping -c 2 -W 3 10.0.16.2 >/dev/null && s=ok
echo "gateway=$g routed=$r spoofed=$s"
echo SF-DONE
"""
)


def connect(netns: str, address: str, port: int) -> str:
    """What a TCP client in netns gets from address:port: the answer, or the error."""
    code = ("import socket, sys\n"
            "try:\n"
            f"    c = socket.create_connection(('{address}', {port}), timeout=10)\n"
            "    print(c.recv(100).decode())\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n")  # fmt: skip
    out = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", code],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.mark.parametrize("mode", ["distributed", "central"])
def test_a_family_spans_hosts_behind_its_router(guest_image: image.Result, mode: str) -> None:
    args = ("--router", mode, "--inbound-ports", "8080")
    with running_cluster(guest_image, 3, *args) as cluster:
        h1, h2, h3 = cluster.hosts
        bed = cluster.bed
        boot(h1, "fam", SPREAD)
        boot(h2, "intruder", INTRUDER)
        out = console(h1, "fam", "SHARED")
        for k in (1, 2):
            assert f"REPORT {k} parent=ok sibling=ok mtu={fabric.VXLAN_MTU}" in out, out[-2000:]
        where = {v["clone_id"]: h.netns for h in (h2, h3) for v in h.vm_json("ls")
                 if v["clone_id"] is not None}  # fmt: skip
        assert sorted(where) == [1, 2]
        # Another family, on a host that runs one of these clones, cannot reach them.
        (intruder_domid,) = [v["domid"] for v in h2.vm_json("ls") if v["name"] == "intruder"]
        h2.xenstore("xenstore-write", f"/local/domain/{intruder_domid}/go", "1")
        assert "gateway=ok routed=no spoofed=no" in console(h2, "intruder")
        # From outside: the parent on any port, a clone on 8080 only.
        outside = f"{bed.tag}-o"
        bed._attach("o", f"{bed.subnet}.99")
        routers = {h.netns: d.address for h, d in zip(cluster.hosts, bed.hosts, strict=True)}
        for k in (0, 1, 2):
            via = routers[h1.netns if mode == "central" or k == 0 else where[k]]
            member = identity(1, k).ip.split("/")[0]
            subprocess.run(["ip", "-n", outside, "route", "add", member, "via", via],
                           check=True, timeout=30)  # fmt: skip
        assert connect(outside, "10.0.16.2", 9090) == "snowflock"
        for k in (1, 2):
            assert connect(outside, f"10.0.16.{2 + k}", 8080) == f"fam-{k}"
            assert connect(outside, f"10.0.16.{2 + k}", 9090) == "ConnectionRefusedError"
        for h in (h2, h3):
            for vm in h.vm_json("ls"):
                if vm["clone_id"] is not None:
                    h.xenstore("xenstore-write", f"/local/domain/{vm['domid']}/go", "1")
        console(h1, "fam")

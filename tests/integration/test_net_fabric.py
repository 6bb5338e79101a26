"""Family networks across hosts, with real packets (no VMs): two namespace hosts on
an underlay, each with a family's bridge joined by VXLAN; "guests" are namespaces
on veths attached to the bridges, addressed as sflib.net.identity says."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib import run
from sflib.cluster.testbed import Testbed
from sflib.net import dhcp, fabric
from sflib.net.identity import identity, mac

pytestmark = pytest.mark.slow

DHCP_READY_WAIT = 30.0  # seconds for dnsmasq to start on a loaded machine


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    work = Path(tempfile.mkdtemp(prefix="sfn-", dir="/tmp"))
    try:
        with Testbed.create(work, hosts=2, daemons=False) as testbed:
            yield testbed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def guest(bed: Testbed, host: int, family: int, clone_id: int, net: fabric.FamilyFabric,
          address: bool = True) -> str:  # fmt: skip
    """A namespace standing in for a VM on host: a veth on the family's bridge, with
    the member's MAC and (unless it is to ask DHCP) its address."""
    ns, h = f"{bed.tag}-g{host}f{family}i{clone_id}", bed.hosts[host]
    me = identity(family, clone_id)
    ip("netns", "add", ns)
    bed.namespaces.append(ns)  # removed with the test bed
    tap = fabric.tap_name(family, clone_id)
    ip("-n", h.netns, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns)
    asyncio.run(net.attach(tap))
    ip("-n", ns, "link", "set", "eth0", "address", me.mac)
    if address:
        ip("-n", ns, "addr", "add", me.ip, "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    return ns


def pings(ns: str, address: str) -> bool:
    out = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "1", "-q",
                          address], capture_output=True, timeout=30, check=False)  # fmt: skip
    return out.returncode == 0


def test_a_family_spans_hosts_and_families_are_apart(bed: Testbed) -> None:
    h1, h2 = bed.hosts
    nets = {}
    for family in (7, 8):
        for host, peer in ((h1, h2), (h2, h1)):
            net = fabric.FamilyFabric(family, host.address, host.netns)
            asyncio.run(net.create())
            asyncio.run(net.join(peer.address))
            nets[family, host.name] = net
    parent7 = guest(bed, 0, 7, 0, nets[7, "h1"])
    clone7 = guest(bed, 1, 7, 1, nets[7, "h2"])
    clone8 = guest(bed, 1, 8, 1, nets[8, "h2"])
    parent_ip = identity(7, 0).ip.split("/")[0]
    assert pings(clone7, parent_ip)  # across hosts, over VXLAN
    assert pings(parent7, identity(7, 1).ip.split("/")[0])
    assert not pings(clone8, parent_ip)  # another family: no way
    # A member that takes a MAC outside its family's range is cut off on its own host.
    before = asyncio.run(nets[7, "h2"].dropped())  # (the host bridge's own IPv6 chatter, kept in)
    ip("-n", clone7, "link", "set", "eth0", "address", mac(8, 5))
    ip("-n", clone7, "neigh", "flush", "all")
    assert not pings(clone7, parent_ip)
    assert asyncio.run(nets[7, "h2"].dropped()) > before
    ip("-n", clone7, "link", "set", "eth0", "address", mac(7, 1))  # itself again
    assert pings(clone7, parent_ip)
    assert asyncio.run(fabric.leftovers(h1.netns)) == [7, 8]
    assert asyncio.run(fabric.remove_leftovers(h1.address, h1.netns)) == [7, 8]
    for net in nets.values():
        asyncio.run(net.destroy())
    for host in (h1, h2):
        assert asyncio.run(fabric.leftovers(host.netns)) == []
    out = subprocess.run(["ip", "-n", h1.netns, "-j", "link", "show", fabric.tap_name(7, 0)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert '"master"' not in out.stdout  # a VM's tap stays its own, off any bridge


def dhcp_lease(ns: str) -> str | None:
    """The address busybox's DHCP client is offered and acknowledged on eth0, none
    refused on the way."""
    # timeout(1): a client refused again and again keeps trying; we want what it said.
    out = subprocess.run(["timeout", "30", "ip", "netns", "exec", ns, "busybox", "udhcpc",
                          "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "3", "-s", "/bin/true"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    said = out.stdout + out.stderr
    assert "received DHCP NAK" not in said, f"a DHCP server refused {ns}:\n{said}"
    match = re.search(r"lease of ([\d.]+) obtained", said)
    return match.group(1) if match else None


def wait_dhcp_ready(server: subprocess.Popen[bytes], log: Path, hosts: Path) -> None:
    """Until dnsmasq has read its hosts file, which it does once its socket is bound
    (sflib.net.service watches for the same line)."""
    deadline = time.monotonic() + DHCP_READY_WAIT
    while f"read {hosts}" not in log.read_text(errors="replace"):
        assert server.poll() is None, f"dnsmasq exited {server.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"dnsmasq not ready:\n{log.read_text()}"
        time.sleep(0.02)


# A member's DHCPREQUEST crosses the VXLAN, and the other host's dnsmasq (authoritative,
# no lease for that MAC) answers DHCPNAK from its bridge; whichever answer came first
# won. The isolation table's output chain keeps a bridge's own frames home.
def test_each_host_leases_its_own_members_their_ids_address(bed: Testbed) -> None:
    work = bed.workdir / "dhcp"  # removed with the test bed's
    work.mkdir()
    servers = []
    try:
        members = {0: (0,), 1: (1, 2)}  # host index: the member IDs it runs
        for i, host in enumerate(bed.hosts):
            net = fabric.FamilyFabric(7, host.address, host.netns)
            asyncio.run(net.create())
            asyncio.run(net.join(bed.hosts[1 - i].address))
            hosts = work / f"h{i}.hosts"
            hosts.write_text(dhcp.hosts_file(7, list(members[i])))
            argv = dhcp.dnsmasq_argv(7, hosts, work / f"h{i}.leases")
            with (work / f"h{i}.log").open("wb") as log:
                servers.append(subprocess.Popen([*run.in_netns(host.netns), *argv],
                                                stdout=log, stderr=log))  # fmt: skip
            for k in members[i]:
                guest(bed, i, 7, k, net, address=False)
        for i, server in enumerate(servers):
            wait_dhcp_ready(server, work / f"h{i}.log", work / f"h{i}.hosts")
        clone = f"{bed.tag}-g1f7i2"
        assert dhcp_lease(clone) == identity(7, 2).ip.split("/")[0]
        assert dhcp_lease(clone) == identity(7, 2).ip.split("/")[0]  # a renewal: the same
        assert dhcp_lease(f"{bed.tag}-g0f7i0") == identity(7, 0).ip.split("/")[0]
        clone_mac = identity(7, 2).mac
        assert clone_mac in (work / "h1.log").read_text()  # its own host answered...
        assert "DHCPACK" not in "".join(
            line for line in (work / "h0.log").read_text().splitlines() if clone_mac in line
        )  # ...only it
    finally:
        for server in servers:
            run.stop(server, timeout=10)

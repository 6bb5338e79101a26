"""Family networks across hosts, with real packets (no VMs): two namespace hosts on
an underlay, each with a family's bridge joined by VXLAN; "guests" are namespaces
on veths attached to the bridges, addressed as sflib.net.identity says."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib.cluster.testbed import Testbed
from sflib.net import fabric
from sflib.net.identity import identity, mac

pytestmark = pytest.mark.slow


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    work = Path(tempfile.mkdtemp(prefix="sfn-", dir="/tmp"))
    with Testbed.create(work, hosts=2, daemons=False) as testbed:
        yield testbed
    subprocess.run(["rm", "-rf", str(work)], check=True)


def guest(bed: Testbed, host: int, family: int, clone_id: int, net: fabric.FamilyFabric) -> str:
    """A namespace standing in for a VM on host: a veth on the family's bridge."""
    ns, h = f"{bed.tag}-g{host}f{family}i{clone_id}", bed.hosts[host]
    me = identity(family, clone_id)
    ip("netns", "add", ns)
    bed.namespaces.append(ns)  # removed with the test bed
    tap = fabric.tap_name(family, clone_id)
    ip("-n", h.netns, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns)
    net.attach(tap)
    ip("-n", ns, "link", "set", "eth0", "address", me.mac)
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
            net.create()
            net.join(peer.address)
            nets[family, host.name] = net
    parent7 = guest(bed, 0, 7, 0, nets[7, "h1"])
    clone7 = guest(bed, 1, 7, 1, nets[7, "h2"])
    clone8 = guest(bed, 1, 8, 1, nets[8, "h2"])
    parent_ip = identity(7, 0).ip.split("/")[0]
    assert pings(clone7, parent_ip)  # across hosts, over VXLAN
    assert pings(parent7, identity(7, 1).ip.split("/")[0])
    assert not pings(clone8, parent_ip)  # another family: no way
    # A member that takes a MAC outside its family's range is cut off on its own host.
    before = nets[7, "h2"].dropped()  # (the host bridge's own IPv6 chatter, kept in)
    ip("-n", clone7, "link", "set", "eth0", "address", mac(8, 5))
    ip("-n", clone7, "neigh", "flush", "all")
    assert not pings(clone7, parent_ip)
    assert nets[7, "h2"].dropped() > before
    ip("-n", clone7, "link", "set", "eth0", "address", mac(7, 1))  # itself again
    assert pings(clone7, parent_ip)
    assert fabric.leftovers(h1.netns) == [7, 8]
    assert fabric.remove_leftovers(h1.address, h1.netns) == [7, 8]
    for net in nets.values():
        net.destroy()
    for host in (h1, h2):
        assert fabric.leftovers(host.netns) == []
    out = subprocess.run(["ip", "-n", h1.netns, "-j", "link", "show", fabric.tap_name(7, 0)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert '"master"' not in out.stdout  # a VM's tap stays its own, off any bridge

"""Family routers with real packets (no VMs), in both modes: two namespace hosts with
family 7 (parent and clone 2 on h1, clone 1 on h2) and family 8 (one member on h1);
an "outside" namespace on the underlay routes the families' subnets to the hosts.
Guests are namespaces on veths attached to the bridges; TCP clients and servers are
small Python programs run inside the namespaces."""

from __future__ import annotations

import asyncio
import json
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sflib import run
from sflib.cluster.testbed import Testbed
from sflib.net import fabric, router
from sflib.net.identity import identity, subnet

pytestmark = pytest.mark.slow

RATE_MBIT = 8
ALLOWED, NOT_ALLOWED, ANY = 22, 2222, 4242  # ports: open on clones, not open, the parent's
OUT_PORT = 9000  # the outside's server
HOST_PORT = 7100  # a host's own service, like sfld's peer port
SIZE = 2_000_000  # bytes: 2 s at RATE_MBIT
INSIDE_SIZE = 8_000_000  # bytes: 8 s at RATE_MBIT, well under 1 s unlimited
BYTES_PER_S = RATE_MBIT * 1_000_000 // 8
CONNECT_WAIT = 30.0  # seconds for a connection that must be made (a loaded machine)
BLOCKED_WAIT = 1.0  # seconds for one that must not: a dropped SYN, never sent again
READY_WAIT = 60.0  # seconds for a server to listen

# Serves each port given: a line "who" is answered with the client's address, a line
# "sink" followed by data with the number of bytes received.
SERVER = r"""
import socket, sys, threading
def serve(conn, peer):
    with conn, conn.makefile("rb") as f:
        if f.readline().strip() == b"who":
            conn.sendall(peer[0].encode() + b"\n")
            return
        n = 0
        while chunk := f.read1(65536):
            n += len(chunk)
        conn.sendall(b"%d\n" % n)
def accept(s):
    while True:
        conn, peer = s.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
listening = [socket.create_server(("0.0.0.0", int(p))) for p in sys.argv[1:]]
for s in listening:
    threading.Thread(target=accept, args=(s,), daemon=True).start()
print("ready", flush=True)  # every port listens: a connection now waits to be accepted
threading.Event().wait()
"""

# Connects to argv[1]:argv[2] within argv[4] seconds and sends "who", or "sink" and
# argv[3] bytes; prints {"reply": ..., "seconds": ...} or {"error": errno name,
# "seconds": ..., "syn_retransmits": ...}, the SYNs its namespace sent again meanwhile.
CLIENT = r"""
import errno, json, socket, sys, time
host, port, size, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def syn_retransmits():
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f]
    for names, values in zip(lines[::2], lines[1::2]):
        if names[0] == "TcpExt:":
            return int(values[names.index("TCPSynRetrans")])
syns = syn_retransmits()
start = time.monotonic()
try:
    with socket.create_connection((host, port), timeout=wait) as s:
        s.settimeout(30)
        start = time.monotonic()
        if size:
            s.sendall(b"sink\n")
            s.sendall(bytes(size))
        else:
            s.sendall(b"who\n")
        s.shutdown(socket.SHUT_WR)
        reply = s.makefile().readline().strip()
    print(json.dumps({"reply": reply, "seconds": time.monotonic() - start}))
except OSError as e:
    name = errno.errorcode.get(e.errno or 0, "timeout")
    print(json.dumps({"error": name, "seconds": time.monotonic() - start,
                      "syn_retransmits": syn_retransmits() - syns}))
"""


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


def address(family: int, clone_id: int) -> str:
    return identity(family, clone_id).ip.split("/")[0]


@dataclass
class Families:
    bed: Testbed
    mode: str
    outside: str  # the outside's namespace
    outside_ip: str
    guests: dict[tuple[int, int], str]  # (family, ID): namespace
    routers: list[router.FamilyRouter] = field(default_factory=list)
    servers: list[subprocess.Popen[str]] = field(default_factory=list)

    def serve(self, ns: str, *ports: int) -> None:
        """A server listening on ports in ns, until the test ends."""
        proc = subprocess.Popen([*run.in_netns(ns), sys.executable, "-c", SERVER,
                                 *map(str, ports)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.servers.append(proc)
        assert proc.stdout is not None
        readable, _, _ = select.select([proc.stdout], [], [], READY_WAIT)
        assert readable and proc.stdout.readline() == "ready\n", f"no server on {ports} in {ns}"

    def connect(self, ns: str, host: str, port: int, size: int = 0,
                wait: float = CONNECT_WAIT) -> dict[str, object]:  # fmt: skip
        out = subprocess.run([*run.in_netns(ns), sys.executable, "-c", CLIENT, host, str(port),
                              str(size), str(wait)], capture_output=True, text=True,
                             timeout=wait + 120, check=True)  # fmt: skip
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def blocked(self, ns: str, host: str, port: int) -> bool:
        """Whether a connection from ns to host:port gets no reply."""
        return "reply" not in self.connect(ns, host, port, wait=BLOCKED_WAIT)

    def guest(self, family: int, clone_id: int) -> str:
        return self.guests[family, clone_id]


def guest(bed: Testbed, host: int, family: int, clone_id: int, net: fabric.FamilyFabric,
          central: bool) -> str:  # fmt: skip
    """A namespace standing in for a VM on host: a veth on the family's bridge, with
    the member's MAC, address and gateway."""
    ns, h = f"{bed.tag}-g{host}f{family}i{clone_id}", bed.hosts[host]
    me = identity(family, clone_id, central=central)
    ip("netns", "add", ns)
    bed.namespaces.append(ns)  # removed with the test bed
    tap = fabric.tap_name(family, clone_id)
    ip("-n", h.netns, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", ns)
    asyncio.run(net.attach(tap))
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "set", "eth0", "address", me.mac)
    ip("-n", ns, "addr", "add", me.ip, "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", ns, "route", "add", "default", "via", me.gateway)
    return ns


def outside(bed: Testbed, routes: dict[str, str]) -> tuple[str, str]:
    """A client on the underlay, outside every family, with routes (destination:
    the host's address) to the families' members."""
    ns, address = f"{bed.tag}-o", f"{bed.subnet}.100"
    ip("netns", "add", ns)
    bed.namespaces.append(ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "po",
       "netns", f"{bed.tag}-u")  # fmt: skip
    ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up")
    ip("-n", f"{bed.tag}-u", "link", "set", "po", "master", "br0", "up")
    for destination, via in routes.items():
        ip("-n", ns, "route", "add", destination, "via", via)
    return ns, address


def make_routers(bed: Testbed, policy: router.RouterPolicy) -> list[router.FamilyRouter]:
    h1, h2 = (h.netns for h in bed.hosts)
    routers = [
        router.FamilyRouter(7, policy, h1),
        router.FamilyRouter(8, policy, h1),
        router.FamilyRouter(7, policy, h2, router_here=policy.mode == "distributed"),
    ]
    for r in routers:
        asyncio.run(r.create())
    return routers


MODES = ["central", "distributed"]
# br_netfilter passes bridged frames through the inet hooks too, which the rules must
# allow for: MODES run with it on, PLAIN on hosts without it.
PLAIN = ["central-no-br_netfilter", "distributed-no-br_netfilter"]
BR_NETFILTER = "net.bridge.bridge-nf-call-iptables"


def br_netfilter_missing() -> str | None:
    """Why bridged frames cannot reach the inet hooks here, or None if they can
    (br_netfilter loaded if it was not)."""
    key = Path("/proc/sys", *BR_NETFILTER.split("."))
    if not key.exists() and shutil.which("modprobe"):
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, timeout=30,
                       check=False)  # fmt: skip
    if key.exists():
        return None
    how = "modprobe br_netfilter failed" if shutil.which("modprobe") else "no modprobe"
    return f"br_netfilter is not loaded ({key} is missing) and {how}"


def set_br_netfilter(netns: str, on: bool) -> None:
    """Bridged frames through the inet hooks in netns, or not; checked."""
    sysctl = [*run.in_netns(netns), "sysctl"]
    subprocess.run([*sysctl, "-q", "-w", f"{BR_NETFILTER}={int(on)}"], timeout=30, check=True)
    out = subprocess.run([*sysctl, "-n", BR_NETFILTER], capture_output=True, text=True,
                         timeout=30, check=True)  # fmt: skip
    assert out.stdout.strip() == str(int(on)), f"{BR_NETFILTER} in {netns}: {out.stdout}"


@pytest.fixture
def families(request: pytest.FixtureRequest) -> Iterator[Families]:
    """The families' networks and routers; request.param: the mode, "-no-br_netfilter"
    appended for hosts with br_netfilter off."""
    mode, _, plain = str(request.param).partition("-")
    central = mode == "central"
    missing = br_netfilter_missing()
    if missing and not plain:
        pytest.skip(f"with br_netfilter: {missing}")
    work = Path(tempfile.mkdtemp(prefix="sfr-", dir="/tmp"))
    try:
        with Testbed.create(work, hosts=2, daemons=False) as bed:
            for host in bed.hosts if missing is None else ():  # else: plain already
                set_br_netfilter(host.netns, on=not plain)
            yield from _families(bed, mode, central)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _families(bed: Testbed, mode: str, central: bool) -> Iterator[Families]:
    h1, h2 = bed.hosts
    nets: dict[tuple[int, str], fabric.FamilyFabric] = {}
    state: Families | None = None
    try:
        for family, hosts in ((7, (h1, h2)), (8, (h1,))):
            for host in hosts:
                nets[family, host.name] = net = fabric.FamilyFabric(family, host.address,
                                                                    host.netns)  # fmt: skip
                asyncio.run(net.create())
                for peer in hosts:
                    asyncio.run(net.join(peer.address))
        guests = {(7, 0): guest(bed, 0, 7, 0, nets[7, "h1"], central),
                  (7, 2): guest(bed, 0, 7, 2, nets[7, "h1"], central),
                  (7, 1): guest(bed, 1, 7, 1, nets[7, "h2"], central),
                  (8, 0): guest(bed, 0, 8, 0, nets[8, "h1"], central)}  # fmt: skip
        # Central: the parent's host takes everything; distributed: each member's host.
        routes = {str(subnet(7)): h1.address, str(subnet(8)): h1.address}
        if not central:
            routes[address(7, 1)] = h2.address
        ns, outside_ip = outside(bed, routes)
        state = Families(bed, mode, ns, outside_ip, guests)
        policy = router.RouterPolicy(mode, inbound_ports=(ALLOWED,), rate_mbit=RATE_MBIT)
        state.routers = make_routers(bed, policy)
        yield state
    finally:
        for proc in state.servers if state else []:
            proc.kill()
            proc.wait()
        for host in bed.hosts:  # the router namespaces outlive the test bed's
            asyncio.run(router.remove_leftovers(host.netns))
        for net in nets.values():
            asyncio.run(net.destroy())


@pytest.mark.parametrize("families", MODES + PLAIN, indirect=True)
def test_members_go_out_through_nat_and_only_the_allowed_comes_in(families: Families) -> None:
    f, (h1, h2) = families, families.bed.hosts
    parent, clone, stranger = f.guest(7, 0), f.guest(7, 1), f.guest(8, 0)
    f.serve(f.outside, OUT_PORT)
    f.serve(parent, ANY)
    f.serve(clone, ALLOWED, NOT_ALLOWED)
    # Out: the outside sees a host's address, not a member's.
    assert f.connect(parent, f.outside_ip, OUT_PORT)["reply"] == h1.address
    clones_host = h1 if f.mode == "central" else h2  # central: through the parent's host
    assert f.connect(clone, f.outside_ip, OUT_PORT)["reply"] == clones_host.address
    assert f.connect(stranger, f.outside_ip, OUT_PORT)["reply"] == h1.address
    # In: the parent on any port, a clone on an allowed port; members see the client.
    assert f.connect(f.outside, address(7, 0), ANY)["reply"] == f.outside_ip
    assert f.connect(f.outside, address(7, 1), ALLOWED)["reply"] == f.outside_ip
    refused = f.connect(f.outside, address(7, 1), NOT_ALLOWED)
    assert refused["error"] == "ECONNREFUSED"  # though the clone listens there
    assert refused["syn_retransmits"] == 0  # at once: the first SYN was answered
    ping = subprocess.run([*run.in_netns(f.outside), "ping", "-c", "1", "-W", "2", address(7, 1)],
                          capture_output=True, timeout=30, check=False)  # fmt: skip
    assert ping.returncode == 0  # echo requests are let in
    # Another family's member on the same host gets nowhere, not even to the parent.
    assert f.blocked(stranger, address(7, 0), ANY)
    assert f.blocked(stranger, address(7, 1), ALLOWED)
    # The host's own services (sfld's peers, the memory server) are closed to members.
    f.serve(h1.netns, HOST_PORT)
    bridge_ip = str(subnet(7).network_address + 1)
    assert f.blocked(parent, bridge_ip, HOST_PORT)
    assert "reply" in f.connect(f.outside, h1.address, HOST_PORT)  # it does listen
    if f.mode == "central":  # a member that takes its host's bridge for a gateway
        ip("-n", parent, "route", "replace", "default", "via", identity(7, 0).gateway)
        assert f.blocked(parent, f.outside_ip, OUT_PORT)


@pytest.mark.parametrize("families", MODES, indirect=True)
def test_the_outside_is_limited_each_way_and_the_family_inside_not(families: Families) -> None:
    f = families
    parent, sibling, clone = f.guest(7, 0), f.guest(7, 2), f.guest(7, 1)
    f.serve(f.outside, OUT_PORT)
    f.serve(parent, ANY)
    least = SIZE / BYTES_PER_S * 0.7  # seconds, with a margin
    # Distributed, the way out is policed by nftables, whose bucket holds a second's
    # worth (and a burst) to begin with.
    least_out = least if f.mode == "central" else (SIZE - BYTES_PER_S * 1.2) / BYTES_PER_S * 0.7
    for client, server, port, at_least in ((parent, f.outside_ip, OUT_PORT, least_out),
                                           (f.outside, address(7, 0), ANY, least)):  # fmt: skip
        result = f.connect(client, server, port, SIZE)
        assert result["reply"] == str(SIZE)
        seconds = result["seconds"]
        # At most: the limit's time four times over (it limits, it does not starve).
        at_most = 4 * SIZE / BYTES_PER_S
        assert isinstance(seconds, float) and at_least < seconds < at_most, (client, seconds)
    for member in (sibling, clone):  # on the parent's host, and across the VXLAN
        result = f.connect(member, address(7, 0), ANY, INSIDE_SIZE)
        assert result["reply"] == str(INSIDE_SIZE)
        seconds = result["seconds"]
        # Unlimited: three times the limit's rate at the very least, loaded or not.
        assert isinstance(seconds, float), result
        assert INSIDE_SIZE / seconds > 3 * BYTES_PER_S, (member, seconds)


def qdiscs(netns: str, dev: str) -> set[str]:
    out = subprocess.run(["tc", "-n", netns, "-j", "qdisc", "show", "dev", dev],
                         capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return {q["kind"] for q in json.loads(out.stdout)}


@pytest.mark.parametrize("families", MODES, indirect=True)
def test_nothing_is_left_after_destroy_or_a_crash(families: Families) -> None:
    h1, h2 = (h.netns for h in families.bed.hosts)
    expected = {h1: [7, 8], h2: [7]}
    for netns, found in expected.items():
        assert asyncio.run(router.leftovers(netns)) == found
    for r in families.routers:
        asyncio.run(r.destroy())
    for netns in expected:
        assert asyncio.run(router.leftovers(netns)) == []
        assert qdiscs(netns, fabric.bridge_name(7)) == {"noqueue"}
    assert not {router.namespace_name(f, h) for f in (7, 8) for h in expected} & set(
        asyncio.run(router.namespaces())
    )
    # A crash: the routers are made again, and forgotten.
    make_routers(families.bed, families.routers[0].policy)
    for netns, found in expected.items():
        assert asyncio.run(router.remove_leftovers(netns)) == found
        assert asyncio.run(router.leftovers(netns)) == []
    # The families' networks are not the router's.
    assert asyncio.run(fabric.leftovers(h1)) == [7, 8]

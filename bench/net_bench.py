"""Family network benchmark: TCP throughput and ping latency between two members on
different hosts, over a family network (sflib.net.fabric: a bridge per host, VXLAN
between them, and the nftables isolation table) and, side by side in the same run,
over the same topology built with plain ip/bridge commands and no nftables table at
all (the baseline).

    .venv/bin/python bench/net_bench.py [--rounds N] [--seconds S] [--json]

Hosts are network namespaces on one underlay bridge (sflib.cluster.testbed), members
are namespaces on veths standing in for clones. The family network gets hosts h1 and
h2, the baseline h3 and h4: a bridge-family nftables table filters every bridge of
its namespace, so the baseline would pay for the family's rules on a host of its own.
Each round measures both networks, alternating which goes first, and each figure is
the median over the rounds.

How to read it: everything runs on this machine's CPUs, so the figures are the
kernel's work per packet here, not a wire's. The ratio column (family / plain) is
what our filtering costs: below 1 for throughput, above 1 for latency. Ping times
are printed to the µs, so a difference of a µs or two in p50 is the resolution.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from sflib import run
from sflib.cluster.testbed import Testbed, TestHost
from sflib.errors import OperationTimeout, SnowFlockError, SystemFailure
from sflib.net import fabric, identity

FAMILY = 7
# The baseline's addresses and MACs are another family's, its devices named so that
# nothing takes them for sfld's own (sfb*, sfx*, sft*).
PLAIN_FAMILY = 9
PLAIN_BRIDGE, PLAIN_VXLAN = "nbbr", "nbvx"
# The underlay's 1500 less VXLAN's 50 bytes, as a VM would need on a real underlay:
# the bridge drops a frame bigger than its VXLAN port's MTU. (Between veths a member
# at 1500 gets by, its big segments travelling whole as GSO, but it retransmits.)
MEMBER_MTU = 1450
IPERF_PORT = 5201
# Back to back enough that the CPUs stay awake: at 10 ms apart a ping's RTT here is
# ~95 µs of waking up, against ~18 µs of path, and the path's cost drowns in it.
PINGS, PING_INTERVAL = 1000, 0.002


@dataclass
class Pair:
    """Two members of one network, on different hosts."""

    name: str
    client: str  # the sender's namespace
    server: str  # the receiver's namespace
    server_ip: str


def nsenter(netns: str, *argv: str) -> list[str]:
    return [*run.in_netns(netns), *argv]


def member(bed: Testbed, host: TestHost, name: str, tap: str, me: identity.Identity,
           attach: Callable[[str], None]) -> str:  # fmt: skip
    """A namespace standing in for a clone on host: a veth whose host end (tap) is
    attached to the network, the other end with the member's MAC and address."""
    ns = f"{bed.tag}-{name}"
    run.run(["ip", "netns", "add", ns])
    bed.namespaces.append(ns)  # deleted with the test bed
    run.run(["ip", "-n", host.netns, "link", "add", tap, "type", "veth", "peer", "name",
             "eth0", "netns", ns])  # fmt: skip
    attach(tap)
    run.run(["ip", "-n", ns, "link", "set", "eth0", "address", me.mac, "mtu", str(MEMBER_MTU)])
    run.run(["ip", "-n", ns, "addr", "add", me.ip, "dev", "eth0"])
    run.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run.run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


def family_network(bed: Testbed) -> Pair:
    """Clones 1 and 2 of FAMILY, on h1 and h2, over sflib.net.fabric."""
    h1, h2 = bed.hosts[:2]
    members = []
    for k, (host, peer) in enumerate(((h1, h2), (h2, h1)), start=1):
        net = fabric.FamilyFabric(FAMILY, host.address, host.netns)
        asyncio.run(net.create())
        asyncio.run(net.join(peer.address))

        def attach(tap: str, net: fabric.FamilyFabric = net) -> None:
            asyncio.run(net.attach(tap))

        members.append(member(bed, host, f"f{k}", fabric.tap_name(FAMILY, k),
                              identity.identity(FAMILY, k), attach))  # fmt: skip
    return Pair("family", members[0], members[1], address(identity.identity(FAMILY, 2)))


def plain_network(bed: Testbed) -> Pair:
    """The same topology on h3 and h4 with ip and bridge alone: no nftables."""
    h3, h4 = bed.hosts[2:4]
    gateway = f"{identity.subnet(PLAIN_FAMILY).network_address + 1}/{identity.PREFIX}"
    members = []
    for k, (host, peer) in enumerate(((h3, h4), (h4, h3)), start=1):
        ns = host.netns
        run.run(["ip", "-n", ns, "link", "add", PLAIN_BRIDGE, "type", "bridge"])
        run.run(["ip", "-n", ns, "link", "add", PLAIN_VXLAN, "type", "vxlan", "id",
                 str(identity.vni(PLAIN_FAMILY)), "local", host.address, "dstport",
                 str(fabric.VXLAN_PORT), "nolearning"])  # fmt: skip
        run.run(["ip", "-n", ns, "link", "set", PLAIN_VXLAN, "master", PLAIN_BRIDGE, "up"])
        run.run(["ip", "-n", ns, "link", "set", PLAIN_BRIDGE, "up"])
        run.run(["ip", "-n", ns, "addr", "add", gateway, "dev", PLAIN_BRIDGE])
        run.run(["bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", PLAIN_VXLAN,
                 "dst", peer.address])  # fmt: skip

        def attach(tap: str, ns: str = ns) -> None:
            run.run(["ip", "-n", ns, "link", "set", tap, "master", PLAIN_BRIDGE, "up"])

        members.append(member(bed, host, f"p{k}", f"nbt-{k}",
                              identity.identity(PLAIN_FAMILY, k), attach))  # fmt: skip
    return Pair("plain", members[0], members[1], address(identity.identity(PLAIN_FAMILY, 2)))


def address(me: identity.Identity) -> str:
    return me.ip.split("/")[0]


@contextmanager
def iperf_servers(pairs: list[Pair]) -> Iterator[None]:
    """An iperf3 server in each pair's receiver, until the end of the block."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for pair in pairs:
            # Not run.spawn (asyncio, for daemons): a plain child, killed with us.
            procs.append(subprocess.Popen(
                nsenter(pair.server, "iperf3", "--server", "--bind", pair.server_ip,
                        "--port", str(IPERF_PORT)),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=run.die_with_parent,  # noqa: PLW1509 (no threads fork here)
            ))  # fmt: skip
            listening(pair.server, procs[-1])
        yield
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=run.KILL_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def listening(netns: str, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Wait for the iperf3 server in netns to listen. Raises SystemFailure,
    OperationTimeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemFailure(f"iperf3 server in {netns} exited with status {proc.returncode}",
                                hint="make deps installs iperf3")  # fmt: skip
        out = run.run(nsenter(netns, "ss", "-Htln", f"sport = :{IPERF_PORT}"), timeout=10)
        if out.stdout.strip():
            return
        time.sleep(0.05)
    raise OperationTimeout(f"iperf3 server in {netns} not listening within {timeout:g} s")


def check_reachable(pair: Pair) -> None:
    """Ping across once (which also fills the ARP caches). Raises SystemFailure."""
    out = run.run(nsenter(pair.client, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q",
                          pair.server_ip), timeout=30, check=False)  # fmt: skip
    if out.returncode != 0:
        raise SystemFailure(f"{pair.name}: {pair.server_ip} unreachable from {pair.client}")


def throughput(pair: Pair, seconds: int) -> dict[str, float]:
    """TCP from client to server for seconds, after a second left out (slow start)."""
    out = run.run(nsenter(pair.client, "iperf3", "--client", pair.server_ip, "--port",
                          str(IPERF_PORT), "--time", str(seconds), "--omit", "1", "--json"),
                  timeout=seconds + 30)  # fmt: skip
    end = json.loads(out.stdout)["end"]
    return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": end["sum_sent"].get("retransmits", 0)}  # fmt: skip


def latency(pair: Pair) -> dict[str, float]:
    """PINGS echo requests PING_INTERVAL apart; their RTTs in µs."""
    out = run.run(nsenter(pair.client, "ping", "-n", "-c", str(PINGS), "-i", str(PING_INTERVAL),
                          "-W", "1", pair.server_ip), timeout=60)  # fmt: skip
    rtts = sorted(float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms", out.stdout))
    if len(rtts) < PINGS * 0.99:
        raise SystemFailure(f"{pair.name}: {PINGS - len(rtts)} of {PINGS} pings lost")
    return {"rtt_p50_us": statistics.median(rtts), "rtt_mean_us": statistics.fmean(rtts),
            "rtt_p99_us": rtts[int(len(rtts) * 0.99) - 1]}  # fmt: skip


def measure(pairs: list[Pair], rounds: int, seconds: int) -> dict[str, list[dict[str, float]]]:
    """Each pair's figures per round, the pairs taking turns to go first."""
    samples: dict[str, list[dict[str, float]]] = {p.name: [] for p in pairs}
    for i in range(rounds):
        for pair in pairs if i % 2 == 0 else pairs[::-1]:
            samples[pair.name].append(throughput(pair, seconds) | latency(pair))
    return samples


METRICS = (  # key, label, format
    ("gbit_s", "TCP throughput (Gbit/s)", "{:.2f}"),
    ("rtt_p50_us", "ping RTT p50 (µs)", "{:.0f}"),
    ("rtt_mean_us", "ping RTT mean (µs)", "{:.0f}"),
    ("rtt_p99_us", "ping RTT p99 (µs)", "{:.0f}"),
)  # and the retransmits, in --json only: a handful of rounds see bursts of them, others none


def medians(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for name, runs in samples.items()}  # fmt: skip


def print_table(result: dict[str, dict[str, float]], rounds: int, seconds: int) -> None:
    fam, plain = result["family"], result["plain"]
    print(f"Two members on different hosts, median of {rounds} rounds (iperf3 {seconds} s, "
          f"{PINGS} pings every {PING_INTERVAL * 1000:g} ms):\n")  # fmt: skip
    rows = [("metric", "family network", "plain namespaces", "ratio (family/plain)")]
    for key, label, fmt in METRICS:
        ratio = f"{fam[key] / plain[key]:.2f}" if plain[key] else "-"
        rows.append((label, fmt.format(fam[key]), fmt.format(plain[key]), ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    rule = ("-" * widths[0], *("-" * (w - 1) + ":" for w in widths[1:]))  # numbers: right
    for row in [rows[0], rule, *rows[1:]]:
        cells = [c.rjust(w) if i else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]  # fmt: skip
        print(f"| {' | '.join(cells)} |")


def bench(rounds: int, seconds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sfnb-", dir="/tmp"))
    try:
        with Testbed.create(work, hosts=4, daemons=False) as bed:
            pairs = [family_network(bed), plain_network(bed)]
            for pair in pairs:
                check_reachable(pair)
            with iperf_servers(pairs):
                samples = measure(pairs, rounds, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rounds": samples, "median": medians(samples)}


def terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds, so the test bed is removed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring both")
    parser.add_argument("--seconds", type=int, default=3, help="seconds of each iperf3 run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, terminated)
    try:
        result = bench(args.rounds, args.seconds)
    except SnowFlockError as e:
        print(f"net_bench: error: {e}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:  # everything is removed by then
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result["median"], args.rounds, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

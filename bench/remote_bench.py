"""Remote-clone benchmark, in a cluster of network-namespace hosts on this machine
(sflib.cluster.testbed), side by side in one run:

1. the demo job (POV-Ray renders a band per clone): pages and bytes each clone
   fetched, as a share of guest RAM, with and without the avoidance heuristic (one
   clone per host, so that each memtap serves exactly one clone);
2. clone latency: on the parent's host mapping the frozen image (the baseline), on
   the parent's host through memtap, and on another host;
3. N = 1, 2, 4, 8 clones over 3 hosts: latency until the last clone runs, and the
   pages fetched by all hosts.

    .venv/bin/python bench/remote_bench.py [--json] [--skip-demo]

Times are wall-clock under TCG here: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sflib.cluster.testbed import Testbed, TestHost
from sflib.image import build as image
from sflib.image.initramfs import default_compression
from sflib.paths import BUILD_DIR, PROJECT_ROOT, Paths

BIN = PROJECT_ROOT / "bin"
PAGE = 4096
REPEATS = 3

LATENCY = """
t=$(sf-ticket 1)
id=$(sf-clone "$t")
if [ "$id" != 0 ]; then sf-exit 0; fi
sf-join "$t" >/dev/null
echo SF-DONE
"""

SPREAD = """
t=$(sf-ticket {n})
id=$(sf-clone "$t")
if [ "$id" != 0 ]; then sha256sum /tmp/state >/dev/null; sf-exit 0; fi
sf-join "$t" >/dev/null
echo SF-DONE
"""


class Host:
    """The tools against one test host."""

    def __init__(self, daemon: TestHost) -> None:
        self.daemon = daemon
        self.env = {**os.environ, "SF_ROOTDIR": str(daemon.root)}

    def tool(self, *argv: str) -> Any:
        out = subprocess.run([str(BIN / argv[0]), *argv[1:], "--json"], env=self.env,
                             capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
        return json.loads(out.stdout)

    def run_job(self, name: str, script: str, memory: int, image_dir: Path | None = None) -> str:
        """Boot a parent that runs script; its console once it printed SF-DONE (or FARM done)."""
        b64 = base64.b64encode(script.encode()).decode()
        args = ["sf-vm", "run", "--name", name, "--memory", str(memory), "--wait-ready", "--append",
                f'sf.run="echo {b64} | base64 -d > /g.sh && sh /g.sh; sleep 100000"']  # fmt: skip
        if image_dir is not None:
            args += ["--image", str(image_dir)]
        self.tool(*args)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            text = subprocess.run([str(BIN / "sf-vm"), "logs", name], env=self.env, text=True,
                                  capture_output=True, timeout=60, check=False).stdout  # fmt: skip
            if re.search(r"^(SF-DONE|FARM done)", text, re.M):
                return text
            if re.search(r"^FARM ended", text, re.M):
                break
            time.sleep(1)
        raise SystemExit(f"{name} did not finish:\n{text[-3000:]}\n{self.daemon.log.read_text()}")

    def stop(self, name: str) -> None:
        subprocess.run([str(BIN / "sf-vm"), "stop", name], env=self.env, capture_output=True,
                       timeout=120, check=True)  # fmt: skip


@contextmanager
def cluster(hosts: int, *sfld_args: str) -> Iterator[list[Host]]:
    work = Path(tempfile.mkdtemp(prefix="sfb-", dir="/tmp"))
    args = ["--accel", "tcg", "--image-dir", str(image.default_out()), *sfld_args]
    try:
        with Testbed.create(work, hosts=hosts, sfld_args=args) as bed:
            yield [Host(h) for h in bed.hosts]
    finally:
        for i in range(1, hosts + 1):
            shutil.rmtree(Paths(work / f"h{i}").memory_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def fetched(hosts: list[Host]) -> list[dict[str, Any]]:
    """The last counters of every memtap mount the hosts have unmounted."""
    return [tap for h in hosts for tap in h.tool("sf-vm", "memory")["unmounted"]]


# 1. The demo job ------------------------------------------------------------------


def demo_job(avoidance: bool, memory: int) -> dict[str, Any]:
    from sflib.demo import farm_image  # builds the POV-Ray image once, then reuses it

    work = Path(tempfile.mkdtemp(prefix="sfb-img-", dir="/tmp"))
    try:
        image_dir = farm_image(work)
        with cluster(3) as (h1, h2, h3):
            env = "" if avoidance else "export SF_AVOIDANCE=0; "
            h1.run_job("farm", f"{env}SF_N=2 sh /demo/farm.sh", memory, image_dir)
            taps = fetched([h2, h3])
            ticket = h1.tool("sf-vm", "tickets")[0]
            h1.stop("farm")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pages = memory * 256
    per_clone = [t["pages_fetched"] for t in taps]
    return {"avoidance": avoidance, "memory_mib": memory, "clones": len(taps),
            "states": sorted(c["state"] for c in ticket["clones"].values()),
            "pages_fetched": per_clone, "share": [round(p / pages, 4) for p in per_clone],
            "pages_free": [t.get("pages_free", 0) for t in taps],
            "bytes_fetched": [t["bytes_fetched"] for t in taps],
            "requests": [t["requests"] for t in taps]}  # fmt: skip


# 2. Latency: same host, same host through memtap, other host -----------------------


def latency(where: str) -> dict[str, Any]:
    hosts, args = {"same host": (1, ()), "same host, memtap": (1, ("--clone-memory", "memtap")),
                   "other host": (2, ())}[where]  # fmt: skip
    with cluster(hosts, *args) as members:
        h1 = members[0]
        for i in range(REPEATS):  # a parent per clone: a parent's first fork is the fast one
            h1.run_job(f"lat{i}", LATENCY, 256)
            h1.stop(f"lat{i}")
        tickets = h1.tool("sf-vm", "tickets")
    ready = [c["ready_ms"] for t in tickets for c in t["clones"].values()]
    hosts_used = sorted({c["host"] or "h1" for t in tickets for c in t["clones"].values()})
    return {"where": where, "ready_ms": ready, "median_ms": statistics.median(ready),
            "pause_ms": statistics.median(t["pause_ms"] for t in tickets),
            "hosts": hosts_used}  # fmt: skip


# 3. N clones over 3 hosts -----------------------------------------------------------


def spread(n: int) -> dict[str, Any]:
    with cluster(3) as hosts:
        h1 = hosts[0]
        script = "dd if=/dev/urandom of=/tmp/state bs=1M count=8 2>/dev/null\n"
        h1.run_job("wide", script + SPREAD.format(n=n), 256)
        (ticket,) = h1.tool("sf-vm", "tickets")
        taps = fetched(hosts)
        h1.stop("wide")
    clones = ticket["clones"].values()
    return {"n": n, "placement": ticket["placement"],
            "last_ready_ms": max(c["ready_ms"] or 0 for c in clones),
            "states": sorted(c["state"] for c in clones),
            "pages_fetched": sum(t["pages_fetched"] for t in taps)}  # fmt: skip


# Output ------------------------------------------------------------------------------


def tables(results: dict[str, Any]) -> None:
    out = Console(width=140)
    if results["demo"]:
        t = Table(title="demo job (POV-Ray band per clone): memory each clone fetched")
        for c in ("avoidance", "RAM", "pages fetched / clone", "share of RAM", "free pages",
                  "MiB fetched", "requests", "clones"):  # fmt: skip
            t.add_column(c, justify="right")
        for r in results["demo"]:
            t.add_row("on" if r["avoidance"] else "off", f"{r['memory_mib']} MiB",
                      " ".join(map(str, r["pages_fetched"])),
                      " ".join(f"{s:.1%}" for s in r["share"]),
                      " ".join(map(str, r["pages_free"])),
                      " ".join(f"{b / 2**20:.1f}" for b in r["bytes_fetched"]),
                      " ".join(map(str, r["requests"])), " ".join(r["states"]))  # fmt: skip
        out.print(t)
    base = results["latency"][0]["median_ms"]
    t = Table(title="clone latency: from the clone operation's start to the clone running")
    for c in ("where", "hosts", "median ms", "ratio to same host", "parent pause ms"):
        t.add_column(c, justify="right")
    for r in results["latency"]:
        t.add_row(r["where"], " ".join(r["hosts"]), f"{r['median_ms']:.0f}",
                  f"{r['median_ms'] / base:.2f}x", f"{r['pause_ms']:.0f}")  # fmt: skip
    out.print(t)
    t = Table(title="N clones over 3 hosts (the parent's host last)")
    for c in ("N", "placement", "last clone running ms", "pages fetched (all hosts)", "states"):
        t.add_column(c, justify="right")
    for r in results["spread"]:
        t.add_row(str(r["n"]), " ".join(f"{h}:{k}" for h, k in r["placement"].items()),
                  f"{r['last_ready_ms']:.0f}", str(r["pages_fetched"]),
                  " ".join(sorted(set(r["states"]))))  # fmt: skip
    out.print(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--skip-demo", action="store_true", help="leave out the POV-Ray job")
    parser.add_argument("--memory", type=int, default=512, help="the demo parent's RAM (MiB)")
    args = parser.parse_args()
    image.build(
        image.Options(
            out=image.default_out(),
            cache=image.default_cache(),
            hooks=image.default_hooks(),
            compression=default_compression(),
        )
    )
    results: dict[str, Any] = {
        "demo": [] if args.skip_demo else [demo_job(a, args.memory) for a in (False, True)],
        "latency": [latency(w) for w in ("same host", "same host, memtap", "other host")],
        "spread": [spread(n) for n in (1, 2, 4, 8)],
    }  # fmt: skip
    out = BUILD_DIR / "bench" / "remote.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        tables(results)
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

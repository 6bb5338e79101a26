"""Successive forks of one parent (issue 11): the n-th fork against the first.

One parent forks again and again (sf-ticket, sf-clone, the clones sf-exit, the
parent sf-join), on one host and with its clones on other hosts (a cluster of
network-namespace hosts, sflib.cluster.testbed). Between forks the guest writes
a known amount of new data into a new file of its tmpfs (16 MiB, less where the RAM
cannot hold ten), so each fork's image should grow by what was written, whatever
the guest's RAM. Per fork: the pause, the time until the clones run (the slowest
clone's ready_ms), the host memory images hold afterwards (allocated size of the
*.mem files in the parent's host's memory dir) and how much of the image changed,
the parent's own copies of guest pages (in no image yet) and its QEMU's PSS, each
against fork 1; and the largest event-loop stall of every daemon over the run.
The daemons' logs stay in build/bench/successive/.

    .venv/bin/python bench/successive_bench.py [--sizes 256,1024] [--forks 10]
        [--write-mib N] [--clones 2] [--where one-host,cluster] [--json]

Also run by bench/fork_bench.py. Times are wall-clock under TCG: compare ratios.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from remote_bench import BIN, Host
from rich.console import Console
from rich.table import Table

from sflib import looplag
from sflib.cluster.testbed import Testbed
from sflib.errors import SystemFailure
from sflib.fork import images
from sflib.image import build as image
from sflib.paths import BUILD_DIR, Paths

MIB, PAGE = 1 << 20, 4096
STALL_WARNING = "0.02"  # seconds: the daemons log (almost) every stall, the bench keeps the worst
# As sflib.looplag logs it; older daemons leave out the wait (-1 here).
STALL = re.compile(
    r"event loop stalled (\d+) ms \(on CPU (\d+) ms(?:, waiting for a CPU (\d+) ms)?\)"
)
ROUND = re.compile(r"^SF-ROUND (\d+) rc=(\d+) avail=(\d+)", re.M)
FAIL, DONE = re.compile(r"^SF-FAIL .*", re.M), re.compile(r"^SF-DONE", re.M)
ROUND_TIMEOUT = 600.0  # seconds for one round under TCG on a busy machine
LOGS = BUILD_DIR / "bench" / "successive"  # the daemons' logs of the last run, kept
# Hosts in the test cluster, and a label; the allocator puts clones on other hosts first.
SETUPS = {"one-host": (1, "one host"), "cluster": (3, "3 hosts")}

# Round r: write, fork, join, report, then wait until the bench has looked (key go<r>).
SCRIPT = """\
{env}g() {{ python3 -c "
import time
from sflib.guest.bus import open_bus
b = open_bus()
while True:
  try: b.read(b'go$1'); break
  except Exception: time.sleep(0.2)
"; }}
g 0
r=0
while [ $r -lt {forks} ]; do
  r=$((r+1))
  dd if=/dev/urandom of=/tmp/w$r bs=1M count={mib} 2>/dev/null
  t=$(sf-ticket {clones})
  id=$(sf-clone "$t")
  case "$id" in
    0) ;;
    [1-9]*) sf-exit 0; sleep 100000;;
    *) sf-exit 3; echo "SF-FAIL $r: sf-clone printed '$id'"; exit 1;;
  esac
  sf-join "$t" >/dev/null; j=$?
  echo "SF-ROUND $r rc=$j avail=$(awk '/MemAvailable/ {{print $2}}' /proc/meminfo)"
  g $r
done
echo SF-DONE
"""


@contextlib.contextmanager
def testbed(hosts: int) -> Iterator[Testbed]:
    """A test cluster whose daemons log every loop stall past STALL_WARNING."""
    work = Path(tempfile.mkdtemp(prefix="sfs-", dir="/tmp"))  # short: socket paths
    # Not --debug: sfld would log every QMP message, and the pause would be longer.
    args = ["--accel", "tcg", "--image-dir", str(image.default_out()),
            "--loop-stall-warning", STALL_WARNING]  # fmt: skip
    saved = os.environ.get("SF_LOOP_STALL_WARNING")
    os.environ["SF_LOOP_STALL_WARNING"] = STALL_WARNING  # the master takes no extra options
    try:
        with Testbed.create(work, hosts=hosts, sfld_args=args) as bed:
            yield bed
    finally:
        if saved is None:
            os.environ.pop("SF_LOOP_STALL_WARNING", None)
        else:
            os.environ["SF_LOOP_STALL_WARNING"] = saved
        for i in range(1, hosts + 1):
            shutil.rmtree(Paths(work / f"h{i}").memory_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


class Parent:
    """The forking VM on the first host, its console and its memory."""

    def __init__(self, host: Host, name: str) -> None:
        self.host, self.name = host, name
        self.memory_dir = Paths(host.daemon.root).memory_dir
        self.domid = 0
        self.sums: dict[int, int] = {}  # page: checksum, of the image after the last fork

    def boot(self, script: str, memory: int) -> None:
        b64 = base64.b64encode(script.encode()).decode()
        append = f'sf.run="echo {b64} | base64 -d > /g.sh && sh /g.sh; sleep 100000"'
        assert len(append) < 2000, "kernel command lines stop at 2048 bytes"
        vm = self.host.tool("sf-vm", "run", "--name", self.name, "--memory", str(memory),
                            "--append", append, "--wait-ready")  # fmt: skip
        self.domid = int(vm["domid"])

    def console(self) -> str:
        return subprocess.run([str(BIN / "sf-vm"), "logs", self.name], env=self.host.env,
                              capture_output=True, text=True, timeout=60,
                              check=False).stdout  # fmt: skip

    def wait(self, pattern: re.Pattern[str], count: int) -> re.Match[str] | str:
        """The count-th match on the console, or why it will not come: the guest's
        failure line (FAIL) or a timeout."""
        deadline, text = time.monotonic() + ROUND_TIMEOUT, ""
        while time.monotonic() < deadline:
            text = self.console()
            found = list(pattern.finditer(text))
            if len(found) >= count:
                return found[count - 1]
            failed = FAIL.search(text)
            if failed:
                return failed.group(0)
            time.sleep(0.5)
        return f"{pattern.pattern} #{count} not on the console after {ROUND_TIMEOUT:.0f} s"

    def go(self, r: int) -> None:
        env = {**os.environ, "XENSTORED_PATH": str(self.host.daemon.run_dir / "xenstored.sock")}
        subprocess.run(["xenstore-write", f"/local/domain/{self.domid}/go{r}", "1"], env=env,
                       capture_output=True, timeout=60, check=True)  # fmt: skip

    def memory(self) -> dict[str, float]:
        """MiB the images hold (allocated, not apparent size), the parent's own copies
        of guest pages (written since its last fork: in no image yet), its QEMU's PSS
        and anonymous PSS (TCG's code buffer and heap too)."""
        files = list(self.memory_dir.glob("*.mem"))
        (vm,) = [v for v in self.host.tool("sf-vm", "ls") if v["name"] == self.name]
        pss = _smaps_rollup(int(vm["pid"]))
        changed = None
        if len(files) == 1:  # else a copy is under way: a new file, all of it "changed"
            sums = page_sums(files[0])
            changed = sum(1 for p, c in sums.items() if self.sums.get(p) != c) * PAGE / MIB
            self.sums = sums
        return {"image_mib": sum(p.stat().st_blocks * 512 for p in files) / MIB,
                "changed_mib": changed,
                "files": len(files), "own_mib": _own_pages(int(vm["pid"]), files) * PAGE / MIB,
                "pss_mib": pss.get("Pss", 0) / 1024,
                "anon_mib": pss.get("Pss_Anon", 0) / 1024}  # fmt: skip


def page_sums(path: Path) -> dict[int, int]:
    """A checksum of every page of the file's data (its holes left out)."""
    sums: dict[int, int] = {}
    with path.open("rb", buffering=0) as f:
        fd, offset, size = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < end:
                chunk = os.pread(fd, min(end - offset, MIB), offset)
                for i in range(0, len(chunk), PAGE):
                    sums[(offset + i) // PAGE] = zlib.crc32(chunk[i : i + PAGE])
                offset += len(chunk)
    return sums


def _own_pages(pid: int, files: list[Path]) -> int:
    """Pages of the image QEMU pid maps privately that it has its own copies of (0:
    it maps none of them, as before its first fork, when its RAM is its own file)."""
    for path in files:
        try:
            _, runs = images.dirty_runs(pid, path)
        except SystemFailure:
            continue
        return sum(count for _, count in runs)
    return 0


def _smaps_rollup(pid: int) -> dict[str, int]:
    """KiB fields of /proc/PID/smaps_rollup ({} if the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    return {f[0].rstrip(":"): int(f[1]) for f in (line.split() for line in lines) if len(f) >= 2}


def run_setup(where: str, memory: int, forks: int, write_mib: int, clones: int,
              avoidance: bool = True) -> dict[str, Any]:  # fmt: skip
    """One parent, forks rounds; every round's figures, and the daemons' worst stalls.
    write_mib 0: as much as the guest's RAM holds for every round, at most 16 MiB.
    A round that fails ends the run: "failed" says why, its console is kept in LOGS."""
    write_mib = write_mib or auto_write_mib(memory, forks)
    load, keep = os.getloadavg()[0], LOGS / f"{memory}-{where}"
    keep.mkdir(parents=True, exist_ok=True)
    with testbed(SETUPS[where][0]) as bed:
        parent = Parent(Host(bed.hosts[0]), f"succ{memory}")
        env = "" if avoidance else "export SF_AVOIDANCE=0\n"  # sf-clone reports no free page
        parent.boot(SCRIPT.format(env=env, forks=forks, mib=write_mib, clones=clones), memory)
        before, rounds, seen, failed = parent.memory(), [], set(), None
        parent.go(0)  # the guest writes nothing before this
        for r in range(1, forks + 2):
            line = parent.wait(ROUND, r) if r <= forks else parent.wait(DONE, 1)
            if isinstance(line, str) or r > forks:
                failed = line if isinstance(line, str) else None
                break
            (ticket,) = [t for t in parent.host.tool("sf-vm", "tickets")
                         if t["ticket"] not in seen]  # fmt: skip
            seen.add(ticket["ticket"])
            rounds.append(_round(r, line, ticket, parent.memory()))
            parent.go(r)
        (keep / "console.log").write_text(parent.console())
        parent.host.stop(parent.name)
        left = [str(p) for p in parent.memory_dir.glob("*")]
        lag = {d.name: _worst_stall(d.log) for d in [*bed.hosts, bed.master]}
        for d in [*bed.hosts, bed.master]:
            shutil.copy(d.log, keep / f"{d.name}.log")
    return {"where": SETUPS[where][1], "memory_mib": memory, "write_mib": write_mib,
            "clones": clones, "avoidance": avoidance, "before": before, "rounds": rounds,
            "failed": failed, "loop_lag": lag, "left": left,
            "load": [load, os.getloadavg()[0]]}  # fmt: skip


def auto_write_mib(memory: int, forks: int) -> int:
    # The booted guest has about 190 MiB of its RAM in use (its root file system
    # lives there), every round's file stays, and each clone still runs its Python
    # network hook (some 20 MiB): 256 MiB holds 10 rounds of 4 MiB. With 6, a clone
    # of fork 10 ran out of memory in its hook.
    return max(1, min(16, (memory - 216) // forks))


def _round(r: int, line: re.Match[str], ticket: dict[str, Any],
           held: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    cl = ticket["clones"].values()
    return {"fork": r, "join_rc": int(line.group(2)),
            "guest_avail_mib": int(line.group(3)) / 1024,
            "pause_ms": ticket["pause_ms"], "ready_ms": max((c["ready_ms"] or 0) for c in cl),
            "hosts": sorted({c["host"] or "h1" for c in cl}),
            "states": sorted({c["state"] for c in cl}),
            "statuses": [c["status"] for c in cl], **held}  # fmt: skip


def _worst_stall(log: Path) -> dict[str, int]:
    """A daemon's longest logged stall (its time on CPU and waiting for a CPU, where
    the log says), the longest it held its loop itself (a stall less its wait for a
    CPU: sflib.looplag.held), and how many stalls it logged."""
    text = log.read_text(errors="replace")
    found = [tuple(int(g or -1) for g in m.groups()) for m in STALL.finditer(text)]
    worst = max(found, default=(0, 0, 0))
    return {"ms": worst[0], "cpu_ms": worst[1], "wait_ms": worst[2],
            "held_ms": max(looplag.held(text), default=0), "count": len(found)}  # fmt: skip


# Output ----------------------------------------------------------------------------


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base else "-"


COLUMNS = ("fork", "pause ms", "/ fork 1", "clones run ms", "/ fork 1", "clone hosts",
           "changed in image MiB", "written MiB", "image MiB", "/ fork 1", "growth MiB",
           "growth / written", "parent own MiB", "parent PSS MiB",
           "clones, statuses")  # fmt: skip


def table(res: dict[str, Any]) -> Table:
    rows, first = res["rounds"], res["rounds"][0]
    title = (f"{len(rows)} successive forks, {res['memory_mib']} MiB, {res['where']}: "
             f"{res['clones']} clones per fork"
             f"{'' if res['avoidance'] else ', avoidance off'}; image = *.mem allocated on "
             "the parent's host; parent own = its guest pages in no image yet")  # fmt: skip
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c, justify="right")
    last = res["before"]["image_mib"]
    for r in rows:
        growth, last = r["image_mib"] - last, r["image_mib"]
        changed = r["changed_mib"]
        t.add_row(str(r["fork"]), f"{r['pause_ms']:.0f}", _ratio(r["pause_ms"], first["pause_ms"]),
                  f"{r['ready_ms']:.0f}", _ratio(r["ready_ms"], first["ready_ms"]),
                  " ".join(r["hosts"]), "-" if changed is None else f"{changed:.1f}",
                  str(res["write_mib"]), f"{r['image_mib']:.1f}",
                  _ratio(r["image_mib"], first["image_mib"]), f"{growth:+.1f}",
                  _ratio(growth, res["write_mib"]),
                  f"{r['own_mib']:.1f}", f"{r['pss_mib']:.0f}",
                  " ".join(r["states"]) + " " + ",".join(map(str, r["statuses"])))  # fmt: skip
    return t


def goals(res: dict[str, Any]) -> list[str]:
    """The issue's goals beside the figures (printed, not asserted)."""
    rows, n = res["rounds"], len(res["rounds"])
    failed = [f"FAILED after {n} forks: {res['failed']}"] if res["failed"] else []
    if not rows:
        return failed
    pause = rows[-1]["pause_ms"] / rows[0]["pause_ms"]
    growth = [b["image_mib"] - a["image_mib"] for a, b in itertools.pairwise(rows)]
    per = [g / res["write_mib"] for g in growth]
    mean = sum(per) / len(per) if per else 0.0
    lines = [*failed, f"goal: fork {n}'s pause within 1.2x of fork 1's: {pause:.2f}x "
             f"({'met' if pause <= 1.2 else 'NOT met'})"]  # fmt: skip
    if n > 2:  # fork 1 renames the RAM file; every later one copies the pages written
        lines.append(f"  fork {n}'s pause against fork 2's (the first that copies pages): "
                     f"{rows[-1]['pause_ms'] / rows[1]['pause_ms']:.2f}x")  # fmt: skip
    lines += [f"goal: image growth per fork in proportion to the MiB written: growth / "
              f"written {min(per, default=0):.2f}x to {max(per, default=0):.2f}x, mean "
              f"{mean:.2f}x (forks 2-{n})",
              "left in the memory dir after the parent stopped: "
              + (" ".join(res["left"]) or "nothing"),
              "the machine's load average (1 min) at the start and the end: "
              + " and ".join(f"{x:.1f}" for x in res["load"])]  # fmt: skip
    return lines


def lag_table(results: list[dict[str, Any]]) -> Table:
    t = Table(title=f"largest event-loop stall per daemon over each run (logged past "
                    f"{float(STALL_WARNING) * 1000:.0f} ms)")  # fmt: skip
    for c in ("run", "daemon", "worst ms", "its on CPU ms", "its waiting for a CPU ms",
              "worst held (stall less wait) ms", "stalls logged"):  # fmt: skip
        t.add_column(c, justify="right")
    for res in results:
        for daemon, s in res["loop_lag"].items():
            wait = "-" if s["wait_ms"] < 0 else str(s["wait_ms"])
            t.add_row(f"{res['memory_mib']} MiB, {res['where']}", daemon, str(s["ms"]),
                      str(s["cpu_ms"]), wait, str(s["held_ms"]), str(s["count"]))  # fmt: skip
    return t


def print_tables(results: list[dict[str, Any]]) -> None:
    out = Console(width=200)
    for res in results:
        if res["rounds"]:
            out.print(table(res))
        for line in goals(res):
            out.print(f"  {line}")
    out.print(lag_table(results))
    lags = [(s["ms"], s["held_ms"], d, f"{r['memory_mib']} MiB, {r['where']}")
            for r in results for d, s in r["loop_lag"].items()]  # fmt: skip
    worst, held = max(lags), max(lags, key=lambda x: x[1])
    out.print(
        f"worst loop lag over all runs: {worst[0]} ms ({worst[2]}, {worst[3]}); "
        f"worst held by a daemon itself: {held[1]} ms ({held[2]}, {held[3]})"
    )


def measure(sizes: list[int], forks: int, write_mib: int = 0, clones: int = 2,
            where: tuple[str, ...] = tuple(SETUPS),
            avoidance: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    return [run_setup(w, m, forks, write_mib, clones, avoidance) for m in sizes for w in where]


def setups(text: str) -> tuple[str, ...]:
    """--where's value: names in SETUPS, comma-separated."""
    names = tuple(text.split(","))
    if unknown := [n for n in names if n not in SETUPS]:
        raise argparse.ArgumentTypeError(f"unknown setup {', '.join(unknown)} "
                                         f"(choose from {', '.join(SETUPS)})")  # fmt: skip
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB")
    parser.add_argument("--forks", type=int, default=10, help="forks of the one parent")
    parser.add_argument("--write-mib", type=int, default=0,
                        help="MiB written between forks (0: up to 16, as RAM allows)")  # fmt: skip
    parser.add_argument("--clones", type=int, default=2, help="clones per fork")
    parser.add_argument("--where", default=",".join(SETUPS), type=setups,
                        help="one-host, cluster, or one-host,cluster (the default)")  # fmt: skip
    parser.add_argument("--no-avoidance", action="store_true",
                        help="sf-clone reports no free pages (SF_AVOIDANCE=0)")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure([int(s) for s in args.sizes.split(",")], args.forks, args.write_mib,
                      args.clones, args.where,
                      not args.no_avoidance)  # fmt: skip
    out = BUILD_DIR / "bench" / "successive.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_tables(results)
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

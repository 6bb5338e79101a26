"""The guest API's latency, inside a real guest (TCG), side by side with its
baselines in the same run (issue 12, item 6):

- a bare XenStore read round trip from a guest process (through sf-guestd and the
  virtio-serial port), and an empty Python process;
- one request to sfld made in-process from C (libsnowflock, build/sf-cdrive), C++
  (snowflock.hpp, build/sf-cxxtest) and Python (import snowflock): a join of an
  unknown ticket, one round trip;
- each tool as a shell script calls it (its whole run, start to exit), against the
  C request (goal: within 250 ms of it);
- the parent's sf-clone, with and without avoidance, against the pause sfld logged
  for that fork (goal: sf-clone returns within the pause plus 150 ms);
- Java, in a guest of the image with a JVM (build/image-jvm): a JVM's start, its first
  call, and a call of a warm JVM (SnowFlock.join of an unknown ticket, one round trip).

    make java && .venv/bin/python bench/guest_bench.py [--memory 512] [--json]

Times are wall-clock under TCG on this machine: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from remote_bench import cluster
from rich.console import Console
from rich.table import Table

from sflib.image import build as image
from sflib.image.initramfs import default_compression
from sflib.image.overlay import overlay
from sflib.paths import BUILD_DIR, PROJECT_ROOT

ROUNDS = 3  # of each measured call; the median is shown
PAUSE = re.compile(r"the pause: .*?cont [\d.]+ ms")
STEP = re.compile(r"(\w[\w ]*?) ([\d.]+)(?:,| ms)")

# Runs in the guest: prints one line BENCH <json> of {call: [seconds, ...]}.
GUEST_PY = """
import json, statistics, subprocess, sys, time
from pyxs import Client
N = int(sys.argv[1])
R = {}
def run(argv):
    return subprocess.run(argv, capture_output=True, text=True)
def timed(name, argv):
    for _ in range(N):
        t = time.perf_counter(); p = run(argv)
        R.setdefault(name, []).append(time.perf_counter() - t)
    return p
with Client() as c:
    c.write(b"data/b", b"x")
    for _ in range(50):
        t = time.perf_counter(); c.read(b"data/b")
        R.setdefault("xenstore read", []).append(time.perf_counter() - t)
timed("python3 -c pass", ["python3", "-c", "pass"])
for _ in range(N):
    c = run(["sf-cdrive", "bench", "10", "t999-nosuch"]).stdout.split()
    R.setdefault("C request (in-process)", []).append(float(c[1]) / 1000)
for _ in range(N):
    c = run(["sf-cxxtest", "bench", "10"]).stdout.split()
    R.setdefault("C++ request (in-process)", []).append(float(c[1]) / 1000)
import snowflock
for _ in range(10 * N):
    t = time.perf_counter()
    try:
        snowflock.join("t999-nosuch")
    except snowflock.NotFound:
        pass
    R.setdefault("Python request (in-process)", []).append(time.perf_counter() - t)
timed("sf-join t999-nosuch", ["sf-join", "t999-nosuch"])
timed("sf-kill t999-nosuch", ["sf-kill", "t999-nosuch"])
timed("sf-share ls t999-nosuch", ["sf-share", "ls", "t999-nosuch"])
timed("sf-ticket --help", ["sf-ticket", "--help"])
timed("sf-ticket 1", ["sf-ticket", "1"])
def fork(av):
    t = run(["sf-ticket", "1"]).stdout.strip()
    s = time.perf_counter(); p = run(["sf-clone", av, t]); d = time.perf_counter() - s
    if p.stdout.strip() != "0":
        run(["sf-exit", "0"]); time.sleep(1e6)
    return t, d
for av in ("--no-avoidance", "--avoidance"):
    for _ in range(N):
        t, d = fork(av)
        R.setdefault("sf-clone " + av, []).append(d)
        time.sleep(15)  # the clone has exited: sf-join only asks
        timed("sf-join (clone ended)", ["sf-join", t])
for _ in range(N):
    t = run(["sf-ticket", "1"]).stdout.strip()
    s = time.perf_counter(); p = run(["sf-clone", "--no-avoidance", t])
    if p.stdout.strip() != "0":
        time.sleep(1e6)  # killed
    timed("sf-kill (clone running)", ["sf-kill", t])
print("BENCH " + json.dumps(R), flush=True)
"""

# The same for Java, with build/snowflock-test.jar's Drive (make java).
GUEST_JAVA = """
import json, subprocess, sys, time
N = int(sys.argv[1])
CP = "/usr/share/java/snowflock.jar:/usr/share/java/snowflock-test.jar"
R = {}
def drive(*args):
    return subprocess.run(["java", "-cp", CP, "org.snowflock.test.Drive", *args],
                          capture_output=True, text=True, check=True).stdout.split()
for _ in range(N):
    out = drive("bench", "20", "t999-nosuch")  # MEAN-MS X FIRST-MS Y
    R.setdefault("Java: first call of a new JVM", []).append(float(out[3]) / 1000)
    R.setdefault("Java request (in-process, JVM warm)", []).append(float(out[1]) / 1000)
    t = time.perf_counter(); drive("start")
    R.setdefault("Java: a JVM's start (no call)", []).append(time.perf_counter() - t)
print("BENCH " + json.dumps(R), flush=True)
"""

GUEST_SH = "cat >/tmp/b.py <<'PY'\n{py}PY\npython3 /tmp/b.py {rounds}\necho SF-DONE\n"


def guest_script(rounds: int, py: str = GUEST_PY) -> str:
    """A short script that unpacks the bench: the kernel command line is < 2 KiB."""
    packed = base64.b64encode(gzip.compress(GUEST_SH.format(py=py, rounds=rounds).encode()))
    return f"echo {packed.decode()} | base64 -d | gunzip > /b.sh && sh /b.sh"


def bench_image() -> Path:
    """The image with build/sf-cdrive (linked to the image's libsnowflock) and
    build/sf-cxxtest (static) in /usr/bin."""
    programs = ("sf-cdrive", "sf-cxxtest")
    built = subprocess.run(["make", "-C", str(PROJECT_ROOT), *(f"build/{p}" for p in programs)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if built.returncode:
        raise SystemExit(f"make {' '.join(programs)} failed:\n{built.stdout}{built.stderr}")
    files = {f"/usr/bin/{p}": ((BUILD_DIR / p).read_bytes(), 0o755) for p in programs}
    return overlay(image.default_out(), BUILD_DIR / "bench" / "guest-image", files)


def java_image() -> Path:
    """The image with a JVM, and the test jar over it (make java built both jars)."""
    opts = image.Options(out=image.default_out(with_jvm=True), cache=image.default_cache(),
                         hooks=image.default_hooks(), compression=default_compression(),
                         jvm=True)  # fmt: skip
    jar = BUILD_DIR / "snowflock-test.jar"
    if not jar.is_file():
        raise SystemExit(f"{jar} is not built: run make java")
    files = {"/usr/share/java/snowflock-test.jar": (jar.read_bytes(), 0o644)}
    return overlay(image.build(opts).out, BUILD_DIR / "bench" / "image-jvm", files)


def results(out: str) -> dict[str, list[float]]:
    line = re.search(r"^BENCH (.*)$", out, re.M)
    if not line:
        raise SystemExit(f"the guest printed no result:\n{out[-3000:]}")
    return dict(json.loads(line.group(1)))


def measure(memory: int, rounds: int) -> dict[str, Any]:
    jvm_image = java_image()
    with cluster(1, "--image-dir", str(bench_image())) as (host,):
        calls = results(host.run_job("gb", guest_script(rounds), memory))
        log = host.daemon.log.read_text()  # the forks' pauses (the Java guest makes none)
        host.stop("gb")
        calls |= results(host.run_job("gbj", guest_script(rounds, GUEST_JAVA), memory,
                                      jvm_image))  # fmt: skip
    pauses = [sum(float(ms) for _, ms in STEP.findall(m.group(0).split(": ", 1)[1]))
              for m in PAUSE.finditer(log)]  # fmt: skip
    return {"memory_mib": memory, "rounds": rounds, "calls": calls, "pauses_ms": pauses}


def table(result: dict[str, Any]) -> Table:
    calls = {k: statistics.median(v) * 1000 for k, v in result["calls"].items()}
    read, c_request = calls["xenstore read"], calls["C request (in-process)"]
    t = Table(title=f"the guest API, {result['memory_mib']} MiB guest, TCG: median ms "
                    f"of {result['rounds']} (xenstore read: of 50)")  # fmt: skip
    for col in ("call", "ms", "/ xenstore read", "minus the C request"):
        t.add_column(col, justify="right" if col != "call" else "left")
    for name, ms in calls.items():
        t.add_row(name, f"{ms:.1f}", f"{ms / read:.1f}x", f"{ms - c_request:+.0f}")
    return t


def goal_lines(result: dict[str, Any]) -> list[str]:
    calls = {k: statistics.median(v) * 1000 for k, v in result["calls"].items()}
    pause = statistics.median(result["pauses_ms"]) if result["pauses_ms"] else float("nan")
    lines = [f"median pause over the run's {len(result['pauses_ms'])} forks: {pause:.0f} ms"]
    for av in ("--no-avoidance", "--avoidance"):
        ms = calls[f"sf-clone {av}"]
        verdict = "met" if ms <= pause + 150 else "NOT met"
        lines.append(f"goal: sf-clone {av} within the pause + 150 ms: {ms:.0f} ms against "
                     f"{pause + 150:.0f} ms ({verdict})")  # fmt: skip
    ratio = calls["sf-clone --avoidance"] / calls["sf-clone --no-avoidance"]
    verdict = "met" if ratio <= 1.3 else "NOT met"
    lines.append(f"goal: sf-clone with avoidance within 1.3x of without: {ratio:.2f}x ({verdict})")
    c_request = calls["C request (in-process)"]
    tools = {k: ms for k, ms in calls.items() if k.startswith("sf-") and "--help" not in k
             and "sf-clone" not in k}  # fmt: skip
    worst = max(tools, key=lambda k: tools[k])
    verdict = "met" if tools[worst] - c_request <= 250 else "NOT met"
    lines.append(f"goal: each tool within 250 ms of the C request: slowest {worst}, "
                 f"{tools[worst] - c_request:+.0f} ms ({verdict})")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="runs of each call")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.memory, args.rounds)
    out = BUILD_DIR / "bench" / "guest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    console = Console(width=140)
    console.print(table(result))
    for line in goal_lines(result):
        console.print("  " + line)
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

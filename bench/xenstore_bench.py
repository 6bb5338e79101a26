"""XenStore bus benchmark: READ, WRITE and watch-event delivery through pyxs over the
Unix socket, 1 and 32 concurrent clients, sf-xenstored side by side with a
protocol-only baseline server (bench/null_xenstored.py) in the same run.

    .venv/bin/python bench/xenstore_bench.py [--ops N] [--json]

Latencies are per operation as a client sees it (pyxs round trip); ops/s is the
total rate of all clients together. Ratios are sf-xenstored / baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyxs import Client
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def server(kind: str, sock: Path) -> Iterator[None]:
    if kind == "sf-xenstored":
        argv = [str(ROOT / "bin" / "sf-xenstored"), "--socket", str(sock), "--quiet"]
    else:
        argv = [sys.executable, str(ROOT / "bench" / "null_xenstored.py"), str(sock)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        sock.unlink(missing_ok=True)


def worker(args: tuple[str, str, int, int]) -> list[int]:
    """One client doing ops operations; returns each one's latency in ns."""
    sock, op, ops, index = args
    key = f"/bench/k{index}".encode()
    lat = []
    with Client(unix_socket_path=sock) as c:
        c.write(key, b"0123456789abcdef")
        if op == "watch":
            return watch_worker(sock, c, key, ops)
        for i in range(ops):
            t = time.perf_counter_ns()
            if op == "read":
                c.read(key)
            else:
                c.write(key, str(i).encode())
            lat.append(time.perf_counter_ns() - t)
    return lat


def watch_worker(sock: str, writer: Client, key: bytes, ops: int) -> list[int]:
    """Latency from the start of a write to its event reaching a second client."""
    lat = []
    with Client(unix_socket_path=sock) as w, w.monitor() as m:
        m.watch(key, b"bench")
        events = m.wait()
        next(events)  # the initial event
        for i in range(ops):
            t = time.perf_counter_ns()
            writer.write(key, str(i).encode())
            next(events)
            lat.append(time.perf_counter_ns() - t)
    return lat


def measure(sock: Path, op: str, clients: int, ops: int) -> dict[str, float]:
    per_client = max(ops // clients, 20)
    jobs = [(str(sock), op, per_client, i) for i in range(clients)]
    with multiprocessing.Pool(clients) as pool:
        started = time.perf_counter()
        results = pool.map(worker, jobs)
        elapsed = time.perf_counter() - started
    lat = sorted(x for r in results for x in r)
    return {
        "ops_per_s": len(lat) / elapsed,
        "p50_us": statistics.median(lat) / 1000,
        "p99_us": lat[int(len(lat) * 0.99) - 1] / 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000, help="operations per row")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("sf-xenstored", "baseline"):
            sock = Path(tmp) / f"{kind}.sock"
            with server(kind, sock):
                for op in ("read", "write", "watch"):
                    for clients in (1, 32):
                        rows.append({"server": kind, "op": op, "clients": clients}
                                    | measure(sock, op, clients, args.ops))  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(rows)
    return 0


def print_table(rows: list[dict[str, object]]) -> None:
    base = {(r["op"], r["clients"]): r for r in rows if r["server"] == "baseline"}
    table = Table(title="XenStore bus through pyxs: sf-xenstored vs protocol-only baseline")
    for col in ("op", "clients", "ops/s", "p50 µs", "p99 µs", "ops/s ratio", "p50 ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        if r["server"] != "sf-xenstored":
            continue
        b = base[(r["op"], r["clients"])]
        table.add_row(
            str(r["op"]), str(r["clients"]),
            f"{r['ops_per_s']:.0f}", f"{r['p50_us']:.0f}", f"{r['p99_us']:.0f}",
            f"{float(r['ops_per_s']) / float(b['ops_per_s']):.2f}",  # type: ignore[arg-type]
            f"{float(r['p50_us']) / float(b['p50_us']):.2f}",  # type: ignore[arg-type]
        )  # fmt: skip
    Console().print(table)
    btable = Table(title="baseline (protocol only, no store)")
    for col in ("op", "clients", "ops/s", "p50 µs", "p99 µs"):
        btable.add_column(col, justify="right")
    for (op, clients), b in base.items():
        btable.add_row(str(op), str(clients), f"{b['ops_per_s']:.0f}",
                       f"{b['p50_us']:.0f}", f"{b['p99_us']:.0f}")  # fmt: skip
    Console().print(btable)


if __name__ == "__main__":
    sys.exit(main())

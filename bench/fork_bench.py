"""Fork benchmark: SnowFlock's clone against a cold boot and against an eager
snapshot/restore (QEMU migrating all RAM, as virsh save/restore does), side by side
in one run, at 256 MiB and 1 GiB of guest RAM, with N = 1, 2, 4, 8 clones; then 10
successive forks of one parent against its first (bench/successive_bench.py), on one
host and with the clones on other hosts.

    .venv/bin/python bench/fork_bench.py [--sizes 256,1024] [--successive-sizes 256,1024]
        [--forks 10] [--skip-first-fork | --skip-successive] [--json]

The guest boots the project's image, fills half its RAM with random data (so an
eager snapshot has real pages to move), then is forked. Times are wall-clock on
this host (TCG here: compare ratios, not seconds). Writes build/bench/fork.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import successive_bench
from rich.console import Console
from rich.table import Table

from sflib.guest.ready import READY_KEY
from sflib.image.build import default_out
from sflib.paths import BUILD_DIR
from sflib.vm.accel import Accel
from sflib.vm.machine import Machine
from sflib.vm.qemu import VMFiles, VMSpec
from sflib.xenstore import snapshot
from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.wire import XenStoreError

QEMU = "qemu-system-x86_64"
CLONES = (1, 2, 4, 8)


class Bench:
    def __init__(self, image: Path, work: Path, shm: Path) -> None:
        self.image, self.work, self.shm = image, work, shm
        self.bus = XenStoreServer()
        self.next_domid = 1

    def machine(self, name: str, memory: int, append: str = "", incoming: bool = False,
                ram: Path | None = None, share: bool = True) -> Machine:  # fmt: skip
        domid, self.next_domid = self.next_domid, self.next_domid + 1
        d = self.work / name
        d.mkdir()
        spec = VMSpec(name, domid, memory, 1, Accel.TCG, self.image / "vmlinuz",
                      self.image / "initrd.img", append=append,
                      incoming="defer" if incoming else None, share_memory=share)  # fmt: skip
        files = VMFiles(ram or self.shm / f"{name}.mem", d / "qmp", d / "xb", d / "console",
                        owns_memory=ram is None)  # fmt: skip
        return Machine(QEMU, spec, files, self.bus, d / "qemu.log")

    async def cold_boot(self, memory: int) -> tuple[Machine, float]:
        fill = memory // 2
        script = f"dd if=/dev/urandom of=/dev/shm/fill bs=1M count={fill} 2>/dev/null; echo FILLED"
        m = self.machine(f"p{memory}", memory, f'sf.run="{script}; sleep 100000"')
        self.bus.local.make_domain(m.spec.domid)
        started = time.perf_counter()
        await m.start()
        ready = f"/local/domain/{m.spec.domid}/{READY_KEY.decode()}"
        while True:
            try:
                self.bus.local.read(ready)
                break
            except XenStoreError:
                await asyncio.sleep(0.02)
        cold = time.perf_counter() - started
        while "FILLED" not in m.files.console_log.read_text(errors="replace"):
            await asyncio.sleep(0.2)
        return m, cold

    async def fork(self, parent: Machine) -> tuple[Machine, dict[str, Any]]:
        """Ours, as sfld does it (sflib.fork.mechanics): the next QEMU starts first,
        mapping the RAM file privately; then pause, save the device state, freeze
        RAM (a rename), load the state into the next QEMU and continue there."""
        state, image = self.work / f"{parent.spec.name}.state", self.shm / f"{parent.spec.name}.img"
        reborn = self.restored(parent, "r", parent.files.memory)
        reborn.hold_bus = True
        await reborn.start()
        await reborn.wait_bus()
        await reborn.expect_state()
        t0 = time.perf_counter()
        await parent.pause()
        await parent.save_devices(state)
        snap = snapshot.take(self.bus.store, parent.spec.domid)
        os.rename(parent.files.memory, image)
        await reborn.load_state(state)
        assert parent.channel is not None
        reborn.take_over(parent.channel)
        await reborn.resume()
        pause = time.perf_counter() - t0
        await parent.stop()
        return reborn, {"pause_ms": pause * 1000, "state": state, "image": image, "snap": snap,
                        "devstate_kib": state.stat().st_size / 1024}  # fmt: skip

    def restored(self, parent: Machine, tag: str, image: Path) -> Machine:
        m = self.machine(f"{parent.spec.name}-{tag}{self.next_domid}", parent.spec.memory_mib,
                         parent.spec.append, incoming=True, ram=image, share=False)  # fmt: skip
        return m

    async def clones(self, parent: Machine, fork: dict[str, Any], n: int) -> list[float]:
        """Start n clones one after another; each one's ms from start to running."""
        times, made = [], []
        for _ in range(n):
            c = self.restored(parent, "c", fork["image"])
            c.restore_from = fork["snap"]
            t = time.perf_counter()
            await c.start()
            await c.wait_bus()
            await c.load_state(fork["state"])
            await c.resume()
            times.append((time.perf_counter() - t) * 1000)
            made.append(c)
        for c in made:
            await c.stop()
            self.bus.release_domain(c.spec.domid)
        return times

    async def eager(self, vm: Machine) -> dict[str, float]:
        """The baseline: all RAM into the stream (pause), and back into a new QEMU."""
        path = self.work / f"{vm.spec.name}.eager"
        t0 = time.perf_counter()
        await vm.pause()
        await vm.save_state(path)
        await vm.resume()
        pause = time.perf_counter() - t0
        m = self.machine(f"{vm.spec.name}-eager", vm.spec.memory_mib, vm.spec.append,
                         incoming=True)  # fmt: skip
        t1 = time.perf_counter()
        await m.start()
        await m.load_state(path, with_ram=True)
        await m.resume()
        restore = time.perf_counter() - t1
        size = path.stat().st_size
        await m.stop()
        path.unlink()
        return {"pause_ms": pause * 1000, "restore_ms": restore * 1000, "file_mib": size / 2**20}


async def measure(image: Path, sizes: list[int]) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="sf-fb-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="sf-fb-", dir="/dev/shm"))
    bench = Bench(image, work, shm)
    rows = []
    try:
        for memory in sizes:
            parent, cold = await bench.cold_boot(memory)
            reborn, fork = await bench.fork(parent)
            clones = {n: await bench.clones(reborn, fork, n) for n in CLONES}
            eager = await bench.eager(reborn)
            await reborn.stop()
            rows.append({"memory_mib": memory, "cold_boot_ms": cold * 1000,
                         "pause_ms": fork["pause_ms"], "devstate_kib": fork["devstate_kib"],
                         "clone_ms": clones, "eager": eager})  # fmt: skip
    finally:
        await bench.bus.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return rows


def print_tables(rows: list[dict[str, Any]]) -> None:
    t = Table(title="clone vs cold boot (to the guest's ready point) and vs eager restore")
    for c in ("RAM", "cold boot ms", "clone ms", "cold/clone", "eager restore ms",
              "eager/clone"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in rows:
        clone = r["clone_ms"][1][0]
        t.add_row(f"{r['memory_mib']} MiB", f"{r['cold_boot_ms']:.0f}", f"{clone:.0f}",
                  f"{r['cold_boot_ms'] / clone:.0f}x", f"{r['eager']['restore_ms']:.0f}",
                  f"{r['eager']['restore_ms'] / clone:.1f}x")  # fmt: skip
    Console().print(t)
    t = Table(title="parent pause: ours vs eager snapshot (all RAM saved)")
    for c in ("RAM", "ours ms", "device state", "eager ms", "eager file", "eager/ours"):
        t.add_column(c, justify="right")
    for r in rows:
        e = r["eager"]
        t.add_row(f"{r['memory_mib']} MiB", f"{r['pause_ms']:.0f}", f"{r['devstate_kib']:.0f} KiB",
                  f"{e['pause_ms']:.0f}", f"{e['file_mib']:.0f} MiB",
                  f"{e['pause_ms'] / r['pause_ms']:.1f}x")  # fmt: skip
    Console().print(t)
    t = Table(title="N clones started one after another (ms until the last one runs)")
    t.add_column("RAM", justify="right")
    for n in CLONES:
        t.add_column(f"N={n}", justify="right")
    for r in rows:
        t.add_row(f"{r['memory_mib']} MiB", *(f"{sum(r['clone_ms'][n]):.0f}" for n in CLONES))
    Console().print(t)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['memory_mib']} MiB" for r in rows]
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], [r["pause_ms"] for r in rows], 0.4, label="SnowFlock")
    a.bar([i + 0.2 for i in x], [r["eager"]["pause_ms"] for r in rows], 0.4, label="eager")
    a.set_xticks(list(x), labels)
    a.set_ylabel("parent pause (ms)")
    a.set_yscale("log")
    a.legend()
    for r in rows:
        b.plot(CLONES, [sum(r["clone_ms"][n]) for n in CLONES], marker="o",
               label=f"{r['memory_mib']} MiB")  # fmt: skip
    b.set_xlabel("clones")
    b.set_ylabel("ms until all run")
    b.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=default_out())
    parser.add_argument("--sizes", default="256,1024", help="guest RAM sizes in MiB")
    parser.add_argument("--successive-sizes", default="256,1024",
                        help="guest RAM sizes in MiB of the successive forks")  # fmt: skip
    parser.add_argument("--forks", type=int, default=10, help="successive forks of one parent")
    parser.add_argument("--where", default="one-host,cluster",
                        help="successive forks on one-host, across a cluster, or both")  # fmt: skip
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-first-fork", action="store_true",
                      help="leave out the first fork's tables (clone, pause, N)")  # fmt: skip
    skip.add_argument("--skip-successive", action="store_true",
                      help="leave out the successive forks")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    if not args.skip_first_fork:
        rows = asyncio.run(measure(args.image, [int(s) for s in args.sizes.split(",")]))
    forks: list[dict[str, Any]] = []
    if not args.skip_successive:
        sizes = [int(s) for s in args.successive_sizes.split(",")]
        forks = successive_bench.measure(sizes, args.forks, where=tuple(args.where.split(",")))
    if args.json:
        print(json.dumps({"first_fork": rows, "successive": forks}, indent=2))
        return 0
    if rows:
        print_tables(rows)
        plot(rows, BUILD_DIR / "bench" / "fork.png")
        print(f"plot: {BUILD_DIR / 'bench' / 'fork.png'}")
    if forks:
        successive_bench.print_tables(forks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

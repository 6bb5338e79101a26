"""VM benchmark: image size, boot-to-ready time and host memory per idle VM, each
side by side with a baseline in the same run.

    .venv/bin/python bench/vm_bench.py [--image DIR] [--runs N] [--json]

Baseline: the same kernel with a busybox-only initramfs whose init prints a marker
(the floor: kernel boot plus the least userspace). Ours: the SnowFlock image up to
its ready key in XenStore (modules, devices, Python, pyxs). Memory: after the guest
is ready and idle, QEMU's proportional set size (PSS, its own memory plus its share
of the guest RAM file) and the RAM file's pages on tmpfs, against the configured RAM.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sflib.guest.ready import READY_KEY
from sflib.image.build import default_out
from sflib.image.initramfs import CpioWriter
from sflib.vm.accel import Accel
from sflib.vm.machine import Machine
from sflib.vm.qemu import VMFiles, VMSpec
from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.wire import XenStoreError

MEMORY_MIB = 256
MARKER = "baseline-init: up"


def baseline_initrd(out: Path) -> Path:
    """A busybox-only initramfs: /init prints MARKER and powers off."""
    buf = io.BytesIO()
    cpio = CpioWriter(buf)
    for d in ("bin", "dev", "proc"):
        cpio.add_dir(d, 0o755)
    cpio.add_char_device("dev/console", 5, 1, 0o600)
    cpio.add_file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("init", f"#!/bin/sh\n/bin/busybox echo '{MARKER}'\n"
                  "/bin/busybox poweroff -f\n".encode(), 0o755)  # fmt: skip
    cpio.close()
    out.write_bytes(buf.getvalue())
    return out


async def boot(
    image: Path, initrd: Path, work: Path, ram: Path, wait_ready: bool
) -> dict[str, float]:
    bus = XenStoreServer()
    domid = 1
    bus.local.make_domain(domid)
    ready = asyncio.Event()
    bus.local.watch(f"/local/domain/{domid}/{READY_KEY.decode()}", b"r",
                    lambda _p, _t: _ready_if_written(bus, domid, ready))  # fmt: skip
    spec = VMSpec("bench", domid, MEMORY_MIB, 1, Accel.TCG, image / "vmlinuz", initrd)
    work.mkdir()
    files = VMFiles(ram, work / "qmp", work / "xenbus", work / "console.log")
    machine = Machine("qemu-system-x86_64", spec, files, bus, work / "qemu.log")
    started = time.perf_counter()
    await machine.start()
    try:
        if wait_ready:
            await asyncio.wait_for(ready.wait(), 300)
        else:
            await _wait_console(files.console_log, MARKER)
        elapsed = time.perf_counter() - started
        result = {"boot_s": elapsed}
        if wait_ready:
            await asyncio.sleep(5)  # idle
            result |= memory_of(machine.pid or 0, files.memory)
        return result
    finally:
        await machine.stop()
        await bus.close()


def _ready_if_written(bus: XenStoreServer, domid: int, ready: asyncio.Event) -> None:
    try:
        bus.local.read(f"/local/domain/{domid}/{READY_KEY.decode()}")
    except XenStoreError:  # the initial watch event, before the key exists
        return
    ready.set()


async def _wait_console(log: Path, marker: str) -> None:
    for _ in range(3000):
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(marker)


def memory_of(pid: int, ram_file: Path) -> dict[str, float]:
    pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return {"pss_mib": pss / 2**20, "ram_file_mib": ram_file.stat().st_blocks * 512 / 2**20}


def sizes(image: Path, baseline: Path) -> dict[str, float]:
    manifest = json.loads((image / "manifest.json").read_text())
    return {
        "kernel_mib": (image / "vmlinuz").stat().st_size / 2**20,
        "initrd_mib": (image / "initrd.img").stat().st_size / 2**20,
        "rootfs_mib": manifest.get("rootfs_size", 0) / 2**20,
        "baseline_initrd_mib": baseline.stat().st_size / 2**20,
    }


async def main_async(image: Path, runs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sf-bench-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="sf-bench-", dir="/dev/shm"))
    try:
        base = baseline_initrd(work / "baseline.img")
        ours, floor = [], []
        for i in range(runs):
            floor.append(await boot(image, base, work / f"b{i}", shm / f"b{i}", False))
            ours.append(
                await boot(image, image / "initrd.img", work / f"o{i}", shm / f"o{i}", True)
            )
        return {"sizes": sizes(image, base), "ours": ours, "baseline": floor}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def print_tables(r: dict[str, Any]) -> None:
    s = r["sizes"]
    t = Table(title="guest image")
    for c in ("", "SnowFlock image", "baseline (busybox only)", "ratio"):
        t.add_column(c, justify="right")
    t.add_row("initrd (compressed)", f"{s['initrd_mib']:.1f} MiB",
              f"{s['baseline_initrd_mib']:.1f} MiB",
              f"{s['initrd_mib'] / s['baseline_initrd_mib']:.1f}x")  # fmt: skip
    t.add_row("root fs unpacked in RAM", f"{s['rootfs_mib']:.1f} MiB", "-", "-")
    t.add_row("kernel", f"{s['kernel_mib']:.1f} MiB", "same", "1.0x")
    Console().print(t)
    boot_ours = [x["boot_s"] for x in r["ours"]]
    boot_base = [x["boot_s"] for x in r["baseline"]]
    t = Table(title=f"boot under TCG, {MEMORY_MIB} MiB ({len(boot_ours)} runs, best)")
    for c in ("", "SnowFlock: start to ready key", "baseline: start to first line", "ratio"):
        t.add_column(c, justify="right")
    t.add_row("seconds", f"{min(boot_ours):.2f}", f"{min(boot_base):.2f}",
              f"{min(boot_ours) / min(boot_base):.2f}x")  # fmt: skip
    Console().print(t)
    m = r["ours"][0]
    t = Table(title="host memory per idle VM (ready + 5 s)")
    for c in ("configured RAM", "RAM file pages on tmpfs", "QEMU PSS", "PSS / RAM"):
        t.add_column(c, justify="right")
    t.add_row(f"{MEMORY_MIB} MiB", f"{m['ram_file_mib']:.0f} MiB", f"{m['pss_mib']:.0f} MiB",
              f"{m['pss_mib'] / MEMORY_MIB:.2f}")  # fmt: skip
    Console().print(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=default_out())
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not (args.image / "initrd.img").exists():
        print(f"no image in {args.image}: run bin/sf-image build", file=sys.stderr)
        return 2
    result = asyncio.run(main_async(args.image, args.runs))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

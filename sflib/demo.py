"""`make demo`: the main job, a render farm forked from one VM.

Builds the guest image with POV-Ray, starts an sfld of its own (under a temporary
SF_ROOTDIR), boots a parent VM that runs demo/farm.sh: it loads the scene, then for
each of 2 frames asks for 4 clones, each clone renders one band of the frame and
hands it back through XenStore (sf-share), and the parent joins and assembles the
frame; the second frame forks the same VM a second time. The demo collects the
frames from the parent's XenStore domain into build/demo/render-F.png and prints,
per fork, the parent's pause and how long sf-clone took in it. Everything it
started is stopped and removed at the end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pyxs import Client
from rich.console import Console
from rich.table import Table

from sflib.image import build as image
from sflib.image.initramfs import default_compression
from sflib.image.overlay import overlay
from sflib.paths import BUILD_DIR, PROJECT_ROOT, Paths

BIN = PROJECT_ROOT / "bin"
DEMO = PROJECT_ROOT / "demo"
OUT = BUILD_DIR / "demo"
CLONES = 4
FRAMES = 2
console = Console(stderr=True)


def farm_image(work: Path) -> Path:
    base = image.build(image.Options(out=BUILD_DIR / "image-povray", cache=image.default_cache(),
                                     hooks=image.default_hooks(), include=("povray",),
                                     compression=default_compression()))  # fmt: skip
    files = {f"/demo/{p.name}": (p.read_bytes(), 0o755) for p in DEMO.iterdir() if p.is_file()}
    return overlay(base.out, work / "image", files)


class Sfld:
    def __init__(self, root: Path, image_dir: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SF_ROOTDIR": str(root)}
        self.log = root / "sfld.log"
        r, w = os.pipe()
        argv = [str(BIN / "sfld"), "--image-dir", str(image_dir), "--max-clones", str(CLONES),
                "--memory", "512", "--ready-fd", str(w)]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, pass_fds=[w], stderr=log)
        os.close(w)
        with os.fdopen(r, "rb") as ready:
            if ready.readline() != b"\n":
                raise SystemExit(f"sfld did not start:\n{self.log.read_text()}")

    def sf_vm(self, *args: str) -> Any:
        out = subprocess.run([str(BIN / "sf-vm"), *args, "--json"], env=self.env, check=True,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        return json.loads(out.stdout)

    def logs(self, name: str) -> str:
        return subprocess.run([str(BIN / "sf-vm"), "logs", name], env=self.env, text=True,
                              capture_output=True, timeout=60, check=False).stdout  # fmt: skip

    def collect(self, domid: int, key: str) -> bytes:
        base = f"/local/domain/{domid}/snowflock/share/parent/0/{key}"
        sock = self.root / "run/snowflock/xenstored.sock"
        with Client(unix_socket_path=str(sock)) as xs:
            count = int(xs.read(f"{base}/chunks".encode()))
            return b"".join(base64.b64decode(xs.read(f"{base}/{i}".encode())) for i in range(count))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def run_farm(sfld: Sfld) -> tuple[dict[str, Any], str, float]:
    started = time.monotonic()
    # The VM stays after the job so that its console can be read; the demo stops it.
    job = f"SF_N={CLONES} SF_FRAMES={FRAMES} sh /demo/farm.sh"
    farm = f'sf.run="{job}; echo FARM ended $?; sleep 100000"'
    vm = sfld.sf_vm("run", "--name", "farm", "--append", farm,
                    "--wait-ready", "--timeout", "300")  # fmt: skip
    console.print(f"parent VM farm ready after {vm['boot_to_ready_s']:.1f} s ({vm['accel']})")
    seen = 0
    while time.monotonic() - started < 1800:
        text = sfld.logs("farm")
        lines = re.findall(r"^FARM .*", text, re.M)
        for line in lines[seen:]:
            console.print(line.strip())
        seen = len(lines)
        if any(line.strip() == "FARM done" for line in lines):
            return vm, text, time.monotonic() - started
        if any(line.startswith("FARM ended") for line in lines):
            sfld_log = sfld.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the farm failed:\n{text[-3000:]}\n--- sfld's log:\n{sfld_log}")
        time.sleep(1)
    raise SystemExit(f"the farm did not finish:\n{sfld.logs('farm')[-3000:]}")


def summary(vm: dict[str, Any], text: str, tickets: list[dict[str, Any]],
            pngs: list[Path]) -> None:  # fmt: skip
    """A table of the clones' work per frame, then each fork's costs."""
    table = Table(title=f"render farm: {', '.join(str(p) for p in pngs)}")
    for column in ("frame", "clone", "ready s", "rows", "render s", "state", "status"):
        table.add_column(column, justify="right")
    forks = Table(title="the forks, as the parent saw them")
    for column in ("frame", "ticket", "clones", "parent paused", "sf-clone took", "fork to frame"):
        forks.add_column(column, justify="right")
    for f, ticket in enumerate(tickets, 1):
        for k, clone in sorted(ticket["clones"].items(), key=lambda kv: int(kv[0])):
            work = re.search(rf"^FARM frame {f} work {k} ([\d.]+) (\d+) (\d+)", text, re.M)
            rows = f"{work.group(2)}-{work.group(3)}" if work else "-"
            ready = clone.get("ready_ms")  # from sfld's start of the clone to running
            table.add_row(str(f), k, f"{ready / 1000:.2f}" if ready is not None else "-", rows,
                          work.group(1) if work else "-", clone["state"],
                          str(clone["status"]))  # fmt: skip
        forks.add_row(str(f), ticket["ticket"], str(len(ticket["clones"])),
                      f"{ticket['pause_ms']} ms", f"{farm_fact(text, f, 'cloned in')} s",
                      f"{farm_fact(text, f, 'wall')} s")  # fmt: skip
    Console().print(table)
    Console().print(forks)
    Console().print(f"parent boot to ready: {vm['boot_to_ready_s']:.2f} s ({vm['accel']})")


def farm_fact(text: str, frame: int, what: str) -> str:
    """The number farm.sh printed as "FARM frame F WHAT N s", or "-"."""
    found = re.search(rf"^FARM frame {frame} {what} ([\d.]+)", text, re.M)
    return found.group(1) if found else "-"


def frame_tickets(sfld: Sfld, text: str) -> list[dict[str, Any]]:
    """Each frame's ticket as sf-vm tickets shows it (pause_ms, the clones)."""
    ids = dict(re.findall(r"^FARM frame (\d+) ticket (\S+)", text, re.M))
    listed = {t["ticket"]: t for t in sfld.sf_vm("tickets")}
    return [listed[ids[str(f)]] for f in range(1, FRAMES + 1)]


def main() -> int:
    # A stopped demo must still stop its sfld and remove its files (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = Path(tempfile.mkdtemp(prefix="sf-demo-", dir="/tmp"))
    sfld = None
    try:
        console.print("building the guest image with POV-Ray (once; then cached)")
        image_dir = farm_image(work)
        sfld = Sfld(work, image_dir)
        vm, text, _ = run_farm(sfld)
        OUT.mkdir(parents=True, exist_ok=True)
        pngs = [OUT / f"render-{f}.png" for f in range(1, FRAMES + 1)]
        for f, png in enumerate(pngs, 1):
            png.write_bytes(sfld.collect(vm["domid"], f"render{f}"))
        summary(vm, text, frame_tickets(sfld, text), pngs)
        sfld.sf_vm("stop", "farm")
        return 0
    finally:
        if sfld is not None:
            sfld.stop()
        shutil.rmtree(Paths(work).memory_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

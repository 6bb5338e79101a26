"""`make demo`: the main job, a render farm forked from one VM.

Builds the guest image with POV-Ray, starts an sfld of its own (under a temporary
SF_ROOTDIR), boots a parent VM that runs demo/farm.sh: it loads the scene, asks for
4 clones, each clone renders one band of the image and hands it back through
XenStore (sf-share), and the parent joins and assembles the picture. The demo
collects it from the parent's XenStore domain into build/demo/render.png and
prints a summary. Everything it started is stopped and removed at the end.
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
    farm = 'sf.run="sh /demo/farm.sh; echo FARM ended $?; sleep 100000"'
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
            raise SystemExit(f"the farm failed:\n{text[-3000:]}")
        time.sleep(1)
    raise SystemExit(f"the farm did not finish:\n{sfld.logs('farm')[-3000:]}")


def summary(vm: dict[str, Any], text: str, ticket: dict[str, Any], png: Path) -> None:
    table = Table(title=f"render farm: {png} ({png.stat().st_size} bytes)")
    for column in ("clone", "rows", "render s", "state", "status"):
        table.add_column(column, justify="right")
    for k, clone in sorted(ticket["clones"].items(), key=lambda kv: int(kv[0])):
        work = re.search(rf"^FARM work {k} ([\d.]+) (\d+) (\d+)", text, re.M)
        rows = f"{work.group(2)}-{work.group(3)}" if work else "-"
        table.add_row(k, rows, work.group(1) if work else "-", clone["state"],
                      str(clone["status"]))  # fmt: skip
    Console().print(table)
    cloned = re.search(r"^FARM cloned in ([\d.]+)", text, re.M)
    wall = re.search(r"^FARM wall ([\d.]+)", text, re.M)
    facts = Table(show_header=False, box=None)
    facts.add_row("parent boot to ready", f"{vm['boot_to_ready_s']:.2f} s ({vm['accel']})")
    facts.add_row("parent pause for the clone", f"{ticket['pause_ms']} ms")
    facts.add_row("sf-clone in the parent", f"{cloned.group(1) if cloned else '-'} s")
    facts.add_row("fork to assembled image", f"{wall.group(1) if wall else '-'} s")
    Console().print(facts)


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
        png = OUT / "render.png"
        png.write_bytes(sfld.collect(vm["domid"], "render"))
        ticket = next(t for t in sfld.sf_vm("tickets") if t["owner"] == "farm")
        summary(vm, text, ticket, png)
        sfld.sf_vm("stop", "farm")
        return 0
    finally:
        if sfld is not None:
            sfld.stop()
        shutil.rmtree(Paths(work).memory_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

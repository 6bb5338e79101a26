"""sf-testcluster: a SnowFlock cluster on one machine, in network namespaces
(DESIGN §6), for trying multi-host cloning without a cluster."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, notify_ready, setup_logging
from sflib.cluster.testbed import Testbed
from sflib.paths import BUILD_DIR

PROGRAM = "sf-testcluster"
app = make_app("Run a SnowFlock cluster of network-namespace hosts on this machine.")


@app.callback()
def options(debug: DebugOption = False, quiet: QuietOption = False) -> None:
    """Run a SnowFlock cluster of network-namespace hosts on this machine."""
    setup_logging(PROGRAM, debug, quiet)


@app.command("run")
def run_cluster(
    hosts: Annotated[
        int, typer.Option("--hosts", "-n", help="Number of hosts.", min=1, max=32)
    ] = 3,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Where the hosts' roots go [default: a new /tmp/sfc-*].", file_okay=False
        ),
    ] = None,
    image_dir: Annotated[
        Path, typer.Option("--image-dir", help="The guest image.", file_okay=False)
    ] = BUILD_DIR / "image",
    accel: Annotated[str, typer.Option("--accel", help="auto, kvm or tcg.")] = "auto",
    ready_fd: Annotated[
        int | None, typer.Option("--ready-fd", help="Write a newline to FD once all run.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Describe the cluster as JSON.")] = False,
) -> None:
    """Start the master and N hosts; describe them; run until SIGTERM or SIGINT."""
    root = workdir or Path(tempfile.mkdtemp(prefix="sfc-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        _run(root, hosts, image_dir, accel, ready_fd, as_json)
    finally:
        if workdir is None:  # ours: nothing of it stays; a --dir is left to look at
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, hosts: int, image_dir: Path, accel: str, ready_fd: int | None,
         as_json: bool) -> None:  # fmt: skip
    sfld_args = ["--accel", accel, "--image-dir", str(image_dir.absolute())]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # set-up undone, as for ^C
    with Testbed.create(root, hosts=hosts, sfld_args=sfld_args) as bed:
        _describe(bed, as_json)
        notify_ready(ready_fd)
        # Blocked only now: the daemons started above must not inherit the mask.
        stop = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)


def _describe(bed: Testbed, as_json: bool) -> None:
    info: dict[str, Any] = {
        "master": bed.master_address,
        "hosts": [
            {"host": h.name, "address": h.address, "netns": h.netns, "root": str(h.root)}
            for h in bed.hosts
        ],
    }
    if as_json:
        print(json.dumps(info, indent=2), flush=True)
        return
    print(f"master {info['master']}")
    for h in info["hosts"]:
        print(f"{h['host']} {h['address']} SF_ROOTDIR={h['root']}", flush=True)


if __name__ == "__main__":
    main(PROGRAM, app)

"""sf-memtap: mount a remote memory image through memtap, and inspect mounts.

sfld mounts and unmounts memtaps itself when it starts clones; this tool is for
admins and tests: run one by hand, read its counters, clean one up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sflib import run
from sflib.cli.app import (
    DebugOption,
    JsonOption,
    QuietOption,
    main,
    make_app,
    print_result,
    setup_logging,
)
from sflib.errors import NotFoundError, SystemFailure
from sflib.memory.tap import MEMTAP, TapSpec, memtap_argv, mounts, read_stats, unmount_argv

PROGRAM = "sf-memtap"
app = make_app("Mount remote memory images through memtap (FUSE) and inspect the mounts.")
MountArg = Annotated[Path, typer.Argument(help="A memtap mount point.", file_okay=False)]


@app.callback()
def options(debug: DebugOption = False, quiet: QuietOption = False) -> None:
    """Mount remote memory images through memtap (FUSE) and inspect the mounts."""
    setup_logging(PROGRAM, debug, quiet)


@app.command()
def mount(
    mountpoint: MountArg,
    server: Annotated[str, typer.Option("--server", help="The memory server, HOST:PORT.")],
    image: Annotated[str, typer.Option("--image", help="The image's name on the server.")],
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Cache file [default: MOUNTPOINT.cache].", dir_okay=False),
    ] = None,
    secret_file: Annotated[
        Path | None, typer.Option("--secret-file", help="The shared secret.", dir_okay=False)
    ] = None,
    prefetch: Annotated[
        int, typer.Option("--prefetch", help="Pages fetched past each missing page.", min=0)
    ] = 8,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the server.", min=0.1)
    ] = 10.0,
    ready_fd: Annotated[
        int | None, typer.Option("--ready-fd", help="Write a newline to FD once mounted.")
    ] = None,
) -> None:
    """Mount IMAGE of SERVER on MOUNTPOINT, in the foreground until SIGTERM."""
    mountpoint = mountpoint.absolute()
    spec = TapSpec(server, image, mountpoint, cache or mountpoint.with_suffix(".cache"),
                   secret_file, prefetch, timeout)  # fmt: skip
    argv = memtap_argv(spec, ready_fd)
    try:
        os.execv(MEMTAP, argv)
    except OSError as e:
        raise SystemFailure(f"cannot run {MEMTAP}: {e.strerror}", hint="run make c") from e


@app.command()
def stats(mountpoint: MountArg, as_json: JsonOption = False) -> None:
    """Print a mount's counters: pages cached and fetched, requests, errors."""
    _check_mount(mountpoint)
    print_result(read_stats(mountpoint), as_json)


@app.command("ls")
def list_mounts(as_json: JsonOption = False) -> None:
    """List this host's memtap mounts and their counters."""
    found = [_describe(point) for point in mounts()]
    if as_json:
        print(json.dumps(found, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("MOUNTPOINT", "SERVER", "IMAGE", "CACHED", "FETCHED", "ALIVE"):
        table.add_column(column)
    for m in found:
        cell = {
            k: str(m.get(k, "-"))
            for k in ("server", "image", "pages_cached", "pages", "pages_fetched", "server_alive")
        }
        table.add_row(m["mountpoint"], cell["server"], cell["image"],
                      f"{cell['pages_cached']}/{cell['pages']}", cell["pages_fetched"],
                      cell["server_alive"])  # fmt: skip
    Console(width=200).print(table)


@app.command()
def umount(mountpoints: Annotated[list[Path], typer.Argument(help="Mount points.")]) -> None:
    """Unmount memtap mounts (lazily, if a QEMU still maps the image)."""
    for point in mountpoints:
        _check_mount(point)
        run.run(unmount_argv(point.absolute()), timeout=30)


def _check_mount(mountpoint: Path) -> None:
    if mountpoint.absolute() not in mounts():
        raise NotFoundError(f"{mountpoint} is no memtap mount")


def _describe(point: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"mountpoint": str(point)}
    try:
        entry.update(read_stats(point))
    except SystemFailure as e:
        entry["error"] = str(e)
    return entry


if __name__ == "__main__":
    main(PROGRAM, app)

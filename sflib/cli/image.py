"""sf-image: build the guest image (a Debian kernel and an initramfs root fs)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.errors import NotFoundError, UsageError
from sflib.image import build as image
from sflib.image import guestpkg
from sflib.image.initramfs import COMPRESSIONS, default_compression
from sflib.paths import BUILD_DIR

PROGRAM = "sf-image"
log = logging.getLogger(PROGRAM)

app = make_app("Build the SnowFlock guest image.")


class RichReporter:
    """Stages as rich progress bars on stderr (only used when stderr is a terminal)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.total = 1

    def stage(self, description: str, total: int | None = None) -> None:
        self.finish()
        self.total = total or 1
        self.task = self.progress.add_task(description, total=total)

    def advance(self, steps: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, steps)

    def finish(self) -> None:
        """Show the current stage complete (stages without a count pulse till then)."""
        if self.task is not None:
            self.progress.update(self.task, total=self.total, completed=self.total)


@contextmanager
def reporter(quiet: bool) -> Iterator[image.Reporter]:
    if quiet or not sys.stderr.isatty():
        yield image.NullReporter()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        rich = RichReporter(progress)
        yield rich
        rich.finish()


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{value:.1f} GiB"


@app.command("build")
def build_command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory [default: build/image/ in the project, build/image-jvm/ "
            "with --jvm].",
        ),
    ] = None,
    jvm: Annotated[
        bool,
        typer.Option(
            "--jvm", help="Add a Java runtime (java.base, jlink'd) and the Java API's jar."
        ),
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include", "-i", help="Debian package to add, with its dependencies (repeatable)."
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Where .deb files are kept [default: build/cache/debs/]."),
    ] = None,
    hooks: Annotated[
        Path | None,
        typer.Option("--hooks", help="hooks.d to put in the guest [default: the project's]."),
    ] = None,
    compression: Annotated[
        str | None,
        typer.Option(help="zstd or gzip [default: zstd if the zstd program is found]."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Build the kernel and initramfs; print their paths and sizes."""
    setup_logging(PROGRAM, debug, quiet)
    method = compression or default_compression()
    if method not in COMPRESSIONS:
        raise UsageError(f"--compression: {method!r} is not one of {', '.join(COMPRESSIONS)}")
    opts = image.Options(
        out=(out or image.default_out(jvm)).absolute(),
        cache=(cache or image.default_cache()).absolute(),
        hooks=(hooks or image.default_hooks()).absolute(),
        compression=method,
        include=tuple(include or ()),
        force=force,
        jvm=jvm,
    )
    with reporter(quiet) as progress:
        result = image.build(opts, progress)
    _print(result, as_json)


def _print(result: image.Result, as_json: bool) -> None:
    data = result.to_json()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    if result.up_to_date:
        log.info("up to date")
    for key in ("kernel", "initrd"):
        print(f"{key}\t{data[key]['path']}\t{data[key]['size']}\t{human(data[key]['size'])}")


@app.command("show")
def show_command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output directory [default: build/image/ in the project]."
        ),
    ] = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Print the manifest of a built image (JSON). Exit 3 if there is none."""
    setup_logging(PROGRAM, debug, quiet)
    directory = (out or image.default_out()).absolute()
    manifest = image.read_manifest(directory)
    if not manifest:
        raise NotFoundError(f"no image in {directory}", hint="run sf-image build")
    print(json.dumps(manifest, indent=2))


@app.command("guest-package")
def guest_package_command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="The tarball [default: build/snowflock-guest.tar.gz in the project].",
        ),
    ] = None,
    hooks: Annotated[
        Path | None,
        typer.Option("--hooks", help="hooks.d to put in it [default: the project's]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the path and the files.")] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Package the guest side for another distribution's VM: a tarball to unpack at /.

    It holds sf-guestd and its systemd unit, the Python API (import snowflock), the
    guest tools and libsnowflock (built by make c), and hooks.d. Exit 3 if the C
    parts are not built.
    """
    setup_logging(PROGRAM, debug, quiet)
    target = (out or guestpkg.default_out()).absolute()
    members = guestpkg.write_package(target, image.SFLIB_DIR, image.PYTHON_API_DIR, BUILD_DIR,
                                     image.C_SOURCES, hooks or image.default_hooks())  # fmt: skip
    if as_json:
        print(json.dumps({"package": str(target), "files": members}, indent=2))
    else:
        print(target)


if __name__ == "__main__":
    main(PROGRAM, app)

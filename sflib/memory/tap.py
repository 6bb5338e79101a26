"""memtap mounts, as sfld uses them: one per remote memory image on this host.

Each mount is a memtap process (c/memtap.c) serving one image from a memory
server; every clone on this host made from that image maps the same file, so a
page crosses the network once per host. A mount per image keeps a dead memory
server's damage to the clones of that image, and its lifetime to theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sflib import run
from sflib.errors import SystemFailure
from sflib.paths import BUILD_DIR

log = logging.getLogger(__name__)

MEMTAP = BUILD_DIR / "memtap"
NOHUGEPAGE = BUILD_DIR / "libnohugepage.so"
FSTYPE = "fuse.memtap"


@dataclass(frozen=True)
class TapSpec:
    """What one mount serves: image `image` of the memory server at `server`."""

    server: str  # HOST:PORT
    image: str
    mountpoint: Path
    cache: Path
    secret_file: Path | None = None
    prefetch: int = 8
    timeout: float = 10.0

    @property
    def file(self) -> Path:
        """The image as the clones' QEMUs map it."""
        return self.mountpoint / self.image


def memtap_argv(spec: TapSpec, ready_fd: int | None, program: Path = MEMTAP) -> list[str]:
    argv = [str(program), "--server", spec.server, "--image", spec.image,
            "--cache", str(spec.cache), "--prefetch", str(spec.prefetch),
            "--timeout", f"{spec.timeout:g}"]  # fmt: skip
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
    if spec.secret_file is not None:
        argv += ["--secret-file", str(spec.secret_file)]
    return [*argv, str(spec.mountpoint)]


class MemTap:
    """A running memtap mount. Use start() and stop(); stop() always unmounts."""

    def __init__(self, spec: TapSpec, log_file: Path) -> None:
        self.spec = spec
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Mount. Raises SystemFailure (server unreachable, image refused),
        OperationTimeout; nothing is left mounted then."""
        self.spec.mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            self.proc, _ = await run.spawn_ready(
                lambda fd: memtap_argv(self.spec, fd), log_file=self.log_file, timeout=timeout
            )
        except BaseException:
            await self._unmount()
            raise
        log.info("memtap: %s of %s on %s", self.spec.image, self.spec.server,
                 self.spec.mountpoint)  # fmt: skip

    async def stop(self) -> None:
        if self.proc is not None:
            await run.terminate_async(self.proc)
            self.proc = None
        await self._unmount()

    async def _unmount(self) -> None:
        if self.spec.mountpoint in mounts():
            try:
                await run.run_async(unmount_argv(self.spec.mountpoint), timeout=30)
            except SystemFailure as e:
                log.warning("cannot unmount %s: %s", self.spec.mountpoint, e)
        with contextlib.suppress(OSError):
            os.rmdir(self.spec.mountpoint)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def stats(self) -> dict[str, Any]:
        return read_stats(self.spec.mountpoint)


def qemu_environment() -> dict[str, str]:
    """The environment of a QEMU whose RAM is a memtap file: without huge pages, or
    each fault would read 4 MiB around it (c/nohugepage.c). Raises SystemFailure."""
    if not NOHUGEPAGE.is_file():
        raise SystemFailure(f"{NOHUGEPAGE} is missing", hint="run make c")
    return {**os.environ, "LD_PRELOAD": str(NOHUGEPAGE)}


def read_stats(mountpoint: Path) -> dict[str, Any]:
    """A mount's counters (its .stats file). Raises SystemFailure."""
    try:
        return dict(json.loads((mountpoint / ".stats").read_bytes()))
    except (OSError, ValueError) as e:
        raise SystemFailure(f"no memtap statistics in {mountpoint}: {e}") from e


def mounts(under: Path | None = None) -> list[Path]:
    """memtap mounts on this host (under a folder, if given), from /proc/mounts."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == FSTYPE:
            point = Path(fields[1].replace("\\040", " "))
            if under is None or point.is_relative_to(under):
                found.append(point)
    return found


def unmount_argv(mountpoint: Path) -> list[str]:
    # Lazily: a dead memtap's file may still be mapped by a QEMU that is dying.
    return ["umount", "-l", str(mountpoint)]


def unmount_leftovers(under: Path) -> list[Path]:
    """Unmount the memtap mounts a dead sfld left under a folder (at start-up)."""
    found = mounts(under)
    for point in found:
        try:
            run.run(unmount_argv(point), timeout=30)
        except SystemFailure as e:
            log.warning("cannot unmount %s: %s", point, e)
    return found

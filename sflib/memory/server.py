"""The memory server of a host, as sfld runs it: one process (c/memserver.c)
serving every frozen image in sfld's memory folder to the memtaps of other hosts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from sflib import run
from sflib.address import split_address
from sflib.errors import SystemFailure
from sflib.paths import BUILD_DIR

log = logging.getLogger(__name__)

MEMSERVER = BUILD_DIR / "memserver"


@dataclass(frozen=True)
class ServerSpec:
    images: Path  # the folder of frozen images
    listen: str  # ADDR:PORT; port 0 picks a free one
    secret_file: Path | None = None


def memserver_argv(spec: ServerSpec, ready_fd: int | None, program: Path = MEMSERVER) -> list[str]:
    argv = [str(program), "--dir", str(spec.images), "--listen", spec.listen]
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
    if spec.secret_file is not None:
        argv += ["--secret-file", str(spec.secret_file)]
    return argv


class MemoryServer:
    """A running memory server; `address` is where clients reach it."""

    def __init__(self, spec: ServerSpec, log_file: Path) -> None:
        self.spec = spec
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""

    async def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns HOST:PORT. Raises SystemFailure, OperationTimeout."""
        host, _ = split_address(self.spec.listen)
        self.proc, port = await run.spawn_ready(
            lambda fd: memserver_argv(self.spec, fd), log_file=self.log_file, timeout=timeout
        )
        if not port.isdigit():
            await self.stop()
            raise SystemFailure(f"memserver reported {port!r} instead of its port")
        self.address = f"{host}:{port}"
        log.info("memory server on %s serves %s", self.address, self.spec.images)
        return self.address

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        if self.proc is not None:
            await run.terminate_async(self.proc)
            self.proc = None

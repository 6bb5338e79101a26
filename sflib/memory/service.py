"""One host's side of lazily fetched memory: the memory server that exports this
host's frozen images, and the memtap mounts through which its clones map images
of other hosts (or, with clone_memory = "memtap", of this one).

A mount is shared by every clone of this host made from the same image and
unmounted when the last of them ends.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sflib.address import split_address
from sflib.errors import SnowFlockError
from sflib.memory.server import MemoryServer, ServerSpec
from sflib.memory.tap import MemTap, TapSpec, unmount_leftovers

log = logging.getLogger(__name__)


@dataclass
class TapSettings:
    secret_file: Path | None
    prefetch: int = 8
    timeout: float = 10.0


@dataclass
class _Mount:
    tap: MemTap
    users: set[str] = field(default_factory=set)


class MemoryService:
    def __init__(self, images: Path, log_dir: Path, listen: str, tap: TapSettings) -> None:
        self.images = images
        self.taps_dir = images / "taps"
        self.log_dir = log_dir
        self.tap_settings = tap
        self.server = MemoryServer(ServerSpec(images, listen, tap.secret_file),
                                   log_dir / "memserver.log")  # fmt: skip
        self.mounts: dict[tuple[str, str], _Mount] = {}
        self.unmounted: deque[dict[str, Any]] = deque(maxlen=64)  # last counters of each
        self._lock = asyncio.Lock()

    def recover(self) -> list[Path]:
        """Unmount and remove the mounts and caches a dead sfld left behind."""
        found = unmount_leftovers(self.taps_dir)
        shutil.rmtree(self.taps_dir, ignore_errors=True)
        for point in found:
            log.warning("unmounted memtap %s left by a previous sfld", point)
        return found

    async def export(self) -> str:
        """HOST:PORT of this host's memory server, started (again) if need be."""
        async with self._lock:
            if not self.server.alive:
                if self.server.proc is not None:
                    log.warning("memory server %s died; starting a new one", self.server.address)
                    await self.server.stop()
                self.log_dir.mkdir(parents=True, exist_ok=True)
                await self.server.start()
            return self.server.address

    async def attach(self, server: str, image: str, user: str) -> Path:
        """The file through which user maps image of server. Raises SnowFlockError."""
        async with self._lock:
            mount = self.mounts.get((server, image))
            if mount is None or not mount.tap.alive:
                if mount is not None:  # its memtap died: its clones die with it
                    await mount.tap.stop()
                mount = _Mount(await self._mount(server, image))
                self.mounts[server, image] = mount
            mount.users.add(user)
            return mount.tap.spec.file

    async def _mount(self, server: str, image: str) -> MemTap:
        host, port = split_address(server)
        where = self.taps_dir / f"{host}-{port}"
        where.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        s = self.tap_settings
        spec = TapSpec(server, image, where / image, where / f"{image}.cache", s.secret_file,
                       s.prefetch, s.timeout)  # fmt: skip
        tap = MemTap(spec, self.log_dir / f"memtap-{host}-{port}-{image}.log")
        await tap.start()
        return tap

    async def detach(self, server: str, image: str, user: str) -> None:
        async with self._lock:
            mount = self.mounts.get((server, image))
            if mount is None:
                return
            mount.users.discard(user)
            if not mount.users:
                del self.mounts[server, image]
                self.unmounted.append(await self._describe(server, image, mount))
                await mount.tap.stop()

    async def stats(self) -> dict[str, Any]:
        taps = [await self._describe(server, image, mount)
                for (server, image), mount in self.mounts.items()]  # fmt: skip
        return {"memserver": self.server.address if self.server.alive else None, "taps": taps,
                "unmounted": list(self.unmounted)}  # fmt: skip

    async def _describe(self, server: str, image: str, mount: _Mount) -> dict[str, Any]:
        entry: dict[str, Any] = {"server": server, "image": image,
                                 "file": str(mount.tap.spec.file),
                                 "users": sorted(mount.users)}  # fmt: skip
        try:
            # A thread: a file read has no asyncio form, and memtap answers it only
            # between two fetches, which may wait up to its timeout.
            entry.update(await asyncio.wait_for(asyncio.to_thread(mount.tap.stats), 15))
        except (SnowFlockError, TimeoutError) as e:
            entry["error"] = str(e) or "memtap did not answer"
        return entry

    async def close(self) -> None:
        async with self._lock:
            for mount in self.mounts.values():
                await mount.tap.stop()
            self.mounts.clear()
            await self.server.stop()
        shutil.rmtree(self.taps_dir, ignore_errors=True)

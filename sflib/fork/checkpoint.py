"""Checkpoints: what a clone is made from.

A checkpoint is the architectural descriptor of a paused VM: a manifest (format
below) and QEMU's device state (the migration stream without RAM), plus a frozen
memory image (the guest RAM file, never written again) and the XenStore snapshot
of the VM's domain. Files:

    <state_dir>/checkpoints/<id>/manifest.json
    <state_dir>/checkpoints/<id>/devstate
    <memory_dir>/<id>.mem

manifest.json, format "snowflock-descriptor-1":
    {"format", "id", "owner" (VM name), "named" (from sf-checkpoint, or made for
     one sf-clone), "created" (Unix time), "machine": {"memory_mib", "vcpus",
     "accel", "kernel", "initrd", "append"}, "memory": {"path", "bytes", "free_pages"},
     "devstate": {"file", "bytes", "sha256"}, "xenstore": <domain snapshot>}
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sflib.errors import NotFoundError, SystemFailure
from sflib.fork import freepages
from sflib.vm.accel import Accel
from sflib.vm.qemu import Nic, VMSpec
from sflib.xenstore.snapshot import DomainSnapshot

log = logging.getLogger(__name__)

FORMAT = "snowflock-descriptor-1"


@dataclass
class MemoryImage:
    """A frozen guest RAM file and the VMs and checkpoints that map it."""

    path: Path
    users: set[str] = field(default_factory=set)
    owned: bool = True  # False: another host's image, seen through memtap

    def use(self, user: str) -> None:
        self.users.add(user)

    @property
    def free_map(self) -> Path:
        """Its free-page map, for the memory server (c/memproto.h)."""
        return self.path.with_name(self.path.name + ".free")

    def mark_free(self, free_map: bytes) -> int:
        """Write the free-page map and punch those pages out of the file (they hold
        zeros: see sflib.fork.freepages). Returns how many pages. Raises SystemFailure."""
        page_runs = freepages.set_runs(free_map)
        partial = self.free_map.with_suffix(".free-new")
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                for first, count in page_runs:
                    _punch(fd, first * freepages.PAGE, count * freepages.PAGE)
            finally:
                os.close(fd)
            partial.write_bytes(free_map)
            partial.rename(self.free_map)  # whole or not at all: the server checks its size
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise SystemFailure(f"cannot mark free pages in {self.path}: {e.strerror}") from e
        return sum(count for _, count in page_runs)

    def release(self, user: str) -> None:
        """Forget a user; the last one out removes the file (if it is ours)."""
        self.users.discard(user)
        if not self.users and self.owned:
            self.path.unlink(missing_ok=True)
            self.free_map.unlink(missing_ok=True)
            log.debug("memory image %s removed", self.path)


@dataclass
class Checkpoint:
    id: str
    owner: str
    named: bool
    dir: Path
    image: MemoryImage
    snapshot: DomainSnapshot
    machine: dict[str, Any]
    created: float = field(default_factory=time.time)
    rid: str = ""  # the request the VM was blocked in: its clones get the reply
    pause_ms: float | None = None
    free_pages: int = 0  # pages the guest reported free: never sent to clones

    @property
    def devstate(self) -> Path:
        return self.dir / "devstate"

    @property
    def has_nic(self) -> bool:
        return bool(self.machine.get("nic"))

    def spec_for(self, name: str, domid: int, nic: Nic | None = None) -> VMSpec:
        """A VM restored from this checkpoint: its RAM a private mapping of the image;
        nic, its own card, if the checkpointed VM had one (it must then)."""
        m = self.machine
        if self.has_nic != (nic is not None):
            raise SystemFailure(f"checkpoint {self.id}: the clone's network card does not "
                                "match its parent's")  # fmt: skip
        return VMSpec(name=name, domid=domid, memory_mib=m["memory_mib"], vcpus=m["vcpus"],
                      accel=Accel(m["accel"]), kernel=Path(m["kernel"]), initrd=Path(m["initrd"]),
                      append=m["append"], incoming="defer", share_memory=False,
                      nic=nic)  # fmt: skip

    def manifest(self) -> dict[str, Any]:
        state = self.devstate.read_bytes()
        return {
            "format": FORMAT, "id": self.id, "owner": self.owner, "named": self.named,
            "created": self.created, "machine": self.machine,
            "memory": {"path": str(self.image.path), "bytes": self.image.path.stat().st_size,
                       "free_pages": self.free_pages},
            "devstate": {"file": self.devstate.name, "bytes": len(state),
                         "sha256": hashlib.sha256(state).hexdigest()},
            "xenstore": self.snapshot.to_json(),
        }  # fmt: skip

    def write_manifest(self) -> None:
        (self.dir / "manifest.json").write_text(json.dumps(self.manifest(), indent=2))

    def remove(self) -> None:
        self.image.release(self.id)
        shutil.rmtree(self.dir, ignore_errors=True)


_LIBC = ctypes.CDLL(None, use_errno=True)
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _punch(fd: int, offset: int, length: int) -> None:
    if _LIBC.fallocate(fd, _PUNCH_HOLE, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def machine_of(spec: VMSpec) -> dict[str, Any]:
    return {
        "memory_mib": spec.memory_mib,
        "vcpus": spec.vcpus,
        "accel": str(spec.accel),
        "kernel": str(spec.kernel),
        "initrd": str(spec.initrd),
        "append": spec.append,
        "nic": spec.nic is not None,
    }


def describe(checkpoints_dir: Path, checkpoint_id: str) -> dict[str, Any]:
    """A checkpoint's manifest. Raises NotFoundError."""
    try:
        return dict(json.loads((checkpoints_dir / checkpoint_id / "manifest.json").read_text()))
    except (OSError, ValueError):
        raise NotFoundError(f"no checkpoint {checkpoint_id}") from None


def materialise(pid: int, mapped: Path, out: Path) -> None:
    """Write the current content of the guest RAM that QEMU pid maps privately from
    mapped (a VM restored from a checkpoint) to the new file out.

    Its pages are the image's, except those the guest wrote since, which live in
    QEMU's private copies: reading QEMU's own view gives the sum of both.
    Raises SystemFailure.
    """
    start, end = _mapping_of(pid, mapped)
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, out.open("wb") as dst:
            mem.seek(start)
            remaining = end - start
            while remaining:
                chunk = mem.read(min(remaining, 8 << 20))
                if not chunk:
                    raise SystemFailure(f"short read of QEMU {pid}'s RAM")
                dst.write(chunk)
                remaining -= len(chunk)
    except OSError as e:
        out.unlink(missing_ok=True)
        raise SystemFailure(f"cannot copy QEMU {pid}'s RAM: {e.strerror}") from e


def _mapping_of(pid: int, mapped: Path) -> tuple[int, int]:
    target = os.fspath(mapped)
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as e:
        raise SystemFailure(f"cannot read QEMU {pid}'s mappings: {e.strerror}") from e
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target and fields[2] == "00000000":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            return start, end
    raise SystemFailure(f"QEMU {pid} does not map {mapped}")

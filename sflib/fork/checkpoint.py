"""Checkpoints: what a clone is made from.

A checkpoint is the architectural descriptor of a paused VM: a manifest (format
below) and QEMU's device state (QEMU's xen-save-devices-state: all but RAM), plus a frozen
memory image (the guest RAM file, never written again) and the XenStore snapshot
of the VM's domain (sflib.fork.images says how the image of a later fork is
made). Files:

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

import asyncio
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sflib.errors import NotFoundError, SystemFailure
from sflib.fork.images import MemoryImage
from sflib.vm.accel import Accel
from sflib.vm.qemu import Nic, VMSpec
from sflib.xenstore.snapshot import DomainSnapshot

log = logging.getLogger(__name__)

FORMAT = "snowflock-descriptor-1"


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
    finishing: asyncio.Task[None] | None = None  # free and zero pages, after the pause
    mapped: asyncio.Event = field(default_factory=asyncio.Event)  # its free map is written

    async def ready(self) -> None:
        """Until the image's free map is written: clones map it only then. Never
        raises: an image whose pages could not be marked serves them."""
        if self.finishing is not None:
            await self.mapped.wait()

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
        if self.image.users:  # its parent's faults, its clones' on other hosts, filled holes
            self.image.trim()
        shutil.rmtree(self.dir, ignore_errors=True)


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

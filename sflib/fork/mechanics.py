"""The steps of a fork, on QEMU (DESIGN §2).

freeze: pause the VM, save its device state, take its XenStore snapshot and make
its RAM file the frozen memory image. continue_from: the VM goes on in a new QEMU
that maps that image privately (copy-on-write), so the pause does not grow with
the guest's RAM: nothing is copied. restore_clone: a new VM from a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from sflib.fork import freepages
from sflib.fork.checkpoint import Checkpoint, MemoryImage, machine_of, materialise
from sflib.memory import tap
from sflib.sfld.vms import VM, VMState, VMTable
from sflib.vm.machine import Machine
from sflib.vm.qemu import Nic
from sflib.xenstore import snapshot

log = logging.getLogger(__name__)


async def freeze(vms: VMTable, vm: VM, checkpoint_id: str, named: bool, dir: Path) -> Checkpoint:
    """Pause vm and make a checkpoint of it; vm stays paused. On failure vm runs again.

    Raises SystemFailure, OperationTimeout.
    """
    m = vm.machine
    image_path = vms.memory_dir / f"{checkpoint_id}.mem"
    renamed = False
    await m.pause()
    try:
        dir.mkdir(parents=True)
        await m.save_state(dir / "devstate")
        snap = snapshot.take(vms.bus.store, m.spec.domid)
        if m.files.owns_memory:  # its own shared file: freezing it costs nothing
            os.rename(m.files.memory, image_path)
            renamed = True
        else:  # it maps an older image privately: copy what it sees (slow path)
            materialise(m.pid or 0, m.files.memory, image_path)
    except BaseException:
        if renamed:
            os.rename(image_path, m.files.memory)
        shutil.rmtree(dir, ignore_errors=True)
        await m.resume()
        raise
    image = MemoryImage(image_path)
    image.use(checkpoint_id)
    return Checkpoint(checkpoint_id, m.spec.name, named, dir, image, snap, machine_of(m.spec))


def mark_free(ckpt: Checkpoint, free: list[tuple[int, int]]) -> None:
    """Mark the pages the guest reported free (sflib.fork.freepages) in ckpt's image,
    before its first clone. After the parent runs again is soon enough: those pages
    hold zeros, and a hole reads the same. Raises SystemFailure."""
    if free:
        ram = ckpt.machine["memory_mib"] << 20
        ckpt.free_pages = ckpt.image.mark_free(freepages.bitmap(free, ram))


async def continue_from(vms: VMTable, vm: VM, ckpt: Checkpoint) -> float:
    """vm (paused, just frozen into ckpt) goes on in a new QEMU restored from ckpt;
    returns when (time.perf_counter()) it ran again: the old QEMU's exit, which
    frees its mappings, comes after.

    Its XenStore session moves to the new QEMU's channel. If that fails, the old
    QEMU, only paused, runs again on its old memory. Raises what the start raised.
    """
    old = vm.machine
    name = old.spec.name
    generation = vm.generation + 1
    files = dataclasses.replace(vms.files(name, generation), memory=ckpt.image.path,
                                owns_memory=False)  # fmt: skip
    spec = ckpt.spec_for(name, old.spec.domid, old.spec.nic)  # the same tap goes on
    new = Machine(old.qemu, spec, files, vms.bus, old.qemu_log)
    new.channel = old.channel
    try:
        await new.start()
        await new.wait_bus()
        await new.load_state(ckpt.devstate)
        await new.resume()
        resumed = time.perf_counter()
    except BaseException:
        await new.stop()
        await _undo_freeze(old, ckpt)
        raise
    ckpt.image.use(name)
    vm.machine, vm.generation = new, generation
    vms.release_image(name)
    vms.images[name] = ckpt.image
    old.files = dataclasses.replace(old.files, extra={})  # the VM's record and logs stay
    await old.stop()
    return resumed


async def _undo_freeze(old: Machine, ckpt: Checkpoint) -> None:
    if old.files.owns_memory and not old.files.memory.exists():
        os.rename(ckpt.image.path, old.files.memory)
    with contextlib.suppress(Exception):
        await old.resume()
    ckpt.remove()


@dataclasses.dataclass(frozen=True)
class CloneOrder:
    """What a clone is: its VM name, its ID, its family (the parent VM's name), for
    a clone through memtap the file it maps instead of the checkpoint's image, and
    its network card if its parent has one."""

    name: str
    clone_id: int
    family: str
    memory: Path | None = None
    nic: Nic | None = None


async def restore_clone(vms: VMTable, qemu: str, ckpt: Checkpoint, order: CloneOrder) -> VM:
    """A new VM from ckpt, paused, its domain a copy of the checkpointed one, its
    card's link down: it still has its parent's MAC and address until its
    hooks.d/clone-post.d/10-network asks for the link (sflib.net).

    Raises SnowFlockError (and leaves nothing behind) if QEMU cannot start.
    """
    name = order.name
    domid = vms.allocate_domid()
    files = dataclasses.replace(vms.files(name), memory=order.memory or ckpt.image.path,
                                owns_memory=False)  # fmt: skip
    files.console_log.parent.mkdir(parents=True, exist_ok=True)
    spec = ckpt.spec_for(name, domid, order.nic)
    machine = Machine(qemu, spec, files, vms.bus, files.extra["qemu_log"])
    machine.restore_from = ckpt.snapshot
    if order.memory is not None:
        machine.env = tap.qemu_environment()
    clone = VM(machine, Path(ckpt.machine["kernel"]).parent, state=VMState.READY,
               family=order.family, clone_id=order.clone_id)  # fmt: skip
    clone.ready.set()
    vms.reserve(clone)
    try:
        await machine.start()
        await machine.wait_bus()
        await machine.load_state(ckpt.devstate)
        if order.nic is not None:
            await machine.set_link(False)
    except BaseException:
        vms.unreserve(clone)
        await machine.stop()
        vms.bus.release_domain(domid)
        shutil.rmtree(files.console_log.parent, ignore_errors=True)
        raise
    ckpt.image.use(name)
    vms.images[name] = ckpt.image
    return clone

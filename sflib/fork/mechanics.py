"""The steps of a fork, on QEMU (DESIGN §2).

checkpoint_parent: the VM's next QEMU starts first (paused, waiting for state;
sflib.fork.standby starts it before the fork is asked for), then the pause holds
only what must be atomic: stop, save the device state, take
the XenStore snapshot, freeze the memory image (sflib.fork.images: a rename the
first time, the pages written since the last fork after that), load the state
into the next QEMU and continue there. It maps the image privately
(copy-on-write), so nothing is copied in proportion to the guest's RAM.
restore_clone: a new VM from a checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from sflib.errors import SystemFailure
from sflib.fork import holes, images, pageruns, procmem
from sflib.fork.checkpoint import Checkpoint, machine_of
from sflib.fork.images import MemoryImage
from sflib.fork.standby import Standbys, start_next
from sflib.fork.steps import Steps
from sflib.guest import freepages, layout
from sflib.memory import tap
from sflib.sfld.vms import VM, VMState, VMTable
from sflib.vm.machine import Machine
from sflib.vm.qemu import Nic
from sflib.xenstore import snapshot

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Where the next image comes from: base, the image the VM maps now (None: its
    own RAM file), and target, the file that becomes it (renamed in the pause)."""

    base: MemoryImage | None
    mapped: Path  # the file the VM's QEMU maps now
    target: Path
    in_place: bool  # target is the file the VM maps: nobody else maps it
    free: pageruns.Runs = dataclasses.field(default_factory=list)  # file page runs
    mapping: procmem.SharedMapping | None = None  # of target, its pages to write present
    own: pageruns.Runs = dataclasses.field(default_factory=list)  # QEMU's own before the pause
    copied: pageruns.Runs | None = None  # QEMU tracks writes: copied before the pause


async def checkpoint_parent(vms: VMTable, vm: VM, checkpoint_id: str, named: bool, dir: Path,
                            free: pageruns.Runs,
                            standbys: Standbys) -> Checkpoint:  # fmt: skip
    """Freeze vm into a new checkpoint (its image <checkpoint_id>.mem, its files in
    dir) and let vm go on in a new QEMU (its standby where it has a usable one);
    ckpt.pause_ms says how long it was paused. free: page frames the guest reported
    free (sflib.guest.freepages): never copied, and marked in the image after the
    pause (await ckpt.ready() before cloning).

    On failure vm runs on as before. Raises SnowFlockError.
    """
    image_path = vms.memory_dir / f"{checkpoint_id}.mem"
    ram = vm.machine.spec.memory_mib << 20
    before = Steps()
    plan = dataclasses.replace(await _plan(vms, vm, image_path),
                               free=freepages.file_runs(free, ram))  # fmt: skip
    before.done("plan")
    try:
        plan = await _mapped(vm, plan)
        before.done("target mapped")
        new = await standbys.take(vm, plan.target)
        before.done("standby" if new is not None else "no standby")
        if new is None:
            new = await start_next(vms, vm, plan.target)
            before.done("next QEMU")
    except BaseException:
        await _unplan(plan)
        raise
    try:
        dir.mkdir(parents=True)
        (dir / "devstate").touch()  # written in the pause; QEMU gets its descriptor now
        await new.prepare_load(dir / "devstate")
        before.done("state descriptor")
    except BaseException:
        shutil.rmtree(dir, ignore_errors=True)
        await new.stop()
        await _unplan(plan)
        raise
    old = vm.machine
    started = time.perf_counter()
    try:
        snap, written = await _freeze(vms, vm, new, plan, image_path, dir)
    except BaseException:
        await _unplan(plan)  # the VM maps its image still, as it was
        raise
    resumed = time.perf_counter()
    image = _adopt(vms, vm, new, plan, MemoryImage(image_path, {checkpoint_id, old.spec.name}))
    ckpt = Checkpoint(checkpoint_id, old.spec.name, named, dir, image, snap, machine_of(old.spec))
    ckpt.pause_ms = round((resumed - started) * 1000, 1)
    ckpt.finishing = image.settling = asyncio.create_task(_settle(ckpt, plan, written))
    vms.retire(old)  # its exit unmaps all it touched: not part of the pause
    log.debug("%s: before the pause: %s", old.spec.name, before)
    return ckpt


async def _plan(vms: VMTable, vm: VM, image_path: Path) -> _Plan:
    m = vm.machine
    name = m.spec.name
    if m.files.owns_memory:  # its own shared file: freezing it is a rename
        return _Plan(None, m.files.memory, m.files.memory, in_place=False)
    base = vms.images.get(name)
    if base is not None and base.only_for(name) and base.path == m.files.memory:
        base.frozen = True  # no more trims: this fork writes into it
        await base.settled()  # the last fork's holes first: then this fork's pages
        return _Plan(base, m.files.memory, m.files.memory, in_place=True)
    # Clones or checkpoints still map it: the next image starts as a copy, made
    # while the VM runs (the image itself never changes).
    log.info("%s: copying memory image %s (still mapped by %s)", name, m.files.memory,
             ", ".join(sorted(base.users - {name})) if base else "another host")  # fmt: skip
    await asyncio.to_thread(holes.copy_image, m.files.memory, image_path)
    return _Plan(base, m.files.memory, image_path, in_place=False)


async def _mapped(vm: VM, plan: _Plan) -> _Plan:
    """plan with its target mapped, the pages the pause will write into it present
    (images.prepare_write), where pages are to be written."""
    if plan.base is None:
        return plan
    pid = vm.machine.pid or 0
    task = asyncio.ensure_future(
        asyncio.to_thread(images.prepare_write, pid, plan.mapped, plan.target, plan.free)
    )
    try:
        prepared = await asyncio.shield(task)
        return dataclasses.replace(plan, mapping=prepared.mapping, own=prepared.own,
                                   copied=prepared.copied)  # fmt: skip
    except asyncio.CancelledError:  # the thread runs on: its mapping must not leak
        task.add_done_callback(_close_mapping)
        raise


def _close_mapping(task: asyncio.Future[images.Prepared]) -> None:
    if not task.cancelled() and task.exception() is None and (mapping := task.result().mapping):
        mapping.close()


async def _unplan(plan: _Plan) -> None:
    """The fork will not happen: its copy removed, or its in-place image free."""
    if plan.base is None:
        return
    await _unmap(plan)
    if plan.in_place:
        plan.base.frozen = False
    else:
        plan.target.unlink(missing_ok=True)


async def _unmap(plan: _Plan) -> None:
    if plan.mapping is not None:
        await asyncio.to_thread(plan.mapping.close)  # its pages are unmapped one by one


async def _freeze(vms: VMTable, vm: VM, new: Machine, plan: _Plan, image_path: Path,
                  dir: Path) -> tuple[snapshot.DomainSnapshot, pageruns.Runs]:  # fmt: skip
    """The pause: vm's QEMU stops, and new goes on from its state and the image
    at image_path. Returns the XenStore snapshot and the page runs written into the
    image. On failure the old QEMU runs again and new is stopped. Raises
    SnowFlockError."""
    old = vm.machine
    steps = Steps()
    old.set_tap_held(True)  # frames wait in the tap for new, which reads once loaded
    try:
        await old.pause()
    except BaseException:
        await new.stop()
        old.set_tap_held(False)
        raise
    try:
        steps.done("stop")
        await old.save_devices(dir / "devstate")
        steps.done("devices")
        # Not what its clones shared: theirs, not a clone's, and it grows fork by fork.
        snap = snapshot.take(vms.bus.store, old.spec.domid, leave_out=(layout.SHARE,))
        steps.done("xenstore")
        written, scan_ms = await asyncio.to_thread(_freeze_memory, old.pid or 0, plan,
                                                   image_path)  # fmt: skip
        steps.done("memory", f"scan {scan_ms:.1f}")
        await new.load_state(dir / "devstate")
        steps.done("load")
    except BaseException:
        await _undo(old, new, plan, image_path, dir)
        raise
    try:
        assert old.channel is not None
        new.take_over(old.channel)
        steps.done("take over")
        await new.resume()
    except BaseException:  # the session has moved: the VM cannot go back
        log.exception("%s: lost in its new QEMU; stopping it", old.spec.name)
        await new.stop()
        await old.stop()
        raise
    steps.done("cont")
    log.info("%s: %d pages written into its image, %d of them before the pause; the "
             "pause: %s", old.spec.name, pageruns.count(written),
             pageruns.count(plan.copied or []), steps)  # fmt: skip
    return snap, written


def _freeze_memory(pid: int, plan: _Plan, image_path: Path) -> tuple[pageruns.Runs, float]:
    """In a thread, the VM paused: make image_path the image of its memory as it is.
    Returns the page runs written, and how long finding them took (ms). Raises
    SystemFailure."""
    if plan.base is None:
        os.rename(plan.mapped, image_path)
        return [], 0.0
    started = time.perf_counter()
    start, runs = _changed(pid, plan)
    scan_ms = (time.perf_counter() - started) * 1000
    # The guest's free pages (sf-clone holds them, zeroed, and nobody reads them) are
    # punched after the pause: copying them would cost the most, for nothing.
    fresh = pageruns.subtract(runs, plan.free)
    changed = pageruns.count(runs)
    log.debug("%d pages changed, %d of them reported free", changed,
              changed - pageruns.count(fresh))  # fmt: skip
    images.write_runs(pid, start, fresh, plan.target, plan.mapping)
    written = pageruns.union(plan.copied or [], fresh)
    if plan.in_place:
        plan.base.free_map.unlink(missing_ok=True)  # it marked pages of the last fork
        os.rename(plan.target, image_path)
    return written, scan_ms


def _changed(pid: int, plan: _Plan) -> tuple[int, pageruns.Runs]:
    """The pages the pause must write: those written since they were copied before
    it, or (QEMU not tracking its writes) all it has its own copies of."""
    if plan.copied is not None:
        try:
            return images.written_since(pid, plan.mapped)
        except (OSError, procmem.Unsupported) as e:  # every own page: a superset
            log.warning("pages written since the copy unknown: %s", e)
    return images.dirty_runs(pid, plan.mapped, plan.own)


async def _undo(old: Machine, new: Machine, plan: _Plan, image_path: Path, dir: Path) -> None:
    """Back to before the pause: the files where they were, the old QEMU running.
    Pages written into an image in place are the ones its only user, the old QEMU,
    has its own copies of: its view did not change."""
    if image_path.exists() and (plan.base is None or plan.in_place):
        os.rename(image_path, plan.mapped)
    elif not plan.in_place and plan.base is not None:
        plan.target.unlink(missing_ok=True)
    shutil.rmtree(dir, ignore_errors=True)
    await new.stop()
    with contextlib.suppress(Exception):
        old.set_tap_held(False)
        await old.resume()


def _adopt(vms: VMTable, vm: VM, new: Machine, plan: _Plan, image: MemoryImage) -> MemoryImage:
    """After the pause: vm is new, which maps the checkpoint's image."""
    name = new.spec.name
    if plan.in_place:
        vms.images.pop(name, None)  # the same file, renamed: nothing to remove
    else:
        vms.release_image(name)
    vms.images[name] = image
    record = vms.files(name).extra
    new.files = dataclasses.replace(new.files, memory=image.path, extra=record)
    old = vm.machine
    old.files = dataclasses.replace(old.files, extra={})  # the VM's record and logs stay
    vm.machine, vm.generation = new, vm.generation + 1
    vms.record(vm)
    return image


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
    steps: Steps | None = None  # where the times of its start go, for the log


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
    steps = order.steps or Steps()
    try:
        await machine.start()
        steps.done("QEMU")
        await machine.wait_bus()
        await machine.load_state(ckpt.devstate)
        steps.done("load")
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


async def finished(task: asyncio.Task[None] | None) -> None:
    """Wait for a step that ran alongside one that failed, its own failure logged:
    what it made is then undone with the rest."""
    if task is None:
        return
    await asyncio.wait([task])
    if not task.cancelled() and (error := task.exception()) is not None:
        log.debug("and alongside it: %s", error)


async def _settle(ckpt: Checkpoint, plan: _Plan, written: pageruns.Runs) -> None:
    """After the pause, off its path: the target unmapped, the free pages marked
    and punched (_mark_free), then the pages written that hold zeros punched too
    (checking them in the pause would lengthen it), and what the image holds as
    zeros noted for its trims. A first image (no base) is the RAM the guest zeroed
    as it booted (init_on_free): all of it is checked. Never raises."""
    base, free = plan.base, plan.free
    await _unmap(plan)
    freed = await _mark_free(ckpt, free)
    image = ckpt.image
    try:
        checked, punched = await asyncio.to_thread(
            holes.punch_zeros, image.path, written if base is not None else None
        )
    except SystemFailure as e:
        log.warning("%s: zero pages kept: %s", ckpt.owner, e)
        return  # its zeros unknown: no trims
    pages = (ckpt.machine["memory_mib"] << 20) // freepages.PAGE
    if base is None:  # what was a hole or read as zeros
        image.zeros = pageruns.complement(pageruns.subtract(checked, punched), pages)
    else:
        await base.settled()  # a copy's base may still be settling
        unchanged = pageruns.subtract(base.zeros, written)
        image.zeros = pageruns.union(unchanged, free if freed else [], punched)
    log.debug("%s: %d zero pages punched, of %d checked; %d known zeros", ckpt.owner,
              pageruns.count(punched), pageruns.count(checked),
              pageruns.count(image.zeros))  # fmt: skip


async def _mark_free(ckpt: Checkpoint, free: pageruns.Runs) -> bool:
    """Mark the pages the guest reported free (runs of file pages) in ckpt's image
    before its first clone (the free map, which memtap reads as it mounts), then
    punch them out of it: nobody reads those pages before writing them
    (sflib.guest.freepages), so their content does not matter, and a hole costs no
    memory. Clones wait for the map only (ckpt.ready); a next fork that writes into
    the image waits for the holes too (MemoryImage.settled). Returns whether they
    are holes. Never raises: clones then fetch those pages like others."""
    pages = (ckpt.machine["memory_mib"] << 20) // freepages.PAGE
    try:
        if free:
            await asyncio.to_thread(lambda: ckpt.image.mark_free(freepages.bitmap(free, pages)))
            ckpt.free_pages = pageruns.count(free)
    except SystemFailure as e:
        log.warning("%s: free pages not marked: %s", ckpt.owner, e)
        return False
    finally:
        ckpt.mapped.set()
    try:
        await asyncio.to_thread(ckpt.image.punch_runs, free)
    except SystemFailure as e:
        log.warning("%s: free pages kept: %s", ckpt.owner, e)
        return False
    return True

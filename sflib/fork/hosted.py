"""Clones this host runs for a parent on another host (DESIGN §5).

The parent's sfld ships a descriptor (manifest, device state, XenStore snapshot)
and the address of its memory server; here each clone maps the image through a
memtap mount, gets its domain restored from the snapshot, is told who it is, and
resumes with its reply. What it reports goes back to the parent's sfld: its exit
or crash (clone.ended) and what it shares (share.put). A clone's share folder is
in its own domain here, since the parent's domain lives on the other host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sflib.cluster.link import ClusterLink
from sflib.errors import SnowFlockError, SystemFailure, UsageError
from sflib.fork import mechanics
from sflib.fork.checkpoint import Checkpoint
from sflib.fork.images import MemoryImage
from sflib.fork.mechanics import CloneOrder
from sflib.fork.messages import CloneStart, Identity, clone_reply
from sflib.fork.steps import Steps
from sflib.guest import layout
from sflib.guest.share import read_chunks
from sflib.memory.service import MemoryService
from sflib.sfld.vms import VM, VMTable
from sflib.vm.qemu import Nic
from sflib.xenstore.snapshot import DomainSnapshot
from sflib.xenstore.wire import XenStoreError

log = logging.getLogger(__name__)

NOTIFY_TRIES = 5


@dataclass
class HostedClone:
    ticket: str
    clone_id: int
    owner_host: str
    owner_address: str
    checkpoint: str  # key of its descriptor in HostedClones.descriptors
    server: str  # the memory server it maps through memtap
    image: str
    exited: bool = False
    status: int | None = None  # from sf-exit; reported once its QEMU is gone


class HostedClones:
    def __init__(self, vms: VMTable, memory: MemoryService, link: ClusterLink, qemu: str,
                 checkpoint_dir: Path) -> None:  # fmt: skip
        self.vms = vms
        self.memory = memory
        self.link = link
        self.qemu = qemu
        self.dir = checkpoint_dir
        self.clones: dict[str, HostedClone] = {}  # by VM name
        self.descriptors: dict[str, Checkpoint] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last: dict[str, asyncio.Task[None]] = {}  # per clone: its latest message

    def of(self, vm: VM) -> HostedClone | None:
        return self.clones.get(vm.machine.spec.name)

    # clone.start ---------------------------------------------------------------------

    async def start(self, order: CloneStart, reply: Callable[[int, str, Any], None]) -> Any:
        """Start the clones order asks for, side by side; returns {ID: VM name, or
        None if it failed}."""
        ckpt = self._descriptor(order)
        names = await asyncio.gather(*(self._start(order, ckpt, k, reply) for k in order.ids))
        self._drop_descriptor_if_unused(ckpt.id)
        return {str(k): name for k, name in zip(order.ids, names, strict=True)}

    async def _start(self, order: CloneStart, ckpt: Checkpoint, k: int,
                     reply: Callable[[int, str, Any], None]) -> str | None:  # fmt: skip
        name = f"{order.ticket}-{k}"
        hosted = HostedClone(order.ticket, k, order.owner_host, order.owner_address, ckpt.id,
                             order.memserver, order.image)  # fmt: skip
        steps = Steps()
        try:
            vm = await self._start_one(ckpt, hosted, name, order, steps)
        except SnowFlockError as e:
            log.warning("clone %d of ticket %s did not start: %s", k, order.ticket, e)
            return None
        reply(vm.machine.spec.domid, ckpt.rid, clone_reply(k, order.reply))
        log.info("clone %d of ticket %s running (its parent on %s)", k, order.ticket,
                 order.owner_host)  # fmt: skip
        log.debug("clone %d of ticket %s: its start: %s", k, order.ticket, steps)
        return name

    def _descriptor(self, order: CloneStart) -> Checkpoint:
        manifest = order.manifest
        key = f"{manifest['id']}@{order.owner_host}"
        if key in self.descriptors:
            return self.descriptors[key]
        folder = self.dir / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "devstate").write_bytes(order.devstate)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        image = MemoryImage(Path(order.image), owned=False)  # a name on another host
        try:
            ckpt = Checkpoint(key, order.family, bool(manifest["named"]), folder, image,
                              DomainSnapshot.from_json(manifest["xenstore"]),
                              manifest["machine"], created=float(manifest["created"]),
                              rid=order.rid)  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise UsageError(f"clone.start: malformed descriptor: {e}") from None
        self.descriptors[key] = ckpt
        return ckpt

    async def _start_one(self, ckpt: Checkpoint, hosted: HostedClone, name: str,
                         order: CloneStart, steps: Steps) -> VM:  # fmt: skip
        memory = await self.memory.attach(hosted.server, hosted.image, name)
        steps.done("memtap")
        self.clones[name] = hosted
        network = order.network
        joining: asyncio.Task[None] | None = None
        try:
            nic = self._open_nic(name, hosted.clone_id, network)
            steps.done("card")
            if nic is not None and self.vms.network is not None and network is not None:
                # Its tap goes on the network while its QEMU starts: the card's link
                # stays down until the clone asks for it.
                peers = [str(p) for p in network.get("peers", [])]
                joining = asyncio.create_task(self.vms.network.join(name, parent_here=False,
                                                                    peers=peers))  # fmt: skip
            clone = await mechanics.restore_clone(self.vms, self.qemu, ckpt,
                                                  CloneOrder(name, hosted.clone_id, order.family,
                                                             memory, nic, steps))  # fmt: skip
        except BaseException:
            await mechanics.finished(joining)
            self.clones.pop(name, None)
            await self.memory.detach(hosted.server, hosted.image, name)
            if self.vms.network is not None:
                await self.vms.network.leave(name)
            raise
        self.vms.register(clone)  # from here on, its end undoes everything
        if joining is not None:
            try:
                await joining
            except SnowFlockError:
                await self._stop_vm(name)
                raise
            steps.done("network")
        self._introduce(clone, hosted, order)
        await clone.machine.resume()
        steps.done("cont")
        return clone

    def _open_nic(self, name: str, k: int, network: dict[str, Any] | None) -> Nic | None:
        """The clone's card on its family's network, if its parent has one."""
        if network is None:
            return None
        if self.vms.network is None:
            raise SystemFailure("the parent's VMs have network cards; this host gives none "
                                "(network = none)")  # fmt: skip
        member = int(network["base"]) + k
        isolated = bool(network.get("isolated"))
        return self.vms.network.open(name, int(network["family"]), member, isolated).nic

    def _introduce(self, clone: VM, hosted: HostedClone, order: CloneStart) -> None:
        domid = clone.machine.spec.domid
        # Its shares go into its own domain: its parent's is on the other host, where
        # on_share carries them.
        share = f"/local/domain/{domid}/{layout.share_dir(hosted.ticket, hosted.clone_id)}"
        identity = Identity(hosted.clone_id, order.family, hosted.ticket, domid,
                            order.parent_domid, self.link.host, hosted.owner_host,
                            share)  # fmt: skip
        network = self.vms.published_network(clone)
        local = self.vms.bus.local
        local.write(f"/local/domain/{domid}/{layout.IDENTITY}",
                    json.dumps(identity.to_json(network)).encode())  # fmt: skip
        local.mkdir(share)

    # What the clones say -------------------------------------------------------------

    def on_share(self, domid: int, ticket: str, clone_id: int, key: str) -> None:
        """A hosted clone finished storing key: carry it to its parent's host."""
        vm = next((v for v in self.vms.vms.values() if v.machine.spec.domid == domid), None)
        hosted = self.of(vm) if vm else None
        if hosted is None or (hosted.ticket, hosted.clone_id) != (ticket, clone_id):
            return
        base = f"/local/domain/{domid}/{layout.share_dir(ticket, clone_id)}/{key}"
        try:
            chunks = read_chunks(self.vms.bus.local.read, base)
        except (XenStoreError, ValueError) as e:
            log.warning("clone %s: unreadable share %s: %s", vm and vm.machine.spec.name, key, e)
            return
        self._notify(hosted, "share.put", ticket=ticket, id=clone_id, key=key,
                     chunks=[c.decode() for c in chunks])  # fmt: skip

    def exited(self, vm: VM, status: int) -> None:
        hosted = self.of(vm)
        if hosted is not None:
            hosted.exited, hosted.status = True, status

    async def ended(self, vm: VM) -> None:
        """A hosted clone's QEMU is gone: tell its parent's host how it ended (only
        now, so that sf-join returns when its clones are gone: their memory server
        no longer serves them, and the parent may change its image in place), unless
        the parent's host stopped it."""
        hosted = self.clones.pop(vm.machine.spec.name, None)
        if hosted is None:
            return
        await self.memory.detach(hosted.server, hosted.image, vm.machine.spec.name)
        if not hosted.exited or hosted.status is not None:
            state = "exited" if hosted.exited else "crashed"
            self._notify(hosted, "clone.ended", ticket=hosted.ticket, id=hosted.clone_id,
                         state=state, status=hosted.status)  # fmt: skip
        self._drop_descriptor_if_unused(hosted.checkpoint)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (a while) for the reports still on their way to parents' hosts."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    # Ends decided elsewhere ----------------------------------------------------------

    async def stop(self, names: list[str]) -> list[str]:
        """clone.stop: kill hosted clones (sf-kill, or their parent ended)."""
        found = [n for n in names if n in self.clones]
        for name in found:
            self.clones[name].exited, self.clones[name].status = True, None  # no report
        await asyncio.gather(*(self._stop_vm(n) for n in found))
        return found

    async def owners_dead(self, hosts: list[str]) -> None:
        """The master declared these hosts dead: their families' clones here end."""
        orphans = [n for n, h in self.clones.items() if h.owner_host in hosts]
        if orphans:
            log.warning("stopping clones whose parent's host died: %s", ", ".join(orphans))
            await self.stop(orphans)

    async def _stop_vm(self, name: str) -> None:
        with contextlib.suppress(SnowFlockError):
            await self.vms.stop(name)

    def _drop_descriptor_if_unused(self, key: str) -> None:
        if key in self.descriptors and not any(c.checkpoint == key for c in self.clones.values()):
            shutil.rmtree(self.descriptors.pop(key).dir, ignore_errors=True)

    def _notify(self, hosted: HostedClone, op: str, **args: Any) -> None:
        """Send in the background, after what this clone sent before: its shares must
        reach the parent before its exit does, or sf-join would return too early."""
        key = f"{hosted.ticket}-{hosted.clone_id}"
        before = self._last.get(key)
        task = asyncio.create_task(self._send(before, hosted.owner_address, op, args))
        self._last[key] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(functools.partial(self._forget_last, key))

    def _forget_last(self, key: str, task: asyncio.Task[None]) -> None:
        if self._last.get(key) is task:
            del self._last[key]

    async def _send(self, before: asyncio.Task[None] | None, address: str, op: str,
                    args: dict[str, Any]) -> None:  # fmt: skip
        if before is not None:
            await asyncio.wait([before])
        peer = self.link.peer(address, timeout=30)
        for attempt in range(NOTIFY_TRIES):
            try:
                await peer.call(op, **args)
                return
            except SnowFlockError as e:
                if attempt == NOTIFY_TRIES - 1:
                    log.warning("could not tell %s %s %s: %s", address, op, args.get("id"), e)
                    return
                await asyncio.sleep(1 + attempt)

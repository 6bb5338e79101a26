"""A ticket's clones on the parent's own host (DESIGN §5): each maps the checkpoint's
frozen image (or, with clone_memory = memtap, a memtap mount of it), gets its
card on the family network, is told who it is, and resumes with its reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from sflib.errors import NotFoundError, SnowFlockError
from sflib.fork import mechanics
from sflib.fork.checkpoint import Checkpoint
from sflib.fork.mechanics import CloneOrder
from sflib.fork.messages import Identity, clone_reply
from sflib.fork.network import CloneNetworks
from sflib.fork.requests import RequestQueue
from sflib.fork.steps import Steps
from sflib.fork.tickets import Clone, CloneState, Ticket, TicketState
from sflib.guest import layout
from sflib.memory.service import MemoryService
from sflib.sfld.vms import VM, VMTable

log = logging.getLogger(__name__)


class LocalClones:
    def __init__(self, vms: VMTable, requests: RequestQueue, here: str,
                 network: CloneNetworks | None, memory: MemoryService | None,
                 tapped: bool) -> None:  # fmt: skip
        self.vms = vms
        self.requests = requests
        self.here = here
        self.network = network
        self.memory = memory
        self.tap_local = tapped  # this host's clones map their memory through memtap
        self.tapped: dict[str, tuple[str, str]] = {}  # clone VM -> (server, image) it maps
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, parent: VM, ckpt: Checkpoint, ticket: Ticket, k: int,
                    reply: dict[str, Any]) -> None:  # fmt: skip
        """Clone k of ticket, here; in the ticket's record as running, or as crashed
        if it did not start. Never raises."""
        name = f"{ticket.id}-{k}"
        steps = Steps()
        plugging: asyncio.Task[None] | None = None
        try:
            nic = self.network.open(parent, name, ticket.net_base + k) if self.network else None
            steps.done("card")
            if self.network is not None and nic is not None:  # while its QEMU starts
                plugging = asyncio.create_task(self.network.plug(name))
            order = CloneOrder(name, k, parent.machine.spec.name, await self._tap(ckpt, name),
                               nic, steps)  # fmt: skip
            clone = await mechanics.restore_clone(self.vms, parent.machine.qemu, ckpt, order)
        except BaseException as e:
            await mechanics.finished(plugging)
            await self.untap(name)
            if self.network is not None:
                await self.network.unplug(name)
            if not isinstance(e, SnowFlockError):
                raise
            log.warning("clone %d of ticket %s did not start: %s", k, ticket.id, e)
            ticket.clones[k] = Clone(k, name, CloneState.CRASHED)
            return
        ticket.clones[k] = Clone(k, name)
        self.vms.register(clone)
        if ticket.state == TicketState.ENDED:  # killed while we were cloning
            await mechanics.finished(plugging)  # its end unplugs it
            ticket.clones[k].state = CloneState.KILLED
            self.stop_soon(name)
            return
        try:
            if plugging is not None:
                await plugging
                steps.done("network")
        except SnowFlockError as e:
            log.warning("clone %d of ticket %s has no network: %s", k, ticket.id, e)
            ticket.clones[k].state = CloneState.CRASHED
            self.stop_soon(name)
            return
        self._introduce(parent, clone, ticket, k)
        await clone.machine.resume()
        steps.done("cont")
        self.requests.answer(clone.machine.spec.domid, ckpt.rid, clone_reply(k, reply))
        log.info("clone %d of ticket %s running", k, ticket.id)
        log.debug("clone %d of ticket %s: its start: %s", k, ticket.id, steps)

    async def _tap(self, ckpt: Checkpoint, name: str) -> Path | None:
        """The memtap file clone name maps, or None to map the frozen image itself."""
        if self.memory is None or not self.tap_local:
            return None
        server, image = await self.memory.export(), ckpt.image.path.name
        self.tapped[name] = (server, image)
        return await self.memory.attach(server, image, name)

    async def untap(self, name: str) -> None:
        if self.memory is not None and name in self.tapped:
            await self.memory.detach(*self.tapped.pop(name), name)

    def _introduce(self, parent: VM, clone: VM, ticket: Ticket, k: int) -> None:
        """Tell a clone who it is, and give it its corner of the family's share."""
        parent_domid, domid = parent.machine.spec.domid, clone.machine.spec.domid
        corner = f"/local/domain/{parent_domid}/{layout.share_dir(ticket.id, k)}"
        identity = Identity(k, parent.machine.spec.name, ticket.id, domid, parent_domid,
                            self.here, self.here, corner)  # fmt: skip
        local = self.vms.bus.local
        network = self.vms.published_network(clone)
        local.write(f"/local/domain/{domid}/{layout.IDENTITY}",
                    json.dumps(identity.to_json(network)).encode())  # fmt: skip
        local.mkdir(corner)
        # What the clone writes there is its own, readable and removable by the parent.
        local.set_perms(corner, [f"n{parent_domid}", f"b{domid}", f"b{parent_domid}"])

    def stop_soon(self, name: str) -> None:
        task = asyncio.create_task(self.stop(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.vms.stop(name)

"""The calls of the API (DESIGN §1), as sfld carries them out for a VM: one method
per op of sflib.guest.layout, each checking its arguments and the VM's right to the
call before acting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sflib.cluster.link import ClusterLink
from sflib.errors import NotFoundError, UsageError, WrongStateError
from sflib.fork import mechanics
from sflib.fork.checkpoint import Checkpoint
from sflib.fork.hosted import HostedClones
from sflib.fork.lifecycle import TicketLife
from sflib.fork.local import LocalClones
from sflib.fork.messages import clone_reply
from sflib.fork.network import CloneNetworks
from sflib.fork.remote import RemoteClones
from sflib.fork.requests import NO_REPLY, Handler, RequestQueue
from sflib.fork.standby import Standbys
from sflib.fork.steps import Steps
from sflib.fork.tickets import CloneState, Ticket, TicketState
from sflib.guest import freepages, layout
from sflib.guest.share import read_chunks
from sflib.sfld.vms import VM, VMTable
from sflib.xenstore.wire import XenStoreError

log = logging.getLogger(__name__)


class Calls:
    def __init__(self, vms: VMTable, life: TicketLife, local: LocalClones,
                 requests: RequestQueue, remote: RemoteClones | None, hosted: HostedClones | None,
                 network: CloneNetworks | None, cluster: ClusterLink | None,
                 checkpoint_dir: Path, standbys: Standbys) -> None:  # fmt: skip
        self.vms = vms
        self.standbys = standbys
        self.checkpoint_dir = checkpoint_dir
        self.life = life
        self.book = life.book
        self.joining: set[str] = set()  # tickets an sf-join waits for: one join each
        self.local = local
        self.remote = remote
        self.hosted = hosted
        self.network = network
        self.cluster = cluster
        self.here = cluster.host if cluster else str(vms.settings["host_name"])
        self.requests = requests
        self.busy: set[str] = set()  # VMs with a checkpoint in flight
        self._serial = 0

    def table(self) -> dict[str, Handler]:
        """The handler of each op (RequestQueue.serve)."""
        return {"ticket": self.ticket, "clone": self.clone, "checkpoint": self.checkpoint,
                "create_clones": self.create_clones, "exit": self.exit, "join": self.join,
                "kill": self.kill, "link": self.link}  # fmt: skip

    async def ticket(self, vm: VM, request: layout.Request) -> Any:
        n = _int(request.args, "n")
        name = vm.machine.spec.name
        if self.cluster is None:
            ticket = self.book.grant(name, n)
        else:
            granted = await self.cluster.grant(name, n)
            ticket = self.book.adopt(Ticket(granted["ticket"], name, n, granted["granted"],
                                            placement=granted["placement"],
                                            addresses=granted["addresses"]))  # fmt: skip
        self.life.granted(ticket)
        if self.network is not None:
            self.network.prepare(vm, ticket)  # off the clone's path: sf-clone comes later
        if self.remote is not None:
            self.remote.prepare(ticket)
        return {"ticket": ticket.id, "granted": ticket.granted, "requested": ticket.requested}

    async def clone(self, vm: VM, request: layout.Request) -> Any:
        started = time.perf_counter()
        free = self._free_report(vm, request)  # first: gone even if the clone is refused
        ticket = self.book.usable(_str(request.args, "ticket"), vm.machine.spec.name)
        async with self._forking(vm):  # only the checkpoint: its clones start after
            log.info("%s: forking for ticket %s", vm.machine.spec.name, ticket.id)
            ckpt = await self._checkpoint(vm, request.rid, named=False, free=free)
        self.life.checkpoints[ckpt.id] = ckpt
        ticket.pause_ms, ticket.checkpoint = ckpt.pause_ms, ckpt.id
        self.requests.answer(vm.machine.spec.domid, request.rid, clone_reply(0))
        log.debug("%s: sf-clone answered %.1f ms after its request", vm.machine.spec.name,
                  (time.perf_counter() - started) * 1000)  # fmt: skip
        await self._spawn(vm, ckpt, ticket, {})
        self.standbys.prepare(vm)  # for the next fork, once this one's clones started
        return NO_REPLY

    async def checkpoint(self, vm: VM, request: layout.Request) -> Any:
        free = self._free_report(vm, request)
        async with self._forking(vm):
            ckpt = await self._checkpoint(vm, request.rid, named=True, free=free)
        self.life.checkpoints[ckpt.id] = ckpt
        self.standbys.prepare(vm)
        await ckpt.ready()
        ckpt.write_manifest()
        return clone_reply(0, {"checkpoint": ckpt.id})

    async def create_clones(self, vm: VM, request: layout.Request) -> Any:
        ckpt = self.life.checkpoints.get(_str(request.args, "checkpoint"))
        if ckpt is None or not ckpt.named or ckpt.owner != vm.machine.spec.name:
            raise NotFoundError(f"no checkpoint {request.args['checkpoint']}")
        ticket = self.book.usable(_str(request.args, "ticket"), vm.machine.spec.name)
        await self._spawn(vm, ckpt, ticket, {"checkpoint": ckpt.id})
        return clone_reply(0, {"clones": len(ticket.clones)})

    async def exit(self, vm: VM, request: layout.Request) -> Any:
        status = _int(request.args, "status", low=0, high=255)
        if self.hosted is not None and self.hosted.of(vm) is not None:
            self.hosted.exited(vm, status)  # its parent's host keeps the ticket
        else:
            ticket, clone_id = self._clone_of(vm, "sf-exit")
            clone = ticket.clones[clone_id]
            clone.state, clone.status = CloneState.EXITED, status
        asyncio.get_running_loop().call_later(0.05, self.local.stop_soon, vm.machine.spec.name)
        return {"status": status}

    async def join(self, vm: VM, request: layout.Request) -> Any:
        ticket = self._ended_by_parent(vm, request, "sf-join")
        if ticket.id in self.joining:  # as waitpid: one waiter gets the statuses
            raise WrongStateError(f"ticket {ticket.id} was already joined or killed")
        self.joining.add(ticket.id)
        try:
            await self.life.finished[ticket.id].wait()
            await self.life.end(ticket)
        finally:
            self.joining.discard(ticket.id)
        return ticket.to_json()

    async def kill(self, vm: VM, request: layout.Request) -> Any:
        ticket = self._ended_by_parent(vm, request, "sf-kill", unused_ok=True)
        await self.life.kill_running(ticket)
        await self.life.end(ticket)
        return ticket.to_json()

    async def link(self, vm: VM, request: layout.Request) -> Any:
        """A clone's hook took its identity: its card may talk now."""
        up = request.args.get("up", True)
        if not isinstance(up, bool):
            raise UsageError("up must be true or false")
        net = self.vms.network
        member = net.members.get(vm.machine.spec.name) if net is not None else None
        return await CloneNetworks.link(vm, member is not None and member.isolated, up)

    # Helpers --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _forking(self, vm: VM) -> AsyncIterator[None]:
        name = vm.machine.spec.name
        if name in self.busy:
            raise WrongStateError(f"a clone or checkpoint of {name} is already in flight")
        self.busy.add(name)
        try:
            yield
        finally:
            self.busy.discard(name)

    def _free_report(self, vm: VM, request: layout.Request) -> list[tuple[int, int]]:
        """The page runs the guest reported free with request; the report is removed
        either way, so that no checkpoint carries it."""
        key = request.args.get("freepages")
        if not isinstance(key, str) or not layout.FREEPAGES_KEY.match(key):
            return []
        base = f"/local/domain/{vm.machine.spec.domid}/{key}"
        try:
            return freepages.decode(read_chunks(self.vms.bus.local.read, base))
        except (XenStoreError, ValueError) as e:
            log.warning("%s: free-page report ignored: %s", vm.machine.spec.name, e)
            return []
        finally:
            with contextlib.suppress(XenStoreError):
                self.vms.bus.local.rm(base)

    async def _checkpoint(self, vm: VM, rid: str, named: bool,
                          free: list[tuple[int, int]]) -> Checkpoint:  # fmt: skip
        self._serial += 1
        ckpt_id = f"{'c' if named else 'k'}{self._serial}-{secrets.token_hex(3)}"
        ckpt = await mechanics.checkpoint_parent(self.vms, vm, ckpt_id, named,
                                                 self.checkpoint_dir / ckpt_id,
                                                 free, self.standbys)  # fmt: skip
        ckpt.rid = rid
        log.info("%s paused %.1f ms for checkpoint %s (%d free pages)", vm.machine.spec.name,
                 ckpt.pause_ms, ckpt.id, sum(count for _, count in free))  # fmt: skip
        return ckpt

    async def _spawn(self, parent: VM, ckpt: Checkpoint, ticket: Ticket,
                     reply: dict[str, Any]) -> None:  # fmt: skip
        """Start ticket's clones here and on the hosts the master chose, side by side."""
        with self.life.spawning(ticket):
            await self._start_clones(parent, ckpt, ticket, reply)
        if ticket.state != TicketState.ENDED:
            ticket.state = TicketState.ACTIVE
        self.life.check_finished(ticket)

    async def _start_clones(self, parent: VM, ckpt: Checkpoint, ticket: Ticket,
                            reply: dict[str, Any]) -> None:  # fmt: skip
        ticket.state = TicketState.CLONING
        started = time.perf_counter()
        steps = Steps()
        await ckpt.ready()
        steps.done("free map")
        ids = ticket.ids_by_host(self.here)
        network = await self.network.plan(parent, ticket, ids) if self.network else None
        steps.done("network")
        log.debug("ticket %s: before its clones start: %s", ticket.id, steps)
        remote = None
        if self.remote is not None and set(ids) - {self.here}:
            remote = asyncio.create_task(self.remote.spawn(
                ticket, ckpt, parent.machine.spec.domid, parent.machine.spec.name, reply, ids,
                started, network))  # fmt: skip

        async def start_here(k: int) -> None:
            await self.local.start(parent, ckpt, ticket, k, reply)
            if ticket.clones[k].state == CloneState.RUNNING:
                ticket.clones[k].ready_ms = _ms_since(started)

        await asyncio.gather(*(start_here(k) for k in ids.get(self.here, [])),
                             *([remote] if remote is not None else []))  # fmt: skip

    def _clone_of(self, vm: VM, tool: str) -> tuple[Ticket, int]:
        if vm.clone_id is None:
            raise WrongStateError(f"{tool} is for clones; {vm.machine.spec.name} is a parent")
        ticket = self.book.tickets.get(vm.machine.spec.name.rsplit("-", 1)[0])
        if ticket is None or vm.clone_id not in ticket.clones:
            raise WrongStateError(f"{vm.machine.spec.name} is no longer part of a ticket")
        return ticket, vm.clone_id

    def _ended_by_parent(self, vm: VM, request: layout.Request, tool: str,
                         unused_ok: bool = False) -> Ticket:  # fmt: skip
        """The ticket, if vm holds it and may end it now."""
        ticket_id = _str(request.args, "ticket")
        try:
            ticket = self.book.get(ticket_id, vm.machine.spec.name)
        except NotFoundError:
            if vm.machine.spec.name.startswith(f"{ticket_id}-"):  # a clone of that ticket
                message = f"{tool} is for the parent; this is clone {vm.clone_id}"
                raise WrongStateError(message) from None
            raise
        if ticket.state == TicketState.GRANTED and not unused_ok:
            raise WrongStateError(f"ticket {ticket.id} has no clones yet")
        if ticket.state == TicketState.ENDED:
            raise WrongStateError(f"ticket {ticket.id} was already joined or killed")
        return ticket


def _int(args: dict[str, Any], key: str, low: int = -(2**31), high: int = 2**31) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{key} must be an integer from {low} to {high}")
    return value


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key} is required")
    return value


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)

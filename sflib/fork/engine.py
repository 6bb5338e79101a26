"""sfld's side of the API: takes requests off the guests' XenStore subtrees and
carries them out (DESIGN §5), one task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sflib.cluster.link import ClusterLink
from sflib.errors import NotFoundError, SnowFlockError, SystemFailure, UsageError, WrongStateError
from sflib.fork import freepages, layout, mechanics
from sflib.fork.checkpoint import Checkpoint
from sflib.fork.hosted import HostedClones
from sflib.fork.mechanics import CloneOrder
from sflib.fork.network import CloneNetworks
from sflib.fork.remote import RemoteClones
from sflib.fork.share import read_chunks
from sflib.fork.tickets import Clone, CloneState, Ticket, TicketBook, TicketState
from sflib.memory.service import MemoryService
from sflib.sfld.vms import VM, VMTable
from sflib.xenstore.wire import XenStoreError

log = logging.getLogger(__name__)

NO_REPLY = object()  # the handler answered by itself


class ForkEngine:
    def __init__(self, vms: VMTable, max_clones: int, state_dir: Path,
                 memory: MemoryService | None = None, tapped: bool = False,
                 cluster: ClusterLink | None = None) -> None:  # fmt: skip
        self.vms = vms
        self.memory = memory
        self.tap_local = tapped  # this host's clones map their memory through memtap
        self.bus = vms.bus
        self.book = TicketBook(max_clones)
        self.checkpoints: dict[str, Checkpoint] = {}
        self.checkpoint_dir = state_dir / "checkpoints"
        self.busy: set[str] = set()  # VMs with a fork in flight
        self.finished: dict[str, asyncio.Event] = {}  # per ticket: all clones ended
        self._tasks: set[asyncio.Task[None]] = set()
        self._serial = 0
        self.tapped: dict[str, tuple[str, str]] = {}  # clone VM -> (server, image) it maps
        self.cluster = cluster
        self.here = cluster.host if cluster else "local"
        self.remote: RemoteClones | None = None
        self.hosted: HostedClones | None = None
        if cluster is not None and memory is not None:
            self.remote = RemoteClones(self.book, self.bus, memory, cluster)
            self.hosted = HostedClones(vms, memory, cluster, vms.settings["qemu"],
                                       self.checkpoint_dir)  # fmt: skip
            cluster.on_dead = self._hosts_dead
            cluster.on_revoked = self._tickets_revoked
        self.network = (CloneNetworks(vms.network, self.book, cluster, self.here)
                        if vms.network is not None else None)  # fmt: skip
        vms.on_end.append(self._vm_ended)
        self.bus.local.watch("/local/domain", b"sf-requests", self._on_event)

    # Plumbing ---------------------------------------------------------------

    def _on_event(self, path: str, _token: bytes) -> None:
        shared = layout.parse_share_done(path)
        if shared is not None and self.hosted is not None:
            self.hosted.on_share(*shared)
            return
        parsed = layout.parse_request_path(path)
        if parsed is None:
            return
        try:
            raw = self.bus.local.read(path)
        except XenStoreError:
            return  # our own removal of a request fires this watch again
        self.bus.local.rm(path)  # before acting, so that no clone inherits it
        task = asyncio.create_task(self._serve(*parsed, raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, domid: int, rid: str, raw: bytes) -> None:
        vm = next((v for v in self.vms.vms.values() if v.machine.spec.domid == domid), None)
        if vm is None:
            log.warning("request from domain %d, which is no VM of ours", domid)
            return
        try:
            request = layout.decode_request(domid, rid, raw)
            log.info("%s: %s %s", vm.machine.spec.name, request.op, request.args)
            result = await self._dispatch(vm, request)
        except SnowFlockError as e:
            log.info("%s: refused: %s", vm.machine.spec.name, e)
            self._reply(domid, rid, layout.encode_error(e))
            return
        except Exception as e:  # the daemon must survive a bug in one request
            log.exception("request %s of %s failed", rid, vm.machine.spec.name)
            self._reply(domid, rid, layout.encode_error(SystemFailure(f"sfld: {e}")))
            return
        if result is not NO_REPLY:
            self._reply(domid, rid, layout.encode_result(result))

    def _reply(self, domid: int, rid: str, data: bytes) -> None:
        with contextlib.suppress(XenStoreError):  # the domain may be gone
            self.bus.local.write(f"/local/domain/{domid}/{layout.reply_key(rid)}", data)

    async def _dispatch(self, vm: VM, request: layout.Request) -> Any:
        handler = getattr(self, f"_op_{request.op}")
        return await handler(vm, request)

    # The seven calls ------------------------------------------------------------

    async def _op_ticket(self, vm: VM, request: layout.Request) -> Any:
        n = _int(request.args, "n")
        if self.cluster is None:
            ticket = self.book.grant(vm.machine.spec.name, n)
        else:
            granted = await self.cluster.grant(vm.machine.spec.name, n)
            ticket = self.book.adopt(Ticket(granted["ticket"], vm.machine.spec.name, n,
                                            granted["granted"], placement=granted["placement"],
                                            addresses=granted["addresses"]))  # fmt: skip
        self.finished[ticket.id] = asyncio.Event()
        return {"ticket": ticket.id, "granted": ticket.granted, "requested": ticket.requested}

    async def _op_clone(self, vm: VM, request: layout.Request) -> Any:
        free = self._free_report(vm, request)  # first: gone even if the clone is refused
        ticket = self.book.usable(_str(request.args, "ticket"), vm.machine.spec.name)
        async with self._forking(vm):  # only the checkpoint: its clones start after
            ckpt = await self._checkpoint(vm, request.rid, named=False, free=free)
        self.checkpoints[ckpt.id] = ckpt
        ticket.pause_ms, ticket.checkpoint = ckpt.pause_ms, ckpt.id
        self._reply(vm.machine.spec.domid, request.rid, layout.encode_result(_reply(0)))
        await self._spawn(vm, ckpt, ticket, {})
        return NO_REPLY

    async def _op_checkpoint(self, vm: VM, request: layout.Request) -> Any:
        free = self._free_report(vm, request)
        async with self._forking(vm):
            ckpt = await self._checkpoint(vm, request.rid, named=True, free=free)
        self.checkpoints[ckpt.id] = ckpt
        await ckpt.ready()
        ckpt.write_manifest()
        return {"checkpoint": ckpt.id, **_reply(0)}

    async def _op_create_clones(self, vm: VM, request: layout.Request) -> Any:
        ckpt = self.checkpoints.get(_str(request.args, "checkpoint"))
        if ckpt is None or not ckpt.named or ckpt.owner != vm.machine.spec.name:
            raise NotFoundError(f"no checkpoint {request.args['checkpoint']}")
        ticket = self.book.usable(_str(request.args, "ticket"), vm.machine.spec.name)
        await self._spawn(vm, ckpt, ticket, {"checkpoint": ckpt.id})
        return {"clones": len(ticket.clones), **_reply(0)}

    async def _op_exit(self, vm: VM, request: layout.Request) -> Any:
        if self.hosted is not None and self.hosted.of(vm) is not None:
            status = _int(request.args, "status", low=0, high=255)
            self.hosted.exited(vm, status)  # its parent's host keeps the ticket
        else:
            ticket, clone_id = self._clone_of(vm, "sf-exit")
            status = _int(request.args, "status", low=0, high=255)
            clone = ticket.clones[clone_id]
            clone.state, clone.status = CloneState.EXITED, status
        asyncio.get_running_loop().call_later(0.05, self._stop_soon, vm.machine.spec.name)
        return {"status": status}

    async def _op_join(self, vm: VM, request: layout.Request) -> Any:
        ticket = self._ended_by_parent(vm, request, "sf-join")
        await self.finished[ticket.id].wait()
        await self._end(ticket)
        return ticket.to_json()

    async def _op_kill(self, vm: VM, request: layout.Request) -> Any:
        ticket = self._ended_by_parent(vm, request, "sf-kill", unused_ok=True)
        running = [c for c in ticket.clones.values() if c.state == CloneState.RUNNING]
        for clone in running:
            clone.state = CloneState.KILLED
        await asyncio.gather(*(self._stop_vm(c.vm) for c in running if c.host is None),
                             self._stop_remote(ticket, running))  # fmt: skip
        await self._end(ticket)
        return ticket.to_json()

    async def _end(self, ticket: Ticket) -> None:
        self.book.end(ticket)
        self._drop_checkpoints_of(ticket)
        if self.cluster is not None:
            await self.cluster.release(ticket.id)

    async def _stop_remote(self, ticket: Ticket, clones: list[Clone]) -> None:
        if self.remote is not None:
            await self.remote.stop(ticket, clones)

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
            return freepages.decode(read_chunks(self.bus.local.read, base))
        except (XenStoreError, ValueError) as e:
            log.warning("%s: free-page report ignored: %s", vm.machine.spec.name, e)
            return []
        finally:
            with contextlib.suppress(XenStoreError):
                self.bus.local.rm(base)

    async def _checkpoint(self, vm: VM, rid: str, named: bool,
                          free: list[tuple[int, int]]) -> Checkpoint:  # fmt: skip
        self._serial += 1
        ckpt_id = f"{'c' if named else 'k'}{self._serial}-{secrets.token_hex(3)}"
        ckpt = await mechanics.checkpoint_parent(self.vms, vm, ckpt_id, named,
                                                 self.checkpoint_dir / ckpt_id, free)  # fmt: skip
        ckpt.rid = rid
        log.info("%s paused %.1f ms for checkpoint %s", vm.machine.spec.name, ckpt.pause_ms,
                 ckpt.id)  # fmt: skip
        return ckpt

    async def _spawn(self, parent: VM, ckpt: Checkpoint, ticket: Ticket,
                     reply: dict[str, Any]) -> None:  # fmt: skip
        """Start ticket's clones here and on the hosts the master chose."""
        ticket.state = TicketState.CLONING
        started = time.perf_counter()
        await ckpt.ready()
        ids = ticket.ids_by_host(self.here)
        network = await self.network.plan(parent, ticket, ids) if self.network else None
        remote = None
        if self.remote is not None and set(ids) - {self.here}:
            remote = asyncio.create_task(self.remote.spawn(
                ticket, ckpt, parent.machine.spec.domid, parent.machine.spec.name, reply, ids,
                started, network))  # fmt: skip
        for k in ids.get(self.here, []):
            await self._spawn_here(parent, ckpt, ticket, k, reply)
            if ticket.clones[k].state == CloneState.RUNNING:
                ticket.clones[k].ready_ms = _ms_since(started)
        if remote is not None:
            await remote
        if ticket.state != TicketState.ENDED:
            ticket.state = TicketState.ACTIVE
        self._check_finished(ticket)

    async def _spawn_here(self, parent: VM, ckpt: Checkpoint, ticket: Ticket, k: int,
                          reply: dict[str, Any]) -> None:  # fmt: skip
        name = f"{ticket.id}-{k}"
        try:
            nic = self.network.open(parent, name, ticket.net_base + k) if self.network else None
            order = CloneOrder(name, k, parent.machine.spec.name, await self._tap(ckpt, name),
                               nic)  # fmt: skip
            clone = await mechanics.restore_clone(self.vms, parent.machine.qemu, ckpt, order)
        except SnowFlockError as e:
            log.warning("clone %d of ticket %s did not start: %s", k, ticket.id, e)
            await self._untap(name)
            if self.network is not None:
                await self.network.unplug(name)
            ticket.clones[k] = _crashed(k, name)
            return
        ticket.clones[k] = _running(k, name)
        self.vms.register(clone)
        if ticket.state == TicketState.ENDED:  # killed while we were cloning
            ticket.clones[k].state = CloneState.KILLED
            self._stop_soon(name)
            return
        try:
            if self.network is not None:
                await self.network.plug(name)
        except SnowFlockError as e:
            log.warning("clone %d of ticket %s has no network: %s", k, ticket.id, e)
            ticket.clones[k].state = CloneState.CRASHED
            self._stop_soon(name)
            return
        self._introduce(parent, clone, ticket, k)
        await clone.machine.resume()
        answer = layout.encode_result({**reply, **_reply(k)})
        self._reply(clone.machine.spec.domid, ckpt.rid, answer)
        log.info("clone %d of ticket %s running", k, ticket.id)

    async def _tap(self, ckpt: Checkpoint, name: str) -> Path | None:
        """The memtap file clone name maps, or None to map the frozen image itself."""
        if self.memory is None or not self.tap_local:
            return None
        server, image = await self.memory.export(), ckpt.image.path.name
        self.tapped[name] = (server, image)
        return await self.memory.attach(server, image, name)

    async def _untap(self, name: str) -> None:
        if self.memory is not None and name in self.tapped:
            await self.memory.detach(*self.tapped.pop(name), name)

    async def _op_link(self, vm: VM, request: layout.Request) -> Any:
        """A clone's hook took its identity: its card may talk now."""
        up = request.args.get("up", True)
        if not isinstance(up, bool):
            raise UsageError("up must be true or false")
        member = self.vms.network.members.get(vm.machine.spec.name) if self.vms.network else None
        return await CloneNetworks.link(vm, member is not None and member.isolated, up)

    def _introduce(self, parent: VM, clone: VM, ticket: Ticket, k: int) -> None:
        """Tell a clone who it is, and give it its corner of the family's share."""
        parent_domid, domid = parent.machine.spec.domid, clone.machine.spec.domid
        identity = {"id": k, "family": parent.machine.spec.name, "ticket": ticket.id,
                    "parent_domid": parent_domid, "domid": domid}  # fmt: skip
        local = self.bus.local
        network = self.vms.published_network(clone)
        identity.update(network or {})
        local.write(f"/local/domain/{domid}/{layout.IDENTITY}", json.dumps(identity).encode())
        corner = f"/local/domain/{parent_domid}/{layout.share_dir(ticket.id, k)}"
        local.mkdir(corner)
        # What the clone writes there is its own, readable and removable by the parent.
        local.set_perms(corner, [f"n{parent_domid}", f"b{domid}", f"b{parent_domid}"])

    def _clone_of(self, vm: VM, tool: str) -> tuple[Ticket, int]:
        if vm.clone_id is None:
            raise WrongStateError(f"{tool} is for clones; {vm.machine.spec.name} is a parent")
        ticket = self.book.tickets.get(vm.machine.spec.name.rsplit("-", 1)[0])
        if ticket is None or vm.clone_id not in ticket.clones:
            raise WrongStateError(f"{vm.machine.spec.name} is no longer part of a ticket")
        return ticket, vm.clone_id

    def _ended_by_parent(
        self, vm: VM, request: layout.Request, tool: str, unused_ok: bool = False
    ) -> Ticket:
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

    def _stop_soon(self, name: str) -> None:
        task = asyncio.create_task(self._stop_vm(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_vm(self, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.vms.stop(name)

    async def _vm_ended(self, vm: VM) -> None:
        name = vm.machine.spec.name
        self.busy.discard(name)
        await self._untap(name)
        if self.network is not None and vm.network is not None:
            self.network.forget(vm.network)
        if self.hosted is not None and self.hosted.of(vm) is not None:
            await self.hosted.ended(vm)
        elif vm.clone_id is not None:
            ticket = self.book.tickets.get(name.rsplit("-", 1)[0])
            if ticket is not None and vm.clone_id in ticket.clones:
                clone = ticket.clones[vm.clone_id]
                if clone.state == CloneState.RUNNING:
                    clone.state = CloneState.CRASHED
                    log.warning("clone %d of ticket %s ended without sf-exit", clone.id, ticket.id)
                self._check_finished(ticket)
        for ticket in self.book.of_owner(name):  # a parent gone takes its family along
            if ticket.state != TicketState.ENDED:
                running = [c for c in ticket.clones.values() if c.state == CloneState.RUNNING]
                for clone in running:
                    clone.state = CloneState.KILLED
                    if clone.host is None:
                        self._stop_soon(clone.vm)
                await self._stop_remote(ticket, running)
                self.book.end(ticket)
                if self.cluster is not None:
                    await self.cluster.release(ticket.id)
                self.finished[ticket.id].set()
        for ckpt in [c for c in self.checkpoints.values() if c.owner == name]:
            self.checkpoints.pop(ckpt.id).remove()

    def _check_finished(self, ticket: Ticket) -> None:
        if ticket.state == TicketState.ACTIVE and ticket.finished:
            self.finished[ticket.id].set()

    def _drop_checkpoints_of(self, ticket: Ticket) -> None:
        ckpt = self.checkpoints.get(ticket.checkpoint or "")
        if ckpt is not None and not ckpt.named:
            self.checkpoints.pop(ckpt.id).remove()

    # Calls from other hosts' sflds (sflib.cluster.wire) -----------------------------

    async def peer_dispatch(self, op: str, args: dict[str, Any]) -> Any:
        if self.remote is None or self.hosted is None:
            raise UsageError("this sfld is not part of a cluster")
        if op == "clone.start":
            return await self.hosted.start(args, self._reply_result)
        if op == "clone.stop":
            return await self.hosted.stop([str(n) for n in args.get("names", [])])
        if op == "clone.ended":
            self._check_finished(self.remote.ended(args))
            return {}
        if op == "net.connect":
            if self.vms.network is not None:
                await self.vms.network.connect(int(args["family"]),
                                               [str(p) for p in args["peers"]])  # fmt: skip
            return {}
        if op == "share.put":
            self.remote.share(args, self._parent_domid(args))
            return {}
        raise UsageError(f"unknown request {op!r}")

    def _parent_domid(self, args: dict[str, Any]) -> int:
        ticket = self.book.tickets.get(str(args.get("ticket")))
        parent = self.vms.vms.get(ticket.owner) if ticket else None
        if parent is None:
            raise NotFoundError(f"no parent of ticket {args.get('ticket')} here")
        return parent.machine.spec.domid

    def _reply_result(self, domid: int, rid: str, result: Any) -> None:
        self._reply(domid, rid, layout.encode_result(result))

    async def _tickets_revoked(self, ids: list[str]) -> None:
        """The master ended these tickets (their Slurm job was cancelled or preempted):
        their clones are killed, and sf-join reports them so."""
        for ticket in [self.book.tickets[i] for i in ids if i in self.book.tickets]:
            if ticket.state == TicketState.ENDED:
                continue
            running = [c for c in ticket.clones.values() if c.state == CloneState.RUNNING]
            for clone in running:
                clone.state = CloneState.KILLED
            ticket.revoked = True
            await asyncio.gather(*(self._stop_vm(c.vm) for c in running if c.host is None),
                                 self._stop_remote(ticket, running))  # fmt: skip
            if ticket.state == TicketState.GRANTED:  # no clones yet: none will come
                ticket.state = TicketState.ACTIVE
            self._check_finished(ticket)

    async def _hosts_dead(self, hosts: list[str]) -> None:
        if self.remote is not None:
            for ticket in self.remote.hosts_dead(hosts):
                self._check_finished(ticket)
        if self.hosted is not None:
            await self.hosted.owners_dead(hosts)

    # For sf-vm --------------------------------------------------------------------

    def list_checkpoints(self) -> list[dict[str, Any]]:
        return [{"checkpoint": c.id, "owner": c.owner, "created": c.created,
                 "pause_ms": c.pause_ms, "memory": str(c.image.path)}
                for c in self.checkpoints.values() if c.named]  # fmt: skip

    def list_tickets(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.book.tickets.values()]


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


def _reply(clone_id: int) -> dict[str, Any]:
    """What sf-clone returns in a VM: its ID, and a seed of its own that the guest
    mixes into its kernel's RNG at once (vmgenid reseeds it too, a little later)."""
    return {"id": clone_id, "seed": secrets.token_hex(32)}


def _running(k: int, name: str) -> Clone:
    return Clone(k, name)


def _crashed(k: int, name: str) -> Clone:
    return Clone(k, name, CloneState.CRASHED)

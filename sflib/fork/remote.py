"""The parent's side of clones on other hosts (DESIGN §5): ship the descriptor and
the memory server's address to each chosen host's sfld, and keep the ticket's
record of those clones as the hosts report on them (clone.ended, share.put), or
as the master declares their hosts dead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from sflib.cluster.link import ClusterLink
from sflib.errors import NotFoundError, SnowFlockError, UsageError
from sflib.fork.checkpoint import Checkpoint
from sflib.fork.messages import START, CloneStart
from sflib.fork.tickets import Clone, CloneState, Ticket, TicketBook
from sflib.guest import layout
from sflib.memory.service import MemoryService
from sflib.xenstore.server import XenStoreServer

log = logging.getLogger(__name__)


class RemoteClones:
    def __init__(self, book: TicketBook, bus: XenStoreServer, memory: MemoryService,
                 link: ClusterLink) -> None:  # fmt: skip
        self.book = book
        self.bus = bus
        self.memory = memory
        self.link = link
        self._exporting: set[asyncio.Task[None]] = set()

    def prepare(self, ticket: Ticket) -> None:
        """Just granted: where the ticket placed clones on other hosts, have this
        host's memory server up before sf-clone (it starts with the first)."""
        if any(n for host, n in ticket.placement.items() if host != self.link.host):
            task = asyncio.get_running_loop().create_task(self._export())
            self._exporting.add(task)  # held until done: the loop keeps weak references
            task.add_done_callback(self._exporting.discard)

    async def _export(self) -> None:
        try:
            await self.memory.export()
        except SnowFlockError as e:  # spawn tries again, and says so
            log.warning("memory server not started: %s", e)

    async def spawn(self, ticket: Ticket, ckpt: Checkpoint, parent_domid: int, family: str,
                    reply: dict[str, Any], ids: dict[str, list[int]], started: float,
                    network: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Start ticket's clones on the other hosts of ids (network: their family
        network, see FamilyNetworks); a host that fails marks its clones crashed.
        Never raises."""
        exporting = time.perf_counter()
        server = await self.memory.export()
        log.debug("ticket %s: memory server ready in %.1f ms", ticket.id,
                  (time.perf_counter() - exporting) * 1000)  # fmt: skip
        order = CloneStart(ticket=ticket.id, ids=[], family=family, parent_domid=parent_domid,
                           owner_host=self.link.host, owner_address=self.link.address,
                           rid=ckpt.rid, reply=reply, manifest=ckpt.manifest(),
                           devstate=ckpt.devstate.read_bytes(), memserver=server,
                           image=ckpt.image.path.name, network=network)  # fmt: skip
        hosts = [h for h in ids if h != self.link.host]
        for host in hosts:
            for k in ids[host]:  # in the record before any report on them can come
                ticket.clones[k] = Clone(k, f"{ticket.id}-{k}", host=host)
                self._share_corner(parent_domid, ticket.id, k)
        await asyncio.gather(*(self._spawn_on(ticket, h, dataclasses.replace(order, ids=ids[h]),
                                              started) for h in hosts))  # fmt: skip

    async def _spawn_on(self, ticket: Ticket, host: str, order: CloneStart,
                        started: float) -> None:  # fmt: skip
        ids = order.ids
        log.debug("ticket %s: clones %s sent to %s after %.1f ms", ticket.id, ids, host,
                  (time.perf_counter() - started) * 1000)  # fmt: skip
        try:
            peer = self.link.peer(ticket.addresses[host])
            running = await peer.call(START, **order.to_json())
        except (SnowFlockError, KeyError) as e:
            log.warning("clones %s of ticket %s on %s did not start: %s", ids, ticket.id,
                        host, e)  # fmt: skip
            running = {}
        ready_ms = round((time.perf_counter() - started) * 1000, 1)
        for k in ids:
            ticket.clones[k].ready_ms = ready_ms
            if not running.get(str(k)):
                ticket.clones[k].state = CloneState.CRASHED
        log.info("ticket %s: clones %s running on %s after %.1f ms", ticket.id,
                 [k for k in ids if running.get(str(k))], host, ready_ms)  # fmt: skip

    def _share_corner(self, parent_domid: int, ticket: str, k: int) -> None:
        corner = f"/local/domain/{parent_domid}/{layout.share_dir(ticket, k)}"
        self.bus.local.mkdir(corner)
        self.bus.local.set_perms(corner, [f"n{parent_domid}"])

    async def stop(self, ticket: Ticket, clones: list[Clone]) -> None:
        """Kill clones of ticket on other hosts (those hosts may be gone: logged)."""
        by_host: dict[str, list[str]] = {}
        for clone in clones:
            if clone.host is not None:
                by_host.setdefault(clone.host, []).append(clone.vm)
        await asyncio.gather(*(self._stop_on(ticket, h, names) for h, names in by_host.items()))

    async def _stop_on(self, ticket: Ticket, host: str, names: list[str]) -> None:
        try:
            await self.link.peer(ticket.addresses[host], 60).call("clone.stop", names=names)
        except SnowFlockError as e:
            log.warning("could not stop clones %s on %s: %s", names, host, e)

    # What the other hosts report ----------------------------------------------------

    def ended(self, args: dict[str, Any]) -> Ticket:
        """clone.ended: a clone exited (with its status) or crashed over there."""
        ticket, clone = self._clone(args)
        state = CloneState.EXITED if args.get("state") == "exited" else CloneState.CRASHED
        if clone.state == CloneState.RUNNING:
            clone.state, clone.status = state, args.get("status")
            log.info("clone %d of ticket %s on %s: %s %s", clone.id, ticket.id, clone.host,
                     state, clone.status)  # fmt: skip
        return ticket

    def share(self, args: dict[str, Any], parent_domid: int) -> None:
        """share.put: store what a clone over there shared in its parent's domain."""
        ticket, clone = self._clone(args)
        key, chunks = args.get("key"), args.get("chunks")
        if not isinstance(key, str) or not isinstance(chunks, list):
            raise UsageError("share.put: key and chunks are required")
        base = f"/local/domain/{parent_domid}/{layout.share_dir(ticket.id, clone.id)}/{key}"
        for i, chunk in enumerate(chunks):
            self.bus.local.write(f"{base}/{i}", str(chunk).encode())
        self.bus.local.write(f"{base}/chunks", str(len(chunks)).encode())  # last, as put does

    def hosts_dead(self, hosts: list[str]) -> list[Ticket]:
        """Clones on dead hosts crashed; returns the tickets that changed."""
        changed = []
        for ticket in self.book.tickets.values():
            lost = [c for c in ticket.clones.values()
                    if c.host in hosts and c.state == CloneState.RUNNING]  # fmt: skip
            for clone in lost:
                clone.state = CloneState.CRASHED
                log.warning("clone %d of ticket %s crashed with its host %s", clone.id,
                            ticket.id, clone.host)  # fmt: skip
            if lost:
                changed.append(ticket)
        return changed

    def _clone(self, args: dict[str, Any]) -> tuple[Ticket, Clone]:
        ticket, k = self.book.tickets.get(str(args.get("ticket"))), args.get("id")
        clone = ticket.clones.get(k) if ticket and isinstance(k, int) else None
        if ticket is None or clone is None or clone.host is None:
            raise NotFoundError(f"no remote clone {args.get('id')} of ticket {args.get('ticket')}")
        return ticket, clone

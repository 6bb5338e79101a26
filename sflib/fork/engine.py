"""sfld's fork engine (DESIGN §5): the parts of a fork, wired together.

    requests   the guests' requests in, replies out (sflib.fork.requests)
    calls      the API's calls (sflib.fork.calls)
    local      clones on this host (sflib.fork.local)
    remote     the parent's side of clones on other hosts (sflib.fork.remote)
    hosted     clones this host runs for other hosts' parents (sflib.fork.hosted)
    life       how tickets and their clones end (sflib.fork.lifecycle)

Other hosts' sflds call in through peer_dispatch (sflib.cluster.wire).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sflib.cluster.link import ClusterLink
from sflib.errors import NotFoundError, UsageError
from sflib.fork import messages
from sflib.fork.calls import Calls
from sflib.fork.hosted import HostedClones
from sflib.fork.lifecycle import TicketLife
from sflib.fork.local import LocalClones
from sflib.fork.network import CloneNetworks
from sflib.fork.remote import RemoteClones
from sflib.fork.requests import RequestQueue
from sflib.fork.standby import Standbys
from sflib.fork.tickets import TicketBook
from sflib.memory.service import MemoryService
from sflib.sfld.vms import VM, VMTable

log = logging.getLogger(__name__)

PeerCall = Callable[[dict[str, Any]], Awaitable[Any]]


class ForkEngine:
    def __init__(self, vms: VMTable, max_clones: int, state_dir: Path,
                 memory: MemoryService | None = None, tapped: bool = False,
                 cluster: ClusterLink | None = None) -> None:  # fmt: skip
        self.vms = vms
        self.cluster = cluster
        self.here = cluster.host if cluster else str(vms.settings["host_name"])
        book = TicketBook(max_clones)
        self.remote: RemoteClones | None = None
        self.hosted: HostedClones | None = None
        self.checkpoint_dir = checkpoint_dir = state_dir / "checkpoints"
        if cluster is not None and memory is not None:
            self.remote = RemoteClones(book, vms.bus, memory, cluster)
            self.hosted = HostedClones(vms, memory, cluster, vms.settings["qemu"], checkpoint_dir)
            cluster.on_dead = self._hosts_dead
            cluster.on_revoked = self._tickets_revoked
        self.network = (CloneNetworks(vms.network, book, cluster, self.here)
                        if vms.network is not None else None)  # fmt: skip
        self.requests = RequestQueue(vms, self.hosted.on_share if self.hosted else None)
        self.local = LocalClones(vms, self.requests, self.here, self.network, memory, tapped)
        self.life = TicketLife(book, self.local, self.remote, cluster)
        self.standbys = Standbys(vms, bool(vms.settings.get("standby", True)))
        self.calls = Calls(vms, self.life, self.local, self.requests, self.remote, self.hosted,
                           self.network, cluster, checkpoint_dir, self.standbys)  # fmt: skip
        self.book = book
        self.requests.serve(self.calls.table())
        self._peer: dict[str, PeerCall] = {
            messages.START: self._clone_start,
            "clone.stop": self._clone_stop,
            "clone.ended": self._clone_ended,
            messages.NET_CONNECT: self._net_connect,
            messages.NET_PREPARE: self._net_prepare,
            "share.put": self._share_put,
        }
        vms.on_end.append(self._vm_ended)
        vms.on_ready.append(self.standbys.prepare)

    @property
    def checkpoints(self) -> dict[str, Any]:
        return self.life.checkpoints

    async def _vm_ended(self, vm: VM) -> None:
        name = vm.machine.spec.name
        self.calls.busy.discard(name)
        await self.standbys.drop(name)
        await self.local.untap(name)
        if self.network is not None and vm.network is not None:
            self.network.forget(vm.network)
        if self.hosted is not None and self.hosted.of(vm) is not None:
            await self.hosted.ended(vm)
        else:
            await self.life.vm_ended(vm)

    # Calls from other hosts' sflds (sflib.cluster.wire) -----------------------------

    async def peer_dispatch(self, op: str, args: dict[str, Any]) -> Any:
        if self.remote is None or self.hosted is None:
            raise UsageError("this sfld is not part of a cluster")
        call = self._peer.get(op)
        if call is None:
            raise UsageError(f"unknown request {op!r}")
        return await call(args)

    async def _clone_start(self, args: dict[str, Any]) -> Any:
        assert self.hosted is not None
        return await self.hosted.start(messages.CloneStart.from_json(args), self.requests.answer)

    async def _clone_stop(self, args: dict[str, Any]) -> Any:
        assert self.hosted is not None
        return await self.hosted.stop([str(n) for n in args.get("names", [])])

    async def _clone_ended(self, args: dict[str, Any]) -> Any:
        assert self.remote is not None
        self.life.check_finished(self.remote.ended(args))
        return {}

    async def _net_connect(self, args: dict[str, Any]) -> Any:
        family = messages.FamilyPeers.from_json(messages.NET_CONNECT, args)
        if self.vms.network is not None:
            await self.vms.network.connect(family.family, family.peers)
        return {}

    async def _net_prepare(self, args: dict[str, Any]) -> Any:
        family = messages.FamilyPeers.from_json(messages.NET_PREPARE, args)
        if self.vms.network is not None:
            await self.vms.network.prepare(family.family, family.peers)
        return {}

    async def _share_put(self, args: dict[str, Any]) -> Any:
        assert self.remote is not None
        ticket = self.book.tickets.get(str(args.get("ticket")))
        parent = self.vms.vms.get(ticket.owner) if ticket else None
        if parent is None:
            raise NotFoundError(f"no parent of ticket {args.get('ticket')} here")
        self.remote.share(args, parent.machine.spec.domid)
        return {}

    async def _tickets_revoked(self, ids: list[str]) -> None:
        await self.life.revoked(ids)

    async def _hosts_dead(self, hosts: list[str]) -> None:
        self.life.hosts_dead(hosts)
        if self.hosted is not None:
            await self.hosted.owners_dead(hosts)

    # For sf-vm --------------------------------------------------------------------

    def list_checkpoints(self) -> list[dict[str, Any]]:
        return [{"checkpoint": c.id, "owner": c.owner, "created": c.created,
                 "pause_ms": c.pause_ms, "memory": str(c.image.path)}
                for c in self.life.checkpoints.values() if c.named]  # fmt: skip

    def list_tickets(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.book.tickets.values()]

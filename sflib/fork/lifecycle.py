"""How a ticket's clones end, wherever they run: sf-join waits for them, sf-kill,
a revocation by the cluster's allocator or the parent's end kills them, a host's
death crashes them; and the ticket then ends, its checkpoint and its slots at the
master released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from sflib.cluster.link import ClusterLink
from sflib.fork.checkpoint import Checkpoint
from sflib.fork.local import LocalClones
from sflib.fork.remote import RemoteClones
from sflib.fork.tickets import Clone, CloneState, Ticket, TicketBook, TicketState
from sflib.sfld.vms import VM

log = logging.getLogger(__name__)


class TicketLife:
    def __init__(self, book: TicketBook, local: LocalClones, remote: RemoteClones | None,
                 cluster: ClusterLink | None) -> None:  # fmt: skip
        self.book = book
        self.local = local
        self.remote = remote
        self.cluster = cluster
        self.checkpoints: dict[str, Checkpoint] = {}
        self.finished: dict[str, asyncio.Event] = {}  # per ticket: all clones ended
        self.starting: dict[str, asyncio.Event] = {}  # per ticket: set once all started

    def granted(self, ticket: Ticket) -> None:
        self.finished[ticket.id] = asyncio.Event()

    @contextlib.contextmanager
    def spawning(self, ticket: Ticket) -> Iterator[None]:
        """While ticket's clones start, here and on other hosts."""
        started = self.starting[ticket.id] = asyncio.Event()
        try:
            yield
        finally:
            started.set()
            self.starting.pop(ticket.id, None)

    async def started(self, ticket: Ticket) -> None:
        """Until ticket's clones have started (or failed to)."""
        started = self.starting.get(ticket.id)
        if started is not None:
            await started.wait()

    async def kill_running(self, ticket: Ticket) -> list[Clone]:
        """Its running clones, here and on other hosts, killed (and so reported).
        Clones still starting are waited for first: killed before they run, they
        would be missed (another host's, not there yet) or have their checkpoint
        removed under them, and the kill would report none."""
        await self.started(ticket)
        running = [c for c in ticket.clones.values() if c.state == CloneState.RUNNING]
        for clone in running:
            clone.state = CloneState.KILLED
        here = [self.local.stop(c.vm) for c in running if c.host is None]
        there = [self.remote.stop(ticket, running)] if self.remote is not None else []
        await asyncio.gather(*here, *there)
        return running

    async def end(self, ticket: Ticket) -> None:
        """Joined or killed: its checkpoint (if made for it) goes, its slots too."""
        self.book.end(ticket)
        ckpt = self.checkpoints.get(ticket.checkpoint or "")
        if ckpt is not None and not ckpt.named:
            self.checkpoints.pop(ckpt.id).remove()
        if self.cluster is not None:
            await self.cluster.release(ticket.id)

    def check_finished(self, ticket: Ticket) -> None:
        if ticket.state == TicketState.ACTIVE and ticket.finished:
            self.finished[ticket.id].set()

    async def vm_ended(self, vm: VM) -> None:
        """A VM of this host ended: a clone of a ticket here crashed if it did not
        exit; a parent takes its family along."""
        name = vm.machine.spec.name
        if vm.clone_id is not None:
            ticket = self.book.tickets.get(name.rsplit("-", 1)[0])
            if ticket is not None and vm.clone_id in ticket.clones:
                clone = ticket.clones[vm.clone_id]
                if clone.state == CloneState.RUNNING:
                    clone.state = CloneState.CRASHED
                    log.warning("clone %d of ticket %s ended without sf-exit", clone.id, ticket.id)
                self.check_finished(ticket)
        for ticket in self.book.of_owner(name):
            if ticket.state != TicketState.ENDED:
                await self.kill_running(ticket)
                await self.end(ticket)
                self.finished[ticket.id].set()
        for ckpt in [c for c in self.checkpoints.values() if c.owner == name]:
            self.checkpoints.pop(ckpt.id).remove()

    async def revoked(self, ids: list[str]) -> None:
        """The master ended these tickets (their Slurm job was cancelled or
        preempted): their clones are killed, and sf-join reports them so."""
        for ticket in [self.book.tickets[i] for i in ids if i in self.book.tickets]:
            if ticket.state == TicketState.ENDED:
                continue
            ticket.revoked = True
            await self.kill_running(ticket)
            if ticket.state == TicketState.GRANTED:  # no clones yet: none will come
                ticket.state = TicketState.ACTIVE
            self.check_finished(ticket)

    def hosts_dead(self, hosts: list[str]) -> None:
        if self.remote is not None:
            for ticket in self.remote.hosts_dead(hosts):
                self.check_finished(ticket)

"""The fork's side of family networks (sflib.net): where a ticket's clones sit on
their parent's family network, and the cards they get.

Clone k of a ticket is member net_base + k, the base keeping a parent's concurrent
tickets apart. The parent's host knows every host its family spans; when a ticket
brings new ones, the hosts from earlier tickets are told to reach them too
(net.connect), so that every member reaches every other.

A clone of a clone gets a card, since it must have its parent's devices, but its
card stays off every network: member numbers are handed out by the family's first
parent's host alone, and a second authority would give out addresses twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from sflib.address import split_address
from sflib.cluster.link import ClusterLink
from sflib.errors import SnowFlockError, WrongStateError
from sflib.fork import messages
from sflib.fork.tickets import Ticket, TicketBook, TicketState
from sflib.net.identity import member_base
from sflib.net.service import FamilyNetworks
from sflib.sfld.vms import VM
from sflib.vm.qemu import Nic

log = logging.getLogger(__name__)


class CloneNetworks:
    def __init__(self, net: FamilyNetworks, book: TicketBook, cluster: ClusterLink | None,
                 here: str) -> None:  # fmt: skip
        self.net = net
        self.book = book
        self.cluster = cluster
        self.here = here
        self.spans: dict[int, dict[str, str]] = {}  # family: {host: its sfld's address}
        self._telling: set[asyncio.Task[None]] = set()  # calls to other hosts under way

    async def plan(self, parent: VM, ticket: Ticket,
                   ids: dict[str, list[int]]) -> dict[str, Any] | None:  # fmt: skip
        """ticket's clones' place on the parent's family network, as other hosts are
        told it; None if the parent has no card."""
        member = self.net.members.get(parent.machine.spec.name)
        if member is None:
            return None
        family = member.me.family
        if member.isolated or parent.clone_id is not None:
            return {"family": family, "base": 0, "peers": [], "isolated": True}
        taken = [range(t.net_base + 1, t.net_base + t.granted + 1)
                 for t in self.book.of_owner(parent.machine.spec.name)
                 if t is not ticket and t.state != TicketState.ENDED]  # fmt: skip
        ticket.net_base = member_base(taken, ticket.granted)
        span = self.spans.setdefault(family, {})
        earlier = {h: a for h, a in span.items() if h not in ids}
        span.update({h: ticket.addresses[h] for h in ids if h in ticket.addresses})
        peers = [split_address(address)[0] for address in span.values()]
        await self.net.connect(family, peers)
        if self.net.underlay:
            peers.append(self.net.underlay)
        if earlier and len(span) > len(earlier):
            self._in_background(self._tell(earlier, messages.NET_CONNECT, family, peers))
        return {"family": family, "base": ticket.net_base, "peers": peers}

    def prepare(self, parent: VM, ticket: Ticket) -> None:
        """Just granted: have the other hosts the ticket placed clones on make the
        family's network now, in the background, so that when the clones come (after
        sf-clone's checkpoint) they only plug their taps in. A host where this
        fails makes it with the first clone, as before."""
        member = self.net.members.get(parent.machine.spec.name)
        if self.cluster is None or member is None or member.isolated or parent.clone_id is not None:
            return
        hosts = {h: a for h, a in ticket.addresses.items()
                 if h != self.here and ticket.placement.get(h)}  # fmt: skip
        if not hosts:
            return
        peers = [split_address(a)[0] for a in ticket.addresses.values()]
        self._in_background(self._reach(member.me.family, peers))  # plan finds them reached
        if self.net.underlay:
            peers.append(self.net.underlay)
        self._in_background(self._tell(hosts, messages.NET_PREPARE, member.me.family, peers))

    async def _reach(self, family: int, peers: list[str]) -> None:
        try:
            await self.net.connect(family, peers)
        except SnowFlockError as e:  # plan tries again
            log.warning("family %d: cannot reach %s yet: %s", family, ", ".join(peers), e)

    def _in_background(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._telling.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._telling.discard)

    async def _tell(self, hosts: dict[str, str], op: str, family: int,
                    peers: list[str]) -> None:  # fmt: skip
        """Every host, side by side."""
        assert self.cluster is not None
        message = messages.FamilyPeers(family, peers).to_json()

        async def tell(host: str, address: str) -> None:
            assert self.cluster is not None
            try:
                await self.cluster.peer(address, timeout=30).call(op, **message)
            except SnowFlockError as e:
                log.warning("family %d: %s: %s failed: %s", family, host, op, e)

        await asyncio.gather(*(tell(h, a) for h, a in hosts.items()))

    def open(self, parent: VM, name: str, member: int) -> Nic | None:
        """A local clone's card (None if its parent has none)."""
        mine = self.net.members.get(parent.machine.spec.name)
        if mine is None:
            return None
        nested = mine.isolated or parent.clone_id is not None
        return self.net.open(name, mine.me.family, member, isolated=nested).nic

    async def plug(self, name: str) -> None:
        if name in self.net.members:
            await self.net.join(name, parent_here=True)

    async def unplug(self, name: str) -> None:
        await self.net.leave(name)

    def forget(self, family: int) -> None:
        """The family's parent is gone."""
        self.spans.pop(family, None)

    @staticmethod
    async def link(vm: VM, member_isolated: bool, up: bool) -> dict[str, str]:
        if vm.machine.spec.nic is None:
            raise WrongStateError(f"{vm.machine.spec.name} has no network card")
        if member_isolated:
            raise WrongStateError("a clone of a clone has no network")
        await vm.machine.set_link(up)
        return {"link": "up" if up else "down"}

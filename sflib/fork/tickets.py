"""Tickets: reservations of clone slots, and the embedded allocator (pure).

A ticket for n clones is granted m <= n slots, as the host's policy allows (here:
a per-host clone limit). It is used by one clone operation and ends with join or
kill, which release its slots.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from sflib.errors import NotFoundError, UsageError, WrongStateError

MAX_REQUEST = 4096  # more than any cluster of ours: a typo, not a wish


class TicketState(StrEnum):
    GRANTED = "granted"  # slots reserved, not used yet
    CLONING = "cloning"
    ACTIVE = "active"  # its clones run
    ENDED = "ended"  # joined or killed: slots released


class CloneState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"  # called sf-exit
    KILLED = "killed"  # by sf-kill or because the parent went away
    CRASHED = "crashed"  # QEMU ended without sf-exit


@dataclass
class Clone:
    id: int
    vm: str
    state: CloneState = CloneState.RUNNING
    status: int | None = None
    host: str | None = None  # another host that runs it; None: this one
    ready_ms: float | None = None  # from the start of the clone operation to running

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "vm": self.vm, "state": str(self.state), "status": self.status,
                "host": self.host, "ready_ms": self.ready_ms}  # fmt: skip


@dataclass
class Ticket:
    id: str
    owner: str  # the parent VM's name
    requested: int
    granted: int
    state: TicketState = TicketState.GRANTED
    clones: dict[int, Clone] = field(default_factory=dict)
    pause_ms: float | None = None
    checkpoint: str | None = None  # what its clones were made from
    placement: dict[str, int] = field(default_factory=dict)  # host: clones; {}: all here
    addresses: dict[str, str] = field(default_factory=dict)  # host: its sfld's address
    net_base: int = 0  # clone k is member net_base + k of its family's network
    revoked: bool = False  # its allocation ended outside (a Slurm job cancelled)

    @property
    def finished(self) -> bool:
        """Every clone has ended."""
        return all(c.state != CloneState.RUNNING for c in self.clones.values())

    def to_json(self) -> dict[str, object]:
        return {"ticket": self.id, "owner": self.owner, "requested": self.requested,
                "granted": self.granted, "state": str(self.state), "pause_ms": self.pause_ms,
                "revoked": self.revoked,
                "placement": self.placement,
                "clones": {str(k): self.clones[k].to_json()
                           for k in sorted(self.clones)}}  # fmt: skip

    def ids_by_host(self, here: str) -> dict[str, list[int]]:
        """Which clone IDs (1..granted) each host runs, in placement order."""
        placement = self.placement or {here: self.granted}
        ids, k = {}, 1
        for host, count in placement.items():
            ids[host] = list(range(k, k + count))
            k += count
        return ids


class TicketBook:
    """Every ticket of one host, and its clone slots."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tickets: dict[str, Ticket] = {}
        self._serial = 0

    @property
    def reserved(self) -> int:
        return sum(t.granted for t in self.tickets.values() if t.state != TicketState.ENDED)

    def grant(self, owner: str, n: int) -> Ticket:
        """A ticket for m = min(n, free slots) clones. Raises UsageError, WrongStateError."""
        if not 1 <= n <= MAX_REQUEST:
            raise UsageError(f"cannot ask for {n} clones", hint=f"ask for 1 to {MAX_REQUEST}")
        free = self.capacity - self.reserved
        if free <= 0:
            raise WrongStateError(f"no clone slots free (all {self.capacity} reserved)",
                                  hint="join or kill a ticket first")  # fmt: skip
        self._serial += 1
        ticket = Ticket(f"t{self._serial}-{secrets.token_hex(3)}", owner, n, min(n, free))
        self.tickets[ticket.id] = ticket
        return ticket

    def adopt(self, ticket: Ticket) -> Ticket:
        """Keep a ticket the master granted (the cluster's slots, not this host's)."""
        self.tickets[ticket.id] = ticket
        return ticket

    def get(self, ticket_id: str, owner: str) -> Ticket:
        """The ticket, if owner holds it; another VM's ticket is as good as unknown."""
        ticket = self.tickets.get(ticket_id)
        if ticket is None or ticket.owner != owner:
            raise NotFoundError(f"no such ticket: {ticket_id}")
        return ticket

    def usable(self, ticket_id: str, owner: str) -> Ticket:
        ticket = self.get(ticket_id, owner)
        if ticket.revoked:
            raise WrongStateError(f"ticket {ticket_id} was revoked by the cluster's allocator")
        if ticket.state != TicketState.GRANTED:
            raise WrongStateError(f"ticket {ticket_id} was already used ({ticket.state})")
        return ticket

    def end(self, ticket: Ticket) -> None:
        ticket.state = TicketState.ENDED

    def of_owner(self, owner: str) -> list[Ticket]:
        return [t for t in self.tickets.values() if t.owner == owner]

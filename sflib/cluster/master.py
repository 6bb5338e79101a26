"""sfmasterd: the hosts of the cluster register and heartbeat here, and tickets are
granted across them by the embedded allocator (DESIGN §1, §5).

Calls (over sflib.cluster.wire, from sflds):
    register {host, address, slots, families: {number: vm}}
                                           -> {heartbeat, host_timeout}
    heartbeat {host}                       -> {dead: [host, ...], revoked: [ticket, ...]}
                                              (NotFoundError: register again)
    ticket.request {host, vm, n}           -> {ticket, requested, granted, job,
                                              placement: {host: n}, addresses: {host: addr}}
                                              (granted by the allocator: sflib.cluster.grants)
    ticket.release {ticket}                -> {ticket, released}
    family.allocate {host, vm}             -> {family}  (a number for a parent's network,
                                              unique in the cluster)
    family.release {host, family}          -> {released}
    host.list, ticket.list, status

A host silent for host_timeout seconds is declared dead: it grants no more slots,
the tickets it owned end (their clones elsewhere are killed by their hosts, which
learn of the death in their next heartbeat), and the owners of clones it ran report
those clones crashed; its family numbers are free again. When a host registers
(again: a restarted sfld, or one declared dead too soon), the families it says it
holds become the truth for it.

Nothing holds the master's loop up (sflib.looplag watches it, and logs a stall
past loop_stall_warning): Slurm's commands run in threads, SQLite's calls are small.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from sflib import __version__, looplag
from sflib.address import split_address
from sflib.cluster import allocator, wire
from sflib.cluster.grants import Allocator, EmbeddedAllocator, Holdings
from sflib.cluster.registry import Registry, TicketRecord
from sflib.errors import NotFoundError, SnowFlockError, UsageError
from sflib.net import identity
from sflib.settings import LOOP_STALL_WARNING

log = logging.getLogger(__name__)


class Master:
    def __init__(self, registry: Registry, heartbeat: float, host_timeout: float,
                 grants: Allocator | None = None,
                 loop_stall_warning: float = LOOP_STALL_WARNING) -> None:  # fmt: skip
        self.registry = registry
        self.loop_stall_warning = loop_stall_warning
        self.heartbeat = heartbeat
        self.host_timeout = host_timeout
        self.grants = grants or EmbeddedAllocator()
        self.revoked: dict[str, list[str]] = {}  # host: its tickets the allocator ended
        self._jobs_unknown = False  # the allocator did not answer last time

    async def run(self, listen: str, secret: bytes, stopping: asyncio.Event,
                  on_ready: Any = None) -> None:  # fmt: skip
        async with looplag.watching(self.loop_stall_warning):
            await self._run(listen, secret, stopping, on_ready)

    async def _run(self, listen: str, secret: bytes, stopping: asyncio.Event,
                   on_ready: Any) -> None:  # fmt: skip
        host, port = split_address(listen)
        server = await wire.serve(host, port, secret, self.dispatch)
        self.address = f"{host}:{server.sockets[0].getsockname()[1]}"
        self._grace()
        log.info("ready: listening on %s", self.address)
        if on_ready:
            on_ready()
        watcher = asyncio.create_task(self._watch_hosts(stopping))
        await stopping.wait()
        watcher.cancel()
        server.close()
        await server.wait_closed()
        self.registry.close()
        log.info("stopped")

    def _grace(self) -> None:
        """After a restart, the live hosts get a full timeout to be heard again."""
        for h in self.registry.hosts():
            if h.alive:
                self.registry.seen(h.name)

    async def _watch_hosts(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            for ticket in self.check_hosts(time.time()):
                await self._release_job(ticket)
            await self.check_jobs()
            await asyncio.sleep(min(self.heartbeat, self.host_timeout / 4))

    async def check_jobs(self) -> list[str]:
        """End the live tickets whose allocation ended outside (a Slurm job cancelled
        or preempted); their owners learn it in their next heartbeat. Returns them."""
        revoked: list[str] = []
        for ticket in self.registry.tickets(live_only=True):
            if ticket.job is None:
                continue
            try:
                how = await self.grants.ended(ticket.job)
            except SnowFlockError as e:
                if not self._jobs_unknown:  # once, not every second while it lasts
                    log.warning("cannot ask %s about ticket %s: %s", self.grants.name,
                                ticket.id, e)  # fmt: skip
                self._jobs_unknown = True
                return revoked
            self._jobs_unknown = False
            if how is not None and self.registry.end_ticket(ticket.id):
                log.warning("ticket %s revoked: its %s job %s was %s", ticket.id,
                            self.grants.name, ticket.job, how)  # fmt: skip
                self.revoked.setdefault(ticket.owner_host, []).append(ticket.id)
                revoked.append(ticket.id)
        return revoked

    async def _release_job(self, ticket: TicketRecord | None) -> None:
        if ticket is None or ticket.job is None:
            return
        try:
            await self.grants.release(ticket.job)
        except SnowFlockError as e:
            log.warning("ticket %s: %s job %s not released: %s", ticket.id, self.grants.name,
                        ticket.job, e)  # fmt: skip

    def check_hosts(self, now: float) -> list[TicketRecord]:
        """Declare dead the hosts not heard for host_timeout; returns the tickets
        that ended with them (their allocations are to be released)."""
        dead = [h.name for h in self.registry.hosts()
                if h.alive and now - h.last_seen > self.host_timeout]  # fmt: skip
        gone = []
        for name in dead:
            self.registry.declare_dead(name)
            ended = [t.id for t in self.registry.tickets(live_only=True) if t.owner_host == name]
            for ticket_id in ended:
                self.registry.end_ticket(ticket_id)
                gone.append(self.registry.ticket(ticket_id))
            self.registry.drop_families(name)
            log.warning("host %s silent for %g s: dead; its tickets ended: %s", name,
                        self.host_timeout, ", ".join(ended) or "none")  # fmt: skip
        return [t for t in gone if t is not None]

    # Calls ---------------------------------------------------------------------

    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        handler = _HANDLERS.get(op)
        if handler is None:
            raise UsageError(f"unknown request {op!r}")
        result = handler(self, args)
        return await result if asyncio.iscoroutine(result) else result

    def register(self, args: dict[str, Any]) -> Any:
        name, address = _str(args, "host"), _str(args, "address")
        slots = _int(args, "slots")
        self.registry.register(name, address, slots)
        taken = self.registry.keep_families(name, _families(args))
        if taken:
            log.warning("host %s holds family networks given to another host meanwhile: %s",
                        name, ", ".join(map(str, taken)))  # fmt: skip
        log.info("host %s registered: sfld at %s, %d clone slots", name, address, slots)
        return {"heartbeat": self.heartbeat, "host_timeout": self.host_timeout}

    def heartbeat_call(self, args: dict[str, Any]) -> Any:
        name = _str(args, "host")
        if not self.registry.seen(name):
            raise NotFoundError(f"host {name} is not registered (or was declared dead)")
        return {"dead": [h.name for h in self.registry.hosts() if not h.alive],
                "revoked": self.revoked.pop(name, [])}  # fmt: skip

    async def request_ticket(self, args: dict[str, Any]) -> Any:
        owner, vm, n = _str(args, "host"), _str(args, "vm"), _int(args, "n", low=-(2**31))
        if not 1 <= n <= allocator.MAX_REQUEST:
            raise UsageError(f"cannot ask for {n} clones",
                             hint=f"ask for 1 to {allocator.MAX_REQUEST}")  # fmt: skip
        hosts = {h.name: h for h in self.registry.hosts() if h.alive}
        if owner not in hosts:
            raise NotFoundError(f"host {owner} is not registered (or was declared dead)")
        capacity = {name: h.slots for name, h in hosts.items()}
        free = allocator.free_slots(capacity, self.registry.reserved())
        live = self.registry.tickets(live_only=True)
        holds = Holdings(sum(t.granted for t in live if (t.owner_host, t.owner_vm) == (owner, vm)),
                         sum(t.granted for t in live if t.owner_host == owner))  # fmt: skip
        grant = await self.grants.grant(owner, vm, n, free, holds)
        ticket = TicketRecord(f"m{secrets.token_hex(4)}", owner, vm, n, grant.placement,
                              time.time(), job=grant.job)  # fmt: skip
        self.registry.add_ticket(ticket)
        log.info("ticket %s for %s on %s: %d of %d clones on %s%s", ticket.id, vm, owner,
                 ticket.granted, n, grant.placement,
                 f" ({self.grants.name} job {grant.job})" if grant.job else "")  # fmt: skip
        return {**ticket.to_json(), "addresses": {h: hosts[h].address for h in grant.placement}}

    async def release_ticket(self, args: dict[str, Any]) -> Any:
        ticket_id = _str(args, "ticket")
        ticket = self.registry.ticket(ticket_id)
        if ticket is None:
            raise NotFoundError(f"no such ticket: {ticket_id}")
        released = self.registry.end_ticket(ticket_id)
        if released:
            await self._release_job(ticket)
            log.info("ticket %s released", ticket_id)
        return {"ticket": ticket_id, "released": released}

    def allocate_family(self, args: dict[str, Any]) -> Any:
        host, vm = _str(args, "host"), _str(args, "vm")
        record = self.registry.host(host)
        if record is None or not record.alive:
            raise NotFoundError(f"host {host} is not registered (or was declared dead)")
        number = identity.free_family(set(self.registry.families()))
        self.registry.add_family(number, host, vm)
        log.info("family network %d for %s on %s", number, vm, host)
        return {"family": number}

    def release_family(self, args: dict[str, Any]) -> Any:
        host, number = _str(args, "host"), _int(args, "family")
        return {"released": self.registry.drop_families(host, number) == 1}

    def list_hosts(self, _args: dict[str, Any]) -> Any:
        reserved = self.registry.reserved()
        return [{**h.to_json(), "reserved": reserved.get(h.name, 0)}
                for h in self.registry.hosts()]  # fmt: skip

    def list_tickets(self, _args: dict[str, Any]) -> Any:
        return [t.to_json() for t in self.registry.tickets()]

    def status(self, _args: dict[str, Any]) -> Any:
        hosts = self.registry.hosts()
        return {"version": __version__, "address": self.address,
                "hosts": len(hosts), "alive": sum(h.alive for h in hosts),
                "live_tickets": len(self.registry.tickets(live_only=True)),
                "families": len(self.registry.families())}  # fmt: skip


_HANDLERS = {
    "register": Master.register,
    "heartbeat": Master.heartbeat_call,
    "ticket.request": Master.request_ticket,
    "ticket.release": Master.release_ticket,
    "family.allocate": Master.allocate_family,
    "family.release": Master.release_family,
    "host.list": Master.list_hosts,
    "ticket.list": Master.list_tickets,
    "status": Master.status,
}


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key} is required")
    return value


def _families(args: dict[str, Any]) -> dict[int, str]:
    held = args.get("families", {})
    try:
        return {identity.check_family(int(n)): str(vm) for n, vm in dict(held).items()}
    except (TypeError, ValueError):
        raise UsageError("families must map family numbers to VM names") from None


def _int(args: dict[str, Any], key: str, low: int = 0) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{key} must be an integer of at least {low}")
    return value


def open_registry(state_dir: Path) -> Registry:
    return Registry(state_dir / "master.db")

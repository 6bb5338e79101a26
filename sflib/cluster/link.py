"""An sfld's place in the cluster: its registration and heartbeats at sfmasterd,
tickets from the master, and the calls between sflds (each side a wire.PeerClient).

The master may be down when sfld starts, or restart later: the link keeps trying,
registers again when the master has forgotten it, and meanwhile tickets fail with
UnreachableError. Every heartbeat's reply names the hosts the master declared
dead; the link hands them to on_dead.

Heartbeats keep their beat whatever the host does: what a reply asks for (killing
clones of a dead host or a revoked ticket, which stops VMs and takes their network
down) runs in a task of its own, never in the heartbeat's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from sflib.address import split_address
from sflib.cluster import wire
from sflib.errors import NotFoundError, OperationTimeout, SnowFlockError
from sflib.sfld.control import Dispatch

log = logging.getLogger(__name__)

RETRY = 1.0  # seconds between attempts to reach a master that did not answer


class ClusterLink:
    def __init__(self, host: str, master: str, listen: str, secret: bytes, slots: int) -> None:
        self.host = host
        self.master = wire.PeerClient(master, secret, timeout=10.0)
        self.listen = split_address(listen)
        self.secret = secret
        self.slots = slots
        self.address = ""
        self.heartbeat = RETRY
        self.on_dead: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None
        # Tickets whose allocation ended outside SnowFlock (a Slurm job cancelled).
        self.on_revoked: Callable[[list[str]], Coroutine[Any, Any, None]] | None = None
        self.dead: set[str] = set()
        self._server: asyncio.Server | None = None
        self._beating: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()  # what replies asked for
        self.registered = False
        self.is_registered = asyncio.Event()
        self.families: dict[int, str] = {}  # family networks of this host's VMs

    async def start(self, dispatch: Dispatch) -> None:
        """Listen for other sflds, then register and heartbeat in the background."""
        host, port = self.listen
        self._server = await wire.serve(host, port, self.secret, dispatch)
        self.address = f"{host}:{self._server.sockets[0].getsockname()[1]}"
        log.info("cluster: host %s, peers reach it at %s, master %s", self.host,
                 self.address, self.master.address)  # fmt: skip
        self._beating = asyncio.create_task(self._beat(), name="heartbeat")

    async def close(self) -> None:
        for task in [t for t in (self._beating, *self._handling) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _beat(self) -> None:
        failing = False
        while True:
            started = time.monotonic()
            try:
                if not self.registered:
                    await self._register()
                reply = await self.master.call("heartbeat", host=self.host)
                if failing:
                    log.info("cluster: the master answers again")
                failing = False
                self._note_dead(set(reply.get("dead", [])))
                revoked = [str(t) for t in reply.get("revoked", [])]
                if revoked and self.on_revoked is not None:
                    log.warning("cluster: the master revoked tickets %s", ", ".join(revoked))
                    self._handle(self.on_revoked(revoked))
            except NotFoundError:
                log.warning("cluster: the master forgot this host; registering again")
                self.registered = False
                self.is_registered.clear()
                continue
            except SnowFlockError as e:
                if not failing:
                    log.warning("cluster: cannot reach the master: %s", e)
                failing = True
            # On the beat: the time the call took counts.
            await asyncio.sleep(max(0.0, started + self.heartbeat - time.monotonic()))

    async def _register(self) -> None:
        reply = await self.master.call("register", host=self.host, address=self.address,
                                       slots=self.slots, families=self.families)  # fmt: skip
        self.heartbeat = float(reply.get("heartbeat", RETRY))
        self.registered = True
        self.is_registered.set()
        log.info("cluster: registered at the master %s", self.master.address)

    def _note_dead(self, dead: set[str]) -> None:
        new = sorted(dead - self.dead)
        self.dead = dead
        if new and self.on_dead is not None:
            log.warning("cluster: the master declared dead: %s", ", ".join(new))
            self._handle(self.on_dead(new))

    def _handle(self, work: Coroutine[Any, Any, None]) -> None:
        """Run what a heartbeat's reply asks for beside the heartbeats."""
        task = asyncio.get_running_loop().create_task(work)
        self._handling.add(task)
        task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster: acting on the master's heartbeat reply failed: %s",
                      task.exception(), exc_info=task.exception())  # fmt: skip

    # Tickets -----------------------------------------------------------------------

    async def grant(self, vm: str, n: int) -> dict[str, Any]:
        """The master's ticket for n clones of vm. Raises what the master raised, or
        UnreachableError."""
        return dict(await self.master.call("ticket.request", host=self.host, vm=vm, n=n))

    async def release(self, ticket: str) -> None:
        """Give a ticket's slots back; a master that cannot be reached is logged."""
        try:
            await self.master.call("ticket.release", ticket=ticket)
        except SnowFlockError as e:
            log.warning("cluster: ticket %s not released at the master: %s", ticket, e)

    # Family networks ----------------------------------------------------------------

    async def allocate_family(self, vm: str, timeout: float = 10.0) -> int:
        """A family number for vm's network, unique in the cluster. Raises what the
        master raised, UnreachableError, or OperationTimeout (not registered)."""
        try:
            await asyncio.wait_for(self.is_registered.wait(), timeout)
        except TimeoutError:
            raise OperationTimeout(f"not registered at the master {self.master.address} "
                                   f"within {timeout:g} s") from None  # fmt: skip
        number = int((await self.master.call("family.allocate", host=self.host, vm=vm))["family"])
        self.families[number] = vm
        return number

    async def release_family(self, number: int) -> None:
        """Give a family number back; a master that cannot be reached learns it when
        this host registers again, or never needs to (the number stays taken)."""
        self.families.pop(number, None)
        try:
            await self.master.call("family.release", host=self.host, family=number)
        except SnowFlockError as e:
            log.warning("cluster: family %d not released at the master: %s", number, e)

    # Other sflds -------------------------------------------------------------------

    def peer(self, address: str, timeout: float = 120.0) -> wire.PeerClient:
        return wire.PeerClient(address, self.secret, timeout)

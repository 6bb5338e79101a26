"""A fake sfld behind the real guest agent and a real XenStore server: the guest
side's programs (libsnowflock, the tools) run against it with no VM.

As in test_guest_agent.py, the agent's port is the server's domain socket, so the
server sees one domain connection. The fake sfld watches the domain's requests as
sflib.fork.requests does (read, remove, answer into snowflock/replies/<rid>) and
answers each op as sflib.fork.calls would, with results of the same shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sflib.errors import (
    AuthError,
    NotFoundError,
    OperationTimeout,
    SnowFlockError,
    SystemFailure,
    UnreachableError,
    UsageError,
    WrongStateError,
)
from sflib.guest import layout
from sflib.guest.agent import Agent
from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.wire import XenStoreError

DOMID = 1
HOME = f"/local/domain/{DOMID}"
JOIN_DELAY = 0.3  # s: a join waits this long for its clones, so that joins overlap
CLONE_ID = 3  # what a clone request for a ticket of 7 answers: "you are clone 3"
ERRORS: dict[str, type[SnowFlockError]] = {  # join of these tickets fails so
    "t-usage": UsageError, "t-timeout": OperationTimeout, "t-system": SystemFailure,
    "t-unreachable": UnreachableError, "t-auth": AuthError, "t-wrong": WrongStateError,
}  # fmt: skip
CODES = {"t-usage": 2, "t-timeout": 99, "t-system": 111, "t-unreachable": 5, "t-auth": 1,
         "t-wrong": 4}  # fmt: skip


@dataclass
class FakeSfld:
    """sfld's side of the requests of one domain, answered at once (join: later)."""

    server: XenStoreServer
    tickets: dict[str, int] = field(default_factory=dict)  # ticket: granted
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self) -> None:
        self.server.local.watch(f"{HOME}/{layout.REQUESTS}", b"fake-sfld", self._on_event)

    def _on_event(self, path: str, _token: bytes) -> None:
        parsed = layout.parse_request_path(path)
        if parsed is None:
            return
        try:
            raw = self.server.local.read(path)
        except XenStoreError:
            return  # our own removal fires the watch again
        self.server.local.rm(path)
        task = asyncio.create_task(self._serve(parsed[1], raw))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, rid: str, raw: bytes) -> None:
        try:
            request = layout.decode_request(DOMID, rid, raw)
            self.requests.append((request.op, request.args))
            if request.op == "join":
                await asyncio.sleep(JOIN_DELAY)
            data = layout.encode_result(self._result(request.op, request.args))
        except SnowFlockError as e:
            data = layout.encode_error(e)
        self.server.local.write(f"{HOME}/{layout.reply_key(rid)}", data)

    def _result(self, op: str, args: dict[str, Any]) -> Any:
        if op == "ticket":
            return self._ticket(args["n"])
        if op == "exit":
            if args["status"] != 7:
                raise WrongStateError("sf-exit is for clones; fake is a parent")
            return {"status": 7}
        if op == "checkpoint":
            return {"checkpoint": "c1-fake", "id": 0, "seed": secrets.token_hex(32)}
        ticket = self._known(str(args.get("ticket")))
        if op == "clone":
            clone_id = CLONE_ID if self.tickets[ticket] == 7 else 0
            return {"id": clone_id, "seed": secrets.token_hex(32)}
        if op == "create_clones":
            if args.get("checkpoint") != "c1-fake":
                raise NotFoundError(f"no checkpoint {args.get('checkpoint')}")
            return {"clones": self.tickets[ticket], "id": 0, "seed": secrets.token_hex(32)}
        return self._ended(ticket, killed=op == "kill")

    def _ticket(self, n: int) -> dict[str, Any]:
        if n < 1:
            raise UsageError("n must be an integer from 1 to 2147483648")
        if n > 8:
            raise WrongStateError("no clone slot is free", hint="try fewer")
        ticket = f"t{len(self.tickets) + 1}-{secrets.token_hex(3)}"
        self.tickets[ticket] = min(n, 4) if n != 7 else 7
        return {"ticket": ticket, "granted": self.tickets[ticket], "requested": n}

    def _known(self, ticket: str) -> str:
        if ticket in ERRORS:
            raise ERRORS[ticket](f"fake {ticket}")
        if ticket not in self.tickets:
            raise NotFoundError(f"no ticket {ticket}")
        return ticket

    def _ended(self, ticket: str, killed: bool) -> dict[str, Any]:
        granted = self.tickets.pop(ticket)
        state = "killed" if killed else "exited"
        clones = {str(k): {"id": k, "vm": f"{ticket}-{k}", "state": state,
                           "status": None if killed else 30 + k, "host": "h1", "ready_ms": 61.5}
                  for k in range(granted, 0, -1)}  # fmt: skip
        return {"ticket": ticket, "owner": "fake", "requested": granted, "granted": granted,
                "state": "ended", "pause_ms": 101.2, "revoked": False, "placement": {},
                "clones": clones}  # fmt: skip


@dataclass
class Guest:
    server: XenStoreServer
    sfld: FakeSfld
    env: dict[str, str]
    hooks: Path

    def held(self) -> int:
        """The watches the host holds for the domain's connections."""
        return sum(len(c.session.watches) for c in self.server.connections.values()
                   if c.domid == DOMID)  # fmt: skip


@contextlib.asynccontextmanager
async def fake_guest(tmp_path: Path) -> AsyncIterator[Guest]:
    """A domain with the agent in front of it and the fake sfld behind it."""
    server = XenStoreServer()
    server.local.make_domain(DOMID)
    port = tmp_path / "port.sock"

    async def domain_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.attach(DOMID, reader, writer)

    port_server = await asyncio.start_unix_server(domain_connection, port)
    agent = Agent(port, tmp_path / "xenstored" / "socket")
    await agent.start()
    sfld = FakeSfld(server)
    sfld.start()
    hooks = tmp_path / "hooks.d"
    env = {"PATH": os.environ["PATH"], "XENSTORED_PATH": str(agent.socket_path),
           "SF_HOOKS_DIR": str(hooks), "SF_PORT_SOCKET": str(port)}  # fmt: skip
    try:
        yield Guest(server, sfld, env, hooks)
    finally:
        agent.close()
        port_server.close()
        await server.close()

"""sfld's end of the guests' requests (DESIGN §5): a watch on every domain's request
folder; each request is taken off it before anything is done (so that no clone
inherits it), decoded, carried out by its handler in a task of its own, and
answered in the requesting domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sflib.errors import SnowFlockError, SystemFailure
from sflib.guest import layout
from sflib.sfld.vms import VM, VMTable
from sflib.xenstore.wire import XenStoreError

log = logging.getLogger(__name__)

NO_REPLY = object()  # a handler's result when it answered by itself
Handler = Callable[[VM, layout.Request], Awaitable[Any]]
ShareDone = Callable[[int, str, int, str], None]  # domid, ticket, clone ID, key


class RequestQueue:
    def __init__(self, vms: VMTable, on_share: ShareDone | None = None) -> None:
        """on_share: called when a clone this host runs for another host's parent
        finished sharing a key."""
        self.vms = vms
        self.bus = vms.bus
        self.handlers: Mapping[str, Handler] = {}
        self.on_share = on_share
        self._tasks: set[asyncio.Task[None]] = set()

    def serve(self, handlers: Mapping[str, Handler]) -> None:
        """Take requests from now on; handlers: one per op of layout.OPS."""
        assert set(handlers) == set(layout.OPS), "a handler for each op"
        self.handlers = handlers
        self.bus.local.watch("/local/domain", b"sf-requests", self._on_event)

    def answer(self, domid: int, rid: str, result: Any) -> None:
        """Reply result to request rid of domain domid."""
        self._reply(domid, rid, layout.encode_result(result))

    def _on_event(self, path: str, _token: bytes) -> None:
        shared = layout.parse_share_done(path)
        if shared is not None and self.on_share is not None:
            self.on_share(*shared)
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
            result = await self.handlers[request.op](vm, request)
        except SnowFlockError as e:
            log.info("%s: refused: %s", vm.machine.spec.name, e)
            self._reply(domid, rid, layout.encode_error(e))
            return
        except Exception as e:  # the daemon must survive a bug in one request
            log.exception("request %s of %s failed", rid, vm.machine.spec.name)
            self._reply(domid, rid, layout.encode_error(SystemFailure(f"sfld: {e}")))
            return
        if result is not NO_REPLY:
            self.answer(domid, rid, result)

    def _reply(self, domid: int, rid: str, data: bytes) -> None:
        with contextlib.suppress(XenStoreError):  # the domain may be gone
            self.bus.local.write(f"/local/domain/{domid}/{layout.reply_key(rid)}", data)

"""The SnowFlock API, inside a guest: the seven calls of DESIGN §1.

Each call writes a request into the guest's own XenStore domain and blocks on a
watch until sfld writes the reply. sf_clone returns in the parent and in every
clone, each with its own reply: sfld copies the guest's domain and its pending
watch into each clone's new domain.

Every function raises SnowFlockError subclasses carrying sfld's verdict:
UsageError, NotFoundError (unknown ticket or checkpoint), WrongStateError (e.g.
exit in the parent), UnreachableError (not a SnowFlock VM).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pyxs import Client, PyXSError

from sflib.errors import SnowFlockError
from sflib.guest import freepages, layout
from sflib.guest.bus import check_reachable, open_bus
from sflib.guest.hooks import run_hooks

log = logging.getLogger(__name__)

RNDRESEEDCRNG = 0x5207  # linux/random.h: _IO('R', 0x07)
AVOIDANCE_LOCK = Path("/run/snowflock/avoidance.lock")  # one free-page holder at a time


@dataclass(frozen=True)
class Ticket:
    id: str
    granted: int
    requested: int


def request(op: str, **args: Any) -> Any:
    """Send one request to sfld and wait for its reply."""
    rid = f"{os.getpid()}-{secrets.token_hex(4)}"
    reply_key = layout.reply_key(rid).encode()
    with open_bus() as client, client.monitor() as monitor:
        monitor.watch(reply_key, rid.encode())
        events = monitor.wait()
        next(events)  # the watch's initial event
        client.write(layout.request_key(rid).encode(), layout.encode_request(op, args))
        raw = _await_reply(client, events, reply_key)
        client.delete(reply_key)
    return layout.decode_reply(raw)


def _await_reply(client: Client, events: Any, key: bytes) -> bytes:
    while True:
        next(events)
        raw = client.read(key, b"")
        if raw:  # sfld's replies are never empty; an event may come before the value
            return bytes(raw)


def request_ticket(n: int) -> Ticket:
    result = request("ticket", n=n)
    return Ticket(result["ticket"], result["granted"], result["requested"])


def clone(ticket: str, hooks_dir: str | None = None, avoidance: bool = True) -> int:
    """0 in the parent; in each clone its ID, after hooks.d/clone-post.d ran.

    With avoidance, the guest's free pages are taken and reported first, so that
    clones never fetch them (sflib.guest.freepages)."""
    check_reachable()  # before the free pages are taken
    with _free_pages(avoidance) as report:
        result = request("clone", ticket=ticket, **report)
    reseed(result.get("seed"))
    clone_id = int(result["id"])
    if clone_id:
        run_hooks("clone", "post", identity(), hooks_dir)
    return clone_id


def checkpoint_parent(hooks_dir: str | None = None, avoidance: bool = True) -> tuple[str, int]:
    """(checkpoint, 0) now; (checkpoint, ID) in each clone made from it later."""
    check_reachable()  # before the free pages are taken
    with _free_pages(avoidance) as report:
        result = request("checkpoint", **report)
    reseed(result.get("seed"))
    if result["id"]:
        run_hooks("clone", "post", identity(), hooks_dir)
    return str(result["checkpoint"]), int(result["id"])


def reseed(seed: object) -> None:
    """Mix the seed sfld sent with a fork's reply (each member's own) into the
    kernel's RNG and reseed it now: whatever this process reads from /dev/urandom
    next differs from every other member's. The VM's new generation ID reseeds it
    too (DESIGN §2 step 6), but through an ACPI event that may come a little later.
    """
    if not isinstance(seed, str):
        return
    try:
        with open("/dev/urandom", "wb", buffering=0) as rng:
            rng.write(bytes.fromhex(seed))  # into the input pool, uncredited
            fcntl.ioctl(rng.fileno(), RNDRESEEDCRNG)  # root only: the guest's tools are
    except (OSError, ValueError) as e:
        log.warning("cannot reseed the kernel's RNG: %s", e)


def create_clones(checkpoint: str, ticket: str) -> int:
    """Clones from checkpoint; they return from checkpoint_parent. 0 here."""
    return int(request("create_clones", checkpoint=checkpoint, ticket=ticket)["id"])


def exit_clone(status: int = 0) -> NoReturn:
    """End this clone with status; sfld stops it, so this never returns (the
    paper's exit, snowflock.exit)."""
    request("exit", status=status)
    while True:
        time.sleep(3600)


def join(ticket: str) -> dict[str, Any]:
    """Wait until every clone of ticket has exited; their IDs, states and statuses."""
    return dict(request("join", ticket=ticket))


def kill(ticket: str) -> dict[str, Any]:
    return dict(request("kill", ticket=ticket))


@contextlib.contextmanager
def _free_pages(avoidance: bool) -> Iterator[dict[str, str]]:
    """{"freepages": KEY} naming the report of the pages held here, or {} when there is
    none; the pages are held until the block ends (in the parent and the clones)."""
    lock = _avoidance_lock() if avoidance else None
    took = time.perf_counter()
    try:
        held = freepages.reserve() if lock is not None else None
    except OSError as e:
        log.warning("no free-page report: %s", e)
        held = None
    if held is None:
        if lock is not None:
            os.close(lock)
        yield {}
        return
    assert lock is not None  # held only with it
    key = f"{layout.FREEPAGES}/{secrets.token_hex(4)}"
    try:
        encoding = time.perf_counter()
        runs = freepages.runs(held.pfns)
        chunks = freepages.encode(runs)
        writing = time.perf_counter()
        with open_bus() as client:
            for i, chunk in enumerate(chunks):
                client.write(f"{key}/{i}".encode(), chunk)
            client.write(f"{key}/chunks".encode(), str(len(chunks)).encode())
        log.debug("free pages: %d taken in %.0f ms, %d runs in %d chunks encoded in %.0f ms, "
                  "written in %.0f ms", len(held.pfns), (encoding - took) * 1000, len(runs),
                  len(chunks), (writing - encoding) * 1000,
                  (time.perf_counter() - writing) * 1000)  # fmt: skip
        yield {"freepages": key}
    finally:
        held.release()
        os.close(lock)
        _forget(key)


def _avoidance_lock() -> int | None:
    """A descriptor holding the guest's one avoidance lock, or None if another
    process holds it: two processes that each took most of the free memory would
    run the guest out of it. Without the lock a call makes no free-page report (and
    sfld refuses a second fork while one is in flight anyway)."""
    try:
        AVOIDANCE_LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(AVOIDANCE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        log.warning("no free-page report: cannot open %s: %s", AVOIDANCE_LOCK, e.strerror)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        log.debug("another process holds the guest's free pages: no free-page report")
        return None
    return fd


def _forget(key: str) -> None:
    """Remove a free-page report sfld did not take (it refused the request early)."""
    try:
        with open_bus() as client:
            client.delete(key.encode())
    except PyXSError:
        log.debug("free-page report %s already gone", key)
    except SnowFlockError as e:  # the fork is done: a report left behind is sfld's to drop
        log.warning("free-page report %s not removed: %s", key, e)


def identity() -> dict[str, Any]:
    """This clone's identity as sfld wrote it (empty in a parent)."""
    with open_bus() as client:
        raw = client.read(layout.IDENTITY.encode(), b"")
    return json.loads(raw) if raw else {}

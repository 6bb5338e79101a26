"""SnowFlock's API for Python programs inside a guest VM: the seven calls of the
SnowFlock paper, under its names (snowflock.3py(3), DESIGN §1).

    import snowflock

    ticket = snowflock.request_ticket(4)        # up to 4 clones; ticket.granted of them
    me = snowflock.clone(ticket)                # 0 here, in the parent; 1.. in each clone
    if me:
        render(band=me)
        snowflock.exit(0)                       # ends this clone; never returns
    for clone in snowflock.join(ticket):        # waits for every clone of the ticket
        print(clone.id, clone.state, clone.status)

Each call writes a request into the VM's own XenStore domain, through the guest
agent sf-guestd(8), and waits for the host's answer; any number of processes and
threads may call at once. clone() returns in the parent and in every clone, each
with its own answer, like fork(2). A call that fails raises an Error subclass whose
exit_code is the guest tools' exit status for the same failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from sflib.errors import NotFoundError as NotFound
from sflib.errors import OperationTimeout as Timeout
from sflib.errors import SnowFlockError as Error
from sflib.errors import SystemFailure
from sflib.errors import UnreachableError as Unreachable
from sflib.errors import UsageError as Usage
from sflib.errors import WrongStateError as WrongState
from sflib.guest import api
from sflib.guest.api import Ticket

__all__ = [
    "CloneStatus",
    "Error",
    "NotFound",
    "SystemFailure",
    "Ticket",
    "Timeout",
    "Unreachable",
    "Usage",
    "WrongState",
    "checkpoint_parent",
    "clone",
    "create_clones",
    "exit",
    "join",
    "kill",
    "request_ticket",
]  # fmt: skip


@dataclass(frozen=True)
class CloneStatus:
    """One clone of a ticket, as join() and kill() report it."""

    id: int
    state: str  # "exited", "killed", "crashed"
    status: int | None  # what it passed to exit(), None if it did not exit


def request_ticket(n: int) -> Ticket:
    """Reserve resources for up to n clones; the ticket says how many were granted
    (1 <= granted <= n). Raises WrongState when no clone slot is free."""
    return api.request_ticket(n)


def clone(ticket: Ticket | str, *, hooks_dir: str | None = None, avoidance: bool = True) -> int:
    """Clone this VM with ticket (once per ticket): 0 in the parent, and in each clone
    its ID (1..granted), after the clone-post hooks of hooks_dir ran there. With
    avoidance, the guest's free pages are reported first so that clones never fetch
    them (sf-clone(1))."""
    return api.clone(_id(ticket), hooks_dir, avoidance)


def checkpoint_parent(*, hooks_dir: str | None = None,
                      avoidance: bool = True) -> tuple[str, int]:  # fmt: skip
    """Make an immutable checkpoint of this VM: (checkpoint, 0) now, and
    (checkpoint, ID) in each clone that create_clones() makes from it later."""
    return api.checkpoint_parent(hooks_dir, avoidance)


def create_clones(checkpoint: str, ticket: Ticket | str) -> None:
    """Make ticket's clones from checkpoint; they return from checkpoint_parent()."""
    api.create_clones(checkpoint, _id(ticket))


def exit(status: int = 0) -> NoReturn:  # the paper's name; os._exit is the model
    """End this clone with status (0-255), which the parent's join() reports. Never
    returns. Raises WrongState in a VM that is not a clone."""
    api.exit_clone(status)


def join(ticket: Ticket | str) -> list[CloneStatus]:
    """Wait until every clone of ticket has ended; then the ticket is used up."""
    return _statuses(api.join(_id(ticket)))


def kill(ticket: Ticket | str) -> list[CloneStatus]:
    """Kill every clone of ticket at once and invalidate it; the clones as they ended."""
    return _statuses(api.kill(_id(ticket)))


def _id(ticket: Ticket | str) -> str:
    return ticket.id if isinstance(ticket, Ticket) else ticket


def _statuses(record: dict[str, object]) -> list[CloneStatus]:
    clones = record.get("clones", {})
    assert isinstance(clones, dict)
    return sorted((CloneStatus(int(c["id"]), str(c["state"]), c.get("status"))
                   for c in clones.values()), key=lambda c: c.id)  # fmt: skip

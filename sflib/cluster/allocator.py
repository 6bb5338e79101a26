"""The embedded allocator: where a ticket's clones go (pure).

Clones are dealt round-robin over the live hosts with free slots, the host with
the most free slots first, the parent's own host last: it is busy running the
parent, and clones elsewhere are what a cluster is for. A ticket for n clones is
granted m = min(n, free slots of the cluster), as the seed allows.
"""

from __future__ import annotations

from sflib.errors import UsageError, WrongStateError

MAX_REQUEST = 4096  # more than any cluster of ours: a typo, not a wish


def place(n: int, free: dict[str, int], owner_host: str) -> dict[str, int]:
    """How many of n clones go to each host, given each live host's free slots.

    Raises UsageError (n out of range), WrongStateError (no slot free anywhere).
    """
    if not 1 <= n <= MAX_REQUEST:
        raise UsageError(f"cannot ask for {n} clones", hint=f"ask for 1 to {MAX_REQUEST}")
    left = {host: slots for host, slots in free.items() if slots > 0}
    if not left:
        raise WrongStateError("no clone slots free in the cluster",
                              hint="join or kill a ticket first")  # fmt: skip
    order = sorted(left, key=lambda h: (h == owner_host, -left[h], h))
    placement: dict[str, int] = {}
    while n > 0 and any(left.values()):
        for host in order:
            if n > 0 and left[host] > 0:
                placement[host] = placement.get(host, 0) + 1
                left[host] -= 1
                n -= 1
    return placement


def free_slots(capacity: dict[str, int], reserved: dict[str, int]) -> dict[str, int]:
    """Each host's free slots: its capacity less what live tickets hold there."""
    return {host: slots - reserved.get(host, 0) for host, slots in capacity.items()}

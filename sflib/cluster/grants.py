"""Who decides how many clones a ticket gets, and where: sfmasterd's allocators.

Two, chosen by the master's allocator setting:

- embedded (the default, no external service): sflib.cluster.allocator places the
  clones over the hosts' free slots; the config's max_family_clones and
  max_host_clones cap the clones one parent (a family), and the parents of one
  host, hold across their live tickets (Quota; with Slurm too).
- slurm: a ticket is a Slurm job (sflib.cluster.slurm), granted m <= n nodes by
  Slurm's own partitions, limits and accounts; each node is an sfld host (by name,
  or through slurm_nodes). The master polls the jobs of live tickets: a job that
  Slurm ended (cancelled from outside, preempted, out of time) revokes its ticket,
  and the owner's sfld kills its clones.

The decisions (node to host mapping, quota) are pure; Slurm's commands block, so
they run off the event loop, lest heartbeats stall while slurmctld does not answer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from sflib.cluster import allocator, slurm
from sflib.errors import SystemFailure, UsageError, WrongStateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grant:
    placement: dict[str, int]  # host: clones
    job: str | None = None  # the external allocation behind it, if any


@dataclass(frozen=True)
class Holdings:
    """What the asking parent's family, and the parents of its host, hold now."""

    family: int = 0
    host: int = 0


@dataclass(frozen=True)
class Quota:
    """The embedded policy: clones a family, and the parents of one host, may hold
    across their live tickets (0: no limit). SnowFlock has no users of its own
    (sfld's socket is root's): the owners it knows are parents and their hosts."""

    family: int = 0
    host: int = 0

    def cap(self, n: int, holds: Holdings) -> int:
        """n, or less to stay within the limits. Raises WrongStateError at a limit."""
        for limit, held, who, setting in (
            (self.family, holds.family, "family", "max_family_clones"),
            (self.host, holds.host, "host's parents", "max_host_clones"),
        ):
            left = quota_left(limit, held, who, setting)
            n = min(n, left) if left is not None else n
        return n


class Allocator(Protocol):
    name: str

    async def grant(self, owner: str, vm: str, n: int, free: dict[str, int],
                    holds: Holdings) -> Grant: ...  # fmt: skip

    async def release(self, job: str) -> None: ...

    async def ended(self, job: str) -> str | None:
        """None while the allocation lives; else how it ended."""


def quota_left(limit: int, holds: int, who: str, setting: str) -> int | None:
    """How many more clones who may hold (None: no limit). Raises WrongStateError."""
    if limit <= 0:
        return None
    if holds >= limit:
        raise WrongStateError(f"the {who} already hold {holds} clones ({setting} {limit})",
                              hint="join or kill a ticket first")  # fmt: skip
    return limit - holds


class EmbeddedAllocator:
    name = "embedded"

    def __init__(self, quota: Quota | None = None) -> None:
        self.quota = quota or Quota()

    async def grant(self, owner: str, vm: str, n: int, free: dict[str, int],
                    holds: Holdings) -> Grant:  # fmt: skip
        return Grant(allocator.place(self.quota.cap(n, holds), free, owner))

    async def release(self, job: str) -> None:
        return None

    async def ended(self, job: str) -> str | None:
        return None


def parse_node_map(text: str) -> dict[str, str]:
    """ "n1=h1,n2=h1" as {node: host}. Raises UsageError."""
    pairs: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        node, sep, host = item.partition("=")
        if not sep or not node or not host:
            raise UsageError(f"slurm_nodes: {item!r} is not NODE=HOST")
        pairs[node] = host
    return pairs


def placement_of(nodes: list[str], node_map: dict[str, str], hosts: set[str]) -> dict[str, int]:
    """Clones per host for a job's nodes (pure): a node is the host it maps to, or
    the host of its own name. Raises SystemFailure for a node that is no live host."""
    placement: dict[str, int] = {}
    for node in nodes:
        host = node_map.get(node, node)
        if host not in hosts:
            raise SystemFailure(f"Slurm node {node} is no live SnowFlock host",
                                hint="map it with slurm_nodes = \"NODE=HOST,...\"")  # fmt: skip
        placement[host] = placement.get(host, 0) + 1
    return placement


class SlurmAllocator:
    name = "slurm"

    def __init__(self, settings: dict[str, Any]) -> None:
        self.partition = settings["slurm_partition"] or None
        self.account = settings["slurm_account"] or None
        self.node_map = parse_node_map(settings["slurm_nodes"])
        self.quota = Quota(settings["max_family_clones"], settings["max_host_clones"])

    async def grant(self, owner: str, vm: str, n: int, free: dict[str, int],
                    holds: Holdings) -> Grant:  # fmt: skip
        job = await asyncio.to_thread(slurm.allocate, self.quota.cap(n, holds),
                                      self.partition, self.account, None)  # fmt: skip
        try:
            placement = placement_of(job.nodes, self.node_map, set(free))
        except SystemFailure:
            await self.release(str(job.job_id))
            raise
        return Grant(placement, str(job.job_id))

    async def release(self, job: str) -> None:
        await asyncio.to_thread(slurm.release, int(job))

    async def ended(self, job: str) -> str | None:
        state = await asyncio.to_thread(slurm.state, int(job))
        return state.outcome.value if state.ended else None


def make(settings: dict[str, Any]) -> Allocator:
    if settings["allocator"] == "slurm":
        return SlurmAllocator(settings)
    return EmbeddedAllocator(Quota(settings["max_family_clones"], settings["max_host_clones"]))

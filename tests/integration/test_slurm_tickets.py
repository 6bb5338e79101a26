"""sfmasterd's tickets granted by a real Slurm (SlurmBed: four one-core nodes, n1 and
n2 standing for host a, n3 and n4 for host b): Slurm decides m <= n and where,
releasing a ticket cancels its job, a job cancelled from outside revokes the ticket
(its owner hears it in its next heartbeat), and with slurmctld down a ticket is
refused with a clear error and nothing half made."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib import run
from sflib.cluster.grants import SlurmAllocator
from sflib.cluster.master import Master
from sflib.cluster.registry import Registry
from sflib.cluster.slurmbed import SlurmBed
from sflib.errors import UnreachableError, WrongStateError

pytestmark = pytest.mark.slow

SETTINGS = {"slurm_partition": "", "slurm_account": "", "max_family_clones": 0,
            "max_host_clones": 0, "slurm_nodes": "n1=a,n2=a,n3=b,n4=b"}  # fmt: skip


@pytest.fixture
def master(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Master, SlurmBed]]:
    with SlurmBed.create(tmp_path, nodes=4) as bed:
        monkeypatch.setenv("SLURM_CONF", str(bed.conf))
        m = Master(Registry(tmp_path / "m.db"), heartbeat=1, host_timeout=5,
                   grants=SlurmAllocator(SETTINGS))  # fmt: skip
        for host in ("a", "b"):
            m.register({"host": host, "address": f"{host}:1", "slots": 8})
        yield m, bed
        m.registry.close()


def running_jobs(bed: SlurmBed) -> list[str]:
    out = run.run(["squeue", "--noheader", "--states=running", "--format=%i"], env=bed.env)
    return out.stdout.split()


def test_slurm_grants_tickets_and_takes_them_back(master: tuple[Master, SlurmBed]) -> None:
    m, bed = master
    first = asyncio.run(m.request_ticket({"host": "a", "vm": "web", "n": 3}))
    assert first["granted"] == 3 and sum(first["placement"].values()) == 3
    assert set(first["placement"]) <= {"a", "b"} and first["job"] in running_jobs(bed)
    second = asyncio.run(m.request_ticket({"host": "a", "vm": "web", "n": 3}))
    assert second["granted"] == 1  # Slurm had one node left
    asyncio.run(m.release_ticket({"ticket": first["ticket"]}))
    assert running_jobs(bed) == [second["job"]]  # released: its job cancelled
    # Cancelled from outside: the ticket is revoked, and its owner told.
    bed.cancel(int(second["job"]))
    assert asyncio.run(m.check_jobs()) == [second["ticket"]]
    assert m.registry.ticket(second["ticket"]).ended is not None  # type: ignore[union-attr]
    assert m.heartbeat_call({"host": "a"})["revoked"] == [second["ticket"]]
    assert m.heartbeat_call({"host": "a"})["revoked"] == []  # told once


def test_with_slurmctld_down_a_ticket_is_refused_and_nothing_made(
    master: tuple[Master, SlurmBed],
) -> None:
    m, bed = master
    bed.stop_controller()
    with pytest.raises(UnreachableError, match="slurmctld"):
        asyncio.run(m.request_ticket({"host": "a", "vm": "web", "n": 2}))
    assert m.registry.tickets() == []
    bed.start_controller()
    assert running_jobs(bed) == []
    granted = asyncio.run(m.request_ticket({"host": "b", "vm": "web", "n": 2}))
    assert granted["granted"] == 2


def job_nodes(bed: SlurmBed) -> dict[str, int]:
    out = run.run(["squeue", "--noheader", "--states=running", "--format=%i %D"], env=bed.env)
    return {job: int(nodes) for job, nodes in (line.split() for line in out.stdout.splitlines())}


def test_the_family_and_host_caps_hold_with_slurm_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sfmasterd(8): max_family_clones and max_host_clones apply with either
    allocator. Slurm is asked for no more than the caps leave, though it has more."""
    caps = {**SETTINGS, "max_family_clones": 2, "max_host_clones": 3}
    with SlurmBed.create(tmp_path, nodes=4) as bed:
        monkeypatch.setenv("SLURM_CONF", str(bed.conf))
        m = Master(Registry(tmp_path / "m.db"), heartbeat=1, host_timeout=5,
                   grants=SlurmAllocator(caps))  # fmt: skip
        try:
            m.register({"host": "a", "address": "a:1", "slots": 8})
            m.register({"host": "b", "address": "b:1", "slots": 8})
            web = asyncio.run(m.request_ticket({"host": "a", "vm": "web", "n": 3}))
            assert web["granted"] == 2  # the family's cap; Slurm had 4 nodes
            with pytest.raises(WrongStateError, match="max_family_clones 2"):
                asyncio.run(m.request_ticket({"host": "a", "vm": "web", "n": 1}))
            db = asyncio.run(m.request_ticket({"host": "a", "vm": "db", "n": 3}))
            assert db["granted"] == 1  # host a's parents' cap; Slurm had 2 nodes left
            with pytest.raises(WrongStateError, match="max_host_clones 3"):
                asyncio.run(m.request_ticket({"host": "a", "vm": "db", "n": 1}))
            assert job_nodes(bed) == {web["job"]: 2, db["job"]: 1}
            asyncio.run(m.release_ticket({"ticket": web["ticket"]}))
            again = asyncio.run(m.request_ticket({"host": "a", "vm": "web", "n": 3}))
            assert again["granted"] == 2  # released, its clones count no longer
        finally:
            m.registry.close()

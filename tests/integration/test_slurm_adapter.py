"""The Slurm adapter against a real Slurm on this machine (SlurmBed: munged,
slurmctld and four one-core slurmd nodes): grants, refusals, release, jobs ended
from outside or preempted, and slurmctld or munged down."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sflib import run
from sflib.cluster import slurm
from sflib.cluster.slurm import Outcome
from sflib.cluster.slurmbed import URGENT, SlurmBed
from sflib.errors import UnreachableError, UsageError, WrongStateError

pytestmark = pytest.mark.slow


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[SlurmBed]:
    with SlurmBed.create(tmp_path, nodes=4) as b:
        yield b
    assert not (tmp_path / "slurm").exists(), "the bed left its files"


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def jobs_named(bed: SlurmBed, name: str) -> list[str]:
    shown = run.run(["squeue", "--states=all", "--noheader", f"--name={name}",
                     "--format=%i %T"], env=bed.env)  # fmt: skip
    return shown.stdout.splitlines()


def test_two_of_four_nodes(bed: SlurmBed) -> None:
    got = slurm.allocate(2, env=bed.env)
    assert len(got.nodes) == 2
    assert set(got.nodes) <= set(bed.nodes)
    states = bed.node_states()
    assert sorted(n for n, s in states.items() if s == "allocated") == sorted(got.nodes)
    assert slurm.state(got.job_id, env=bed.env).outcome is Outcome.RUNNING
    assert slurm.job_nodes(got.job_id, env=bed.env) == got.nodes


def test_more_than_free_grants_what_is_free_and_none_free_refuses(bed: SlurmBed) -> None:
    """The documented behaviour: with k nodes free, a ticket for n > k gets m = k;
    with none free, a clear refusal (WrongStateError), and no job waits."""
    first = slurm.allocate(3, env=bed.env)
    assert len(first.nodes) == 3
    second = slurm.allocate(4, env=bed.env)
    assert len(second.nodes) == 1
    assert not set(first.nodes) & set(second.nodes)
    with pytest.raises(WrongStateError, match="no node free"):
        slurm.allocate(1, name="sf-refused", env=bed.env)
    assert [line.split()[1] for line in jobs_named(bed, "sf-refused")] == ["FAILED"]
    slurm.release(first.job_id, env=bed.env)
    slurm.release(second.job_id, env=bed.env)
    eventually(lambda: set(bed.node_states().values()) == {"idle"})
    assert len(slurm.allocate(9, env=bed.env).nodes) == 4  # more than the cluster has


def test_a_partition_max_nodes_caps_the_grant(bed: SlurmBed) -> None:
    run.run(["scontrol", "update", "PartitionName=batch", "MaxNodes=2"], env=bed.env)
    assert len(slurm.allocate(4, env=bed.env).nodes) == 2
    with pytest.raises(UsageError, match="no partition nope"):
        slurm.allocate(1, partition="nope", env=bed.env)


def test_release_frees_the_nodes_and_twice_is_fine(bed: SlurmBed) -> None:
    got = slurm.allocate(4, env=bed.env)
    slurm.release(got.job_id, env=bed.env)
    assert slurm.state(got.job_id, env=bed.env).ended
    eventually(lambda: set(bed.node_states().values()) == {"idle"})
    slurm.release(got.job_id, env=bed.env)
    slurm.release(999999, env=bed.env)  # never known
    assert slurm.state(999999, env=bed.env).outcome is Outcome.GONE
    assert len(slurm.allocate(4, env=bed.env).nodes) == 4


def test_a_job_cancelled_from_outside_has_ended(bed: SlurmBed) -> None:
    got = slurm.allocate(2, env=bed.env)
    bed.cancel(got.job_id)
    assert slurm.state(got.job_id, env=bed.env).ended  # at once, maybe still ENDING
    eventually(lambda: slurm.state(got.job_id, env=bed.env).outcome is Outcome.CANCELLED)


def test_a_preempted_job_has_ended(bed: SlurmBed) -> None:
    low = slurm.allocate(4, env=bed.env)
    # Preemption takes the victims' nodes back first: now-or-never would refuse
    # (while still preempting them), so the urgent job may wait a little.
    high = slurm.allocate(2, partition=URGENT, wait=5, env=bed.env)
    assert len(high.nodes) == 2
    eventually(lambda: slurm.state(low.job_id, env=bed.env).outcome is Outcome.PREEMPTED)
    assert slurm.state(high.job_id, env=bed.env).outcome is Outcome.RUNNING


def test_slurmctld_down_is_a_clear_quick_error_and_makes_no_job(bed: SlurmBed) -> None:
    held = slurm.allocate(1, env=bed.env)
    bed.stop_controller()
    started = time.monotonic()
    with pytest.raises(UnreachableError, match="slurmctld") as raised:
        slurm.allocate(2, name="sf-unreachable", env=bed.env)
    assert time.monotonic() - started < 5  # MessageTimeout=2 in the bed
    assert raised.value.hint is not None
    with pytest.raises(UnreachableError):
        slurm.state(held.job_id, env=bed.env)
    with pytest.raises(UnreachableError):
        slurm.release(held.job_id, env=bed.env)
    bed.start_controller(wait_nodes=False)
    assert jobs_named(bed, "sf-unreachable") == []
    assert slurm.state(held.job_id, env=bed.env).outcome is Outcome.RUNNING  # recovered


def test_munged_down_is_a_clear_error(bed: SlurmBed) -> None:
    bed.daemons.pop("munged").stop()
    with pytest.raises(UnreachableError, match="munged"):
        slurm.allocate(1, env=bed.env)

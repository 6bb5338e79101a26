"""Tickets through Slurm on real VMs (issue 7): the test cluster's master asks a
real Slurm (SlurmBed, in the master's network namespace: two nodes, both standing
for host h2) for a ticket's clones; an administrator cancels the job, or a job of a
higher partition preempts it, and the clones are killed and the parent's sf-join
reports them so. The ticket's job is in --slurm-partition, charged to
--slurm-account."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import pytest

from sflib import run
from sflib.cluster.slurmbed import TOP, URGENT, SlurmBed
from sflib.image import build as image
from tests.integration.conftest import GO, Cluster, boot, console, running_cluster
from tests.integration.test_cluster import clones_on, wait_for

pytestmark = pytest.mark.vm

FORK = (
    """
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  echo "CLONED $t"
  sf-join "$t" > /tmp/join; echo "JOIN rc=$?"; sed 's/^/JOINED /' /tmp/join
  echo SF-DONE
else
  """
    + GO
    + """
  sf-exit 0
fi
"""
)


def test_a_job_cancelled_in_slurm_kills_its_clones(
    guest_image: image.Result, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_cluster(guest_image, 2) as cluster:
        bed, (h1, h2) = cluster.bed, cluster.hosts
        with SlurmBed.create(bed.workdir, nodes=2, netns=bed.master.netns) as slurm:
            monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
            bed.master.stop()  # it comes back with its tickets, now granted by Slurm
            bed.master.argv += ["--allocator", "slurm", "--slurm-nodes", "n1=h2,n2=h2"]
            bed.master.start()
            boot(h1, "farm", FORK)
            console(h1, "farm", "CLONED")
            assert len(clones_on(h2)) == 2  # Slurm's two nodes are h2
            jobs = run.run(slurm.command("squeue", "--noheader", "--format=%i"), env=slurm.env)
            (job,) = jobs.stdout.split()
            slurm.cancel(int(job))
            out = console(h1, "farm")
            assert "JOIN rc=1" in out
            for k in (1, 2):
                assert re.search(rf"^JOINED {k} killed", out, re.M), out[-2000:]
            wait_for("the clones to go", lambda: clones_on(h2) == [])


@contextlib.contextmanager
def slurm_cluster(guest_image: image.Result, monkeypatch: pytest.MonkeyPatch,
                  *master_args: str) -> Iterator[tuple[Cluster, SlurmBed]]:  # fmt: skip
    """Hosts h1 and h2, whose master grants through a real Slurm of two nodes, n1
    and n2, both standing for h2."""
    with running_cluster(guest_image, 2) as cluster:
        bed = cluster.bed
        with SlurmBed.create(bed.workdir, nodes=2, netns=bed.master.netns) as slurm:
            monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
            bed.master.stop()  # it comes back with its tickets, now granted by Slurm
            bed.master.argv += ["--allocator", "slurm", "--slurm-nodes", "n1=h2,n2=h2",
                                *master_args]  # fmt: skip
            bed.master.start()
            yield cluster, slurm


def jobs(slurm: SlurmBed,
         fields: Sequence[str] = ("%i", "%j", "%P", "%a", "%T")) -> list[list[str]]:  # fmt: skip
    """Slurm's live jobs: ID, name, partition, account, state."""
    shown = run.run(slurm.command("squeue", "--noheader", f"--format={' '.join(fields)}"),
                    env=slurm.env)  # fmt: skip
    return [line.split() for line in shown.stdout.splitlines()]


def test_a_ticket_in_the_partition_and_account_set_is_preempted_by_a_higher_one(
    guest_image: image.Result, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--slurm-partition urgent --slurm-account render: the ticket's job runs in
    urgent, charged to render; an administrator's job in top (a higher priority
    tier, preemption by cancelling) takes its nodes, and the clones are killed."""
    args = ("--slurm-partition", URGENT, "--slurm-account", "render")
    with slurm_cluster(guest_image, monkeypatch, *args) as (cluster, slurm):
        h1, h2 = cluster.hosts
        boot(h1, "farm", FORK)
        console(h1, "farm", "CLONED")
        assert len(clones_on(h2)) == 2
        (ticket_job,) = jobs(slurm)
        assert ticket_job[2:] == [URGENT, "render", "RUNNING"], ticket_job
        run.run(slurm.command("salloc", "--no-shell", f"--partition={TOP}", "--nodes=2",
                              "--immediate=60", "--job-name=admin"), env=slurm.env)  # fmt: skip
        out = console(h1, "farm")
        assert "JOIN rc=1" in out
        for k in (1, 2):
            assert re.search(rf"^JOINED {k} killed", out, re.M), out[-2000:]
        wait_for("the clones to go", lambda: clones_on(h2) == [])
        assert [job[1:3] + job[4:] for job in jobs(slurm)] == [["admin", TOP, "RUNNING"]]
        master_log = cluster.bed.master.log.read_text()
        assert f"job {ticket_job[0]} was preempted" in master_log, master_log[-3000:]

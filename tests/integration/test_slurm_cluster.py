"""Tickets through Slurm on real VMs (issue 7): the test cluster's master asks a
real Slurm (SlurmBed, in the master's network namespace: two nodes, both standing
for host h2) for a ticket's clones; an administrator cancels the job, and the
clones are killed and the parent's sf-join reports them so."""

from __future__ import annotations

import re

import pytest

from sflib import run
from sflib.cluster.slurmbed import SlurmBed
from sflib.image import build as image
from tests.integration.conftest import GO, boot, console, running_cluster
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

"""The Slurm adapter's pure parts, on the words Slurm 22.05 really prints (seen on
Debian 12), and the test bed's slurm.conf."""

from __future__ import annotations

from pathlib import Path

import pytest

from sflib.cluster import slurm
from sflib.cluster.slurm import Outcome, Partition
from sflib.cluster.slurmbed import slurm_conf
from sflib.errors import (
    AuthError,
    SystemFailure,
    UnreachableError,
    UsageError,
    WrongStateError,
)

PARTITIONS = (
    "PartitionName=batch AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL "
    "Default=YES QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 "
    "Hidden=NO MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO "
    "MaxCPUsPerNode=UNLIMITED Nodes=n[1-4] PriorityJobFactor=1 PriorityTier=1 State=UP "
    "TotalCPUs=4 TotalNodes=4 TRES=cpu=4,mem=4M,node=4,billing=4\n"
    "PartitionName=urgent AllowGroups=ALL Default=NO MaxNodes=2 Nodes=n[1-4] "
    "PriorityTier=2 State=DOWN TotalNodes=4\n"
)


def test_salloc_asks_for_a_range_of_nodes_now() -> None:
    assert slurm.salloc_argv(3, "sf-x") == [
        "salloc", "--no-shell", "--immediate", "--nodes=1-3", "--job-name=sf-x"]  # fmt: skip
    argv = slurm.salloc_argv(2, "t", partition="urgent", account="lab", wait=5)
    assert "--immediate=5" in argv
    assert argv[-2:] == ["--partition=urgent", "--account=lab"]


def test_the_job_id_comes_from_salloc_stderr() -> None:
    assert slurm.parse_granted("salloc: Granted job allocation 42\n") == 42
    waited = "salloc: Pending job allocation 7\nsalloc: Granted job allocation 7\n"
    assert slurm.parse_granted(waited) == 7
    with pytest.raises(SystemFailure, match="nothing of a granted job"):
        slurm.parse_granted("salloc: something else\n")


def test_partitions_and_the_cap_of_their_max_nodes() -> None:
    found = slurm.parse_partitions(PARTITIONS)
    assert found == {"batch": Partition("batch", True, None, True),
                     "urgent": Partition("urgent", False, 2, False)}  # fmt: skip
    assert slurm.node_cap(8, found, None) == 8  # the default partition: unlimited
    assert slurm.node_cap(8, found, "urgent") == 2
    assert slurm.node_cap(1, found, "urgent") == 1
    assert slurm.node_cap(5, {}, None) == 5  # no default partition: Slurm will say
    with pytest.raises(UsageError, match="no partition nope"):
        slurm.node_cap(1, found, "nope")


@pytest.mark.parametrize(
    ("line", "outcome"),
    [
        ("RUNNING|None", Outcome.RUNNING),
        ("SUSPENDED|None", Outcome.RUNNING),
        ("COMPLETING|None", Outcome.ENDING),
        ("CANCELLED|None", Outcome.CANCELLED),
        ("PREEMPTED|None", Outcome.PREEMPTED),
        ("PENDING|BeginTime", Outcome.PREEMPTED),  # requeued: its nodes are gone
        ("NODE_FAIL|NodeDown", Outcome.FAILED),
        ("FAILED|BadConstraints", Outcome.FAILED),
        ("TIMEOUT|None", Outcome.TIMEOUT),
        ("COMPLETED|None", Outcome.COMPLETED),
    ],
)
def test_job_states(line: str, outcome: Outcome) -> None:
    got = slurm.parse_job_state(5, line + "\n")
    assert got.outcome is outcome
    assert got.ended == (outcome is not Outcome.RUNNING)
    assert (got.slurm_state, got.reason) == tuple(line.split("|"))


def test_a_job_slurm_forgot_has_ended_and_an_unknown_state_is_an_error() -> None:
    assert slurm.parse_job_state(5, "").outcome is Outcome.GONE
    with pytest.raises(SystemFailure, match="unknown to SnowFlock"):
        slurm.parse_job_state(5, "SOMETHING_NEW|None\n")


NO_CTLD = ("salloc: error: Job submit/allocate failed: Unable to contact slurm controller "
           "(connect failure)\n")  # fmt: skip
NO_MUNGE = ("salloc: error: If munged is up, restart with --num-threads=10\n"
            'salloc: error: Munge encode failed: Failed to access "/x/sock": No such file '
            "or directory (Did you start munged?)\nsalloc: error: Job submit/allocate "
            "failed: Protocol authentication error\n")  # fmt: skip
BAD_KEY = "salloc: error: Job submit/allocate failed: Protocol authentication error\n"
BUSY = "salloc: error: Unable to allocate resources: Requested nodes are busy\n"
OVER_LIMIT = ("salloc: error: Job submit/allocate failed: Requested partition configuration "
              "not available now\n")  # fmt: skip
NO_PARTITION = ("salloc: error: invalid partition specified: nope\nsalloc: error: Job "
                "submit/allocate failed: Invalid partition name specified\n")  # fmt: skip


@pytest.mark.parametrize(
    ("stderr", "error", "words"),
    [
        (NO_CTLD, UnreachableError, "slurmctld"),
        (NO_MUNGE, UnreachableError, "munged"),
        (BAD_KEY, AuthError, "credentials"),
        (BUSY, WrongStateError, "Requested nodes are busy"),
        (OVER_LIMIT, WrongStateError, "not available now"),
        (NO_PARTITION, UsageError, "Invalid partition name"),
    ],
)
def test_slurm_words_become_our_errors(stderr: str, error: type, words: str) -> None:
    found = slurm.classify("salloc", stderr)
    assert type(found) is error
    assert words in str(found)
    assert "error:" not in found.message  # Slurm's prefix is dropped


def test_unforeseen_failures_are_left_to_command_failed() -> None:
    assert slurm.classify("squeue", "squeue: error: something new\n") is None


def test_the_environment_keeps_only_which_slurm() -> None:
    env = {"PATH": "/bin", "SLURM_CONF": "/c", "SLURM_JOB_ID": "3",
           "SALLOC_PARTITION": "p", "SQUEUE_FORMAT": "%i"}  # fmt: skip
    assert slurm.slurm_env(env) == {"PATH": "/bin", "SLURM_CONF": "/c"}


def test_the_bed_config_holds_what_slurm_needs_without_systemd() -> None:
    conf = slurm_conf(Path("/w"), Path("/m/sock"), 4, 17000, "vm", "root")
    lines = conf.splitlines()
    for wanted in ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
                   "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
                   "SchedulerParameters=batch_sched_delay=0", "SlurmctldPort=17000",
                   "SlurmdSpoolDir=/w/spool/%n", "AuthInfo=socket=/m/sock",
                   "SlurmctldHost=vm(127.0.0.1)"]:  # fmt: skip
        assert wanted in lines
    nodes = [line for line in lines if line.startswith("NodeName=")]
    assert nodes[0] == "NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 " \
                       "CPUs=1 State=UNKNOWN"  # fmt: skip
    assert len(nodes) == 4
    assert "Port=17004" in nodes[3]
    assert not [line for line in lines if "/etc/" in line or "/var/" in line]

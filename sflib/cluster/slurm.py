"""Slurm as the cluster's allocator (issue 7): a thin adapter over its commands.

One clone is one Slurm node. A ticket for n clones asks for 1 to n nodes, and so
for one task, one core under select/cons_tres with CR_Core, on each:

    salloc --no-shell --immediate --nodes=1-n --job-name=NAME

(Not with --ntasks-per-node=1: Slurm then sizes the job by its task count, which
is the range's low end, and grants one node whatever is free.)

Slurm's scheduler grants as many of those nodes as are free now, up to n, so Slurm
alone decides m <= n; with no node free it refuses (WrongStateError). Slurm has no
range of CPUs or tasks, only of nodes: a clone per CPU would have the adapter pick
m itself. A host that should hold k clones of one ticket is declared as k Slurm
nodes (several slurmd on one host, as SlurmBed does), or gets one clone per ticket.

A partition's MaxNodes is the one limit Slurm does not clamp a node range to: it
refuses the whole request as "not available now". So allocate() caps n at it first.

The pure parts (argv, output parsing, error classes) are separate and unit-tested;
every command runs through sflib.run with an explicit environment.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from sflib import run
from sflib.errors import (
    AuthError,
    CommandFailed,
    OperationTimeout,
    SnowFlockError,
    SystemFailure,
    UnreachableError,
    UsageError,
    WrongStateError,
)

log = logging.getLogger(__name__)

# Slurm's clients retry an absent slurmctld for MessageTimeout seconds (10 by
# default), and squeue twice over, so a dead controller takes up to ~20 s to show.
TIMEOUT = 60.0
MAX_NODES = 4096  # more than any cluster of ours: a typo, not a wish


@dataclass(frozen=True)
class Allocation:
    """A granted Slurm job: len(nodes) <= the n asked for, one clone per node."""

    job_id: int
    nodes: list[str]
    name: str


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    max_nodes: int | None  # None: UNLIMITED
    up: bool


class Outcome(enum.Enum):
    RUNNING = "running"  # the job holds its nodes
    ENDING = "ending"  # Slurm is taking the nodes back; how it ended shows shortly
    COMPLETED = "completed"
    CANCELLED = "cancelled"  # scancel, or a deadline
    PREEMPTED = "preempted"  # cancelled or requeued for a job of higher priority
    TIMEOUT = "timeout"  # its time limit
    FAILED = "failed"  # a node failed, or the job could not be started
    GONE = "gone"  # Slurm forgot it (MinJobAge after its end): ended, how is lost


@dataclass(frozen=True)
class JobState:
    job_id: int
    outcome: Outcome
    slurm_state: str  # Slurm's word, e.g. "NODE_FAIL"
    reason: str

    @property
    def ended(self) -> bool:
        return self.outcome is not Outcome.RUNNING


# squeue's %T words (Slurm 22.05, job_state_string) by what they mean to a ticket.
_WORDS: dict[Outcome, str] = {
    Outcome.RUNNING: "RUNNING CONFIGURING SUSPENDED STOPPED RESIZING POWER_UP_NODE UPDATE_DB",
    Outcome.ENDING: "COMPLETING SIGNALING STAGE_OUT",
    Outcome.COMPLETED: "COMPLETED",
    Outcome.CANCELLED: "CANCELLED DEADLINE REVOKED",
    # An allocation made with --immediate only waits again if it lost its nodes:
    # preemption with requeue (or an administrator's requeue).
    Outcome.PREEMPTED: "PREEMPTED PENDING REQUEUED REQUEUE_HOLD REQUEUE_FED SPECIAL_EXIT "
    "RESV_DEL_HOLD",
    Outcome.TIMEOUT: "TIMEOUT",
    Outcome.FAILED: "FAILED NODE_FAIL BOOT_FAIL OUT_OF_MEMORY",
}
_OUTCOMES = {word: outcome for outcome, words in _WORDS.items() for word in words.split()}

# Slurm's own words on stderr, to our error classes. Every client exits 1 (scancel
# other codes) whatever went wrong, so the words are all there is.
_UNREACHABLE = ("Unable to contact slurm controller", "Munge encode failed")
_AUTH = ("authentication error", "Invalid authentication credential")
_BUSY = ("Requested nodes are busy", "not available now", "Unable to allocate resources",
         "Requested node configuration is not available")  # fmt: skip
_INVALID = ("Invalid partition", "invalid partition", "Invalid account", "invalid account",
            "Invalid qos", "Invalid node", "No partition specified",
            "Access/permission denied")  # fmt: skip


# Pure parts ---------------------------------------------------------------------


def slurm_env(base: Mapping[str, str]) -> dict[str, str]:
    """base without the variables that would change what the commands do behind our
    argv (SALLOC_PARTITION, SQUEUE_FORMAT, a surrounding job's SLURM_JOB_ID ...);
    SLURM_CONF, which says which Slurm to talk to, stays."""
    prefixes = ("SALLOC_", "SQUEUE_", "SCANCEL_", "SCONTROL_", "SLURM_")
    return {k: v for k, v in base.items() if k == "SLURM_CONF" or not k.startswith(prefixes)}


def salloc_argv(nodes: int, name: str, partition: str | None = None,
                account: str | None = None, wait: int = 0) -> list[str]:  # fmt: skip
    """salloc for 1 to nodes nodes, now or never (wait: seconds Slurm may take, e.g.
    to preempt jobs of a lower priority)."""
    argv = ["salloc", "--no-shell", "--immediate" if wait <= 0 else f"--immediate={wait}",
            f"--nodes=1-{nodes}", f"--job-name={name}"]  # fmt: skip
    if partition is not None:
        argv.append(f"--partition={partition}")
    if account is not None:
        argv.append(f"--account={account}")
    return argv


def parse_granted(stderr: str) -> int:
    """The job id in salloc's "Granted job allocation N" (it says so on stderr only).

    Raises SystemFailure if the line is not there.
    """
    found = re.search(r"Granted job allocation (\d+)", stderr)
    if found is None:
        raise SystemFailure(f"salloc said nothing of a granted job: {_last_line(stderr)}")
    return int(found.group(1))


def parse_partitions(text: str) -> dict[str, Partition]:
    """`scontrol --oneliner show partition`: one partition a line, KEY=VALUE words."""
    found = {}
    for line in text.splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "PartitionName" not in fields:
            continue
        raw = fields.get("MaxNodes", "UNLIMITED")
        found[fields["PartitionName"]] = Partition(
            fields["PartitionName"],
            fields.get("Default") == "YES",
            None if raw == "UNLIMITED" or not raw.isdigit() else int(raw),
            fields.get("State", "UP") == "UP",
        )
    return found


def node_cap(n: int, partitions: dict[str, Partition], partition: str | None) -> int:
    """n capped at the partition's MaxNodes (the named one, or the default).

    Raises UsageError (no such partition).
    """
    if partition is None:
        chosen = next((p for p in partitions.values() if p.default), None)
    elif partition in partitions:
        chosen = partitions[partition]
    else:
        raise UsageError(f"Slurm has no partition {partition}",
                         hint="see sinfo --summarize")  # fmt: skip
    if chosen is None or chosen.max_nodes is None:
        return n
    return max(1, min(n, chosen.max_nodes))


def parse_job_state(job_id: int, stdout: str) -> JobState:
    """`squeue -j ID --states=all -h -o %T|%r`; no line: Slurm forgot the job.

    Raises SystemFailure (a state this module does not know).
    """
    line = stdout.strip().splitlines()[:1]
    if not line:
        return JobState(job_id, Outcome.GONE, "", "")
    word, _, reason = line[0].partition("|")
    outcome = _OUTCOMES.get(word.strip())
    if outcome is None:
        raise SystemFailure(f"Slurm job {job_id} is in state {word!r}, unknown to SnowFlock")
    return JobState(job_id, outcome, word.strip(), reason.strip())


def classify(program: str, stderr: str) -> SnowFlockError | None:
    """The error Slurm's words on stderr mean, or None for an unforeseen failure."""
    last = _last_line(stderr)
    if any(w in stderr for w in _UNREACHABLE):
        what = "munged" if "Munge" in stderr else "slurmctld"
        return UnreachableError(f"{program}: Slurm cannot be reached ({what}): {last}",
                                hint=f"is {what} running? check SLURM_CONF")  # fmt: skip
    if any(w in stderr for w in _AUTH):
        return AuthError(f"{program}: Slurm refused our credentials: {last}",
                         hint="munge keys must match slurmctld's")  # fmt: skip
    if any(w in stderr for w in _BUSY):
        return WrongStateError(f"Slurm has no node free now: {last}",
                               hint="release a ticket, or ask for fewer clones")  # fmt: skip
    if any(w in stderr for w in _INVALID):
        return UsageError(f"Slurm refused the request: {last}")
    return None


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return re.sub(r"^\w+: error: ", "", lines[-1]) if lines else "no error output"


# Commands -----------------------------------------------------------------------


def _slurm(argv: list[str], env: Mapping[str, str] | None,
           timeout: float = TIMEOUT) -> run.Completed:  # fmt: skip
    """Run one Slurm client. Raises what classify() finds, else CommandFailed;
    SystemFailure (not installed), OperationTimeout."""
    try:
        done = run.run(argv, env=slurm_env(os.environ if env is None else env),
                       timeout=timeout, check=False)  # fmt: skip
    except OperationTimeout:
        raise
    except SystemFailure as e:  # the program is not there (check=False: no CommandFailed)
        raise SystemFailure(e.message, hint="install slurm-client") from e
    if done.returncode != 0:
        raise classify(argv[0], done.stderr) or CommandFailed(
            done.argv, done.returncode, done.stderr
        )
    return done


def allocate(n: int, partition: str | None = None, account: str | None = None,
             name: str | None = None, env: Mapping[str, str] | None = None,
             wait: int = 0) -> Allocation:  # fmt: skip
    """Ask Slurm for n clones' nodes now; it grants 1 to n of them (see the module).
    wait: seconds Slurm may take (e.g. to preempt lower-priority jobs); 0: now or never.

    name must be unique among the user's jobs (the default is): after a timeout, the
    jobs of that name are cancelled, lest a grant whose answer was lost keep nodes.
    Raises UsageError (n out of range, no such partition or account),
    WrongStateError (no node free), UnreachableError (slurmctld or munged down),
    AuthError, OperationTimeout, SystemFailure; when it raises, no job is left,
    except if slurmctld vanished between its grant and our cleanup (logged).
    """
    if not 1 <= n <= MAX_NODES:
        raise UsageError(f"cannot ask Slurm for {n} nodes", hint=f"ask for 1 to {MAX_NODES}")
    name = name or f"sf-{secrets.token_hex(4)}"
    shown = _slurm(["scontrol", "--all", "--oneliner", "show", "partition"], env)
    cap = node_cap(n, parse_partitions(shown.stdout), partition)
    try:
        done = _slurm(salloc_argv(cap, name, partition, account, wait), env, TIMEOUT + wait)
    except OperationTimeout:
        _cancel_quietly(["scancel", f"--name={name}"], env, f"jobs named {name}")
        raise
    job_id = parse_granted(done.stderr)
    try:
        nodes = job_nodes(job_id, env)
        if not nodes:
            raise SystemFailure(f"Slurm granted job {job_id} but lists no node for it")
    except SnowFlockError:
        _cancel_quietly(["scancel", str(job_id)], env, f"job {job_id}")
        raise
    log.info("Slurm job %d (%s): %d of %d nodes: %s", job_id, name, len(nodes), n,
             ",".join(nodes))  # fmt: skip
    return Allocation(job_id, nodes, name)


def job_nodes(job_id: int, env: Mapping[str, str] | None = None) -> list[str]:
    """The node names a job holds (or held, if it ended), e.g. ["n1", "n2"]; [] for
    a job Slurm does not know.

    Raises UnreachableError, AuthError, OperationTimeout, SystemFailure.
    """
    hostlist = (_squeue_job(job_id, "%N", env) or "").strip()
    if not hostlist:
        return []
    names = _slurm(["scontrol", "show", "hostnames", hostlist], env)
    return names.stdout.split()


def release(job_id: int, env: Mapping[str, str] | None = None) -> None:
    """Cancel the job; a job that ended or that Slurm forgot is fine (scancel says
    nothing of them and exits 0). Raises UnreachableError, AuthError,
    OperationTimeout, SystemFailure."""
    _slurm(["scancel", str(job_id)], env)
    log.info("Slurm job %d released", job_id)


def state(job_id: int, env: Mapping[str, str] | None = None) -> JobState:
    """Where the job stands: running, or ended and how (Outcome). Works without
    slurmdbd (sacct needs it): squeue shows ended jobs for MinJobAge seconds.

    Raises UnreachableError, AuthError, OperationTimeout, SystemFailure.
    """
    shown = _squeue_job(job_id, "%T|%r", env)
    if shown is None:
        return JobState(job_id, Outcome.GONE, "", "")
    return parse_job_state(job_id, shown)


def _squeue_job(job_id: int, fmt: str, env: Mapping[str, str] | None) -> str | None:
    """squeue's line on one job, ended ones included; None if Slurm does not know it.
    Raises as _slurm()."""
    argv = ["squeue", "-j", str(job_id), "--states=all", "--noheader", f"--format={fmt}"]
    try:
        return _slurm(argv, env).stdout
    except CommandFailed as e:
        # squeue fails on an id that slurmctld no longer (or never) knew.
        if "Invalid job id" in e.stderr:
            return None
        raise


def _cancel_quietly(argv: list[str], env: Mapping[str, str] | None, what: str) -> None:
    try:
        _slurm(argv, env)
    except SnowFlockError as e:
        log.warning("cannot cancel %s, which may hold nodes: %s", what, e)

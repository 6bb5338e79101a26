"""A real Slurm on this machine, for tests (issue 7): munged, slurmctld and one
slurmd per node, each in the foreground, under one directory and on ports of their
own. Nothing of the machine's Slurm or munge is touched: no systemd, no /etc/slurm,
no /run/munge, nothing to syslog.

    with SlurmBed.create(workdir, nodes=4) as bed:
        slurm.allocate(2, env=bed.env)       # SLURM_CONF says which Slurm
        bed.cancel(job_id)                   # as an administrator would
        bed.stop_controller(); bed.start_controller()

Nodes n1..nN all live on localhost, one core each (Slurm's multiple-slurmd mode:
`slurmd -N nK`). Partitions: batch (the default); urgent, whose jobs preempt batch
jobs; and top, whose jobs preempt both (PreemptMode=CANCEL; top's jobs are never
preempted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sflib import run
from sflib.errors import OperationTimeout, SnowFlockError, SystemFailure

log = logging.getLogger(__name__)

PARTITION, URGENT, TOP = "batch", "urgent", "top"
FIRST_PORT = 17000  # slurmctld's; the nodes' follow it
START_TIMEOUT = 30.0
# Unix socket paths stop at 108 bytes; leave room for munged's ".lock" beside it.
MAX_SOCKET_PATH = 96


def slurm_conf(root: Path, munge_socket: Path, nodes: int, port: int, host: str,
               user: str) -> str:  # fmt: skip
    """slurm.conf for the bed: every path under root, slurmctld on port, node nK
    (one core) on port + K. The settings are those Slurm 22.05 needs to run
    without systemd or cgroups."""
    lines = [
        "ClusterName=sfbed",
        f"SlurmctldHost={host}(127.0.0.1)",  # slurmctld checks it is this host
        f"SlurmctldPort={port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",  # clients and daemons alike find munged here
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",  # %n: several slurmd on one host
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        # No log files: in the foreground (-D) the daemons log to stderr, which we
        # keep per daemon; and not to syslog, which is the machine's.
        "SlurmctldSyslogDebug=quiet",
        "SlurmdSyslogDebug=quiet",
        f"PlugStackConfig={root}/plugstack.conf",  # not /etc/slurm's SPANK plugins
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",  # no cgroups
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerParameters=batch_sched_delay=0",
        "SlurmdParameters=config_overrides",  # nK has one core whatever the machine has
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",  # no slurmdbd, so no sacct
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        # Clients retry an absent slurmctld for MessageTimeout s: keep fault tests short.
        "MessageTimeout=2",
        "PreemptType=preempt/partition_prio",
        "PreemptMode=CANCEL",
    ]
    for k in range(1, nodes + 1):
        lines.append(f"NodeName=n{k} NodeHostname=localhost NodeAddr=127.0.0.1 "
                     f"Port={port + k} CPUs=1 State=UNKNOWN")  # fmt: skip
    every = "Nodes=ALL MaxTime=INFINITE State=UP"
    lines += [
        f"PartitionName={PARTITION} {every} Default=YES PriorityTier=1",
        f"PartitionName={URGENT} {every} PriorityTier=2",
        f"PartitionName={TOP} {every} PriorityTier=3 PreemptMode=OFF",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class BedDaemon:
    """One daemon of the bed, in the foreground, its output in its log."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        """Raises SystemFailure (cannot run it)."""
        try:
            with self.log.open("ab") as out:
                # A test killed outright must not leave daemons behind.
                self.proc = subprocess.Popen(
                    self.argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    preexec_fn=run.die_with_parent,  # noqa: PLW1509 (no threads fork here)
                )
        except OSError as e:
            raise SystemFailure(f"cannot run {self.argv[0]}: {e.strerror}",
                                hint="make deps installs Slurm and munge") from e  # fmt: skip

    def check(self) -> None:
        """Raises SystemFailure, with the end of its log, if it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemFailure(f"{self.name} exited with status {self.proc.returncode}: "
                                f"{' / '.join(tail) or 'no output'}")  # fmt: skip

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, SIGKILL after timeout; its exit status (None: was not running)."""
        if self.proc is None:
            return None
        status = run.stop(self.proc, timeout=timeout)
        self.proc = None
        return status

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class SlurmBed:
    root: Path  # everything of the bed but, perhaps, munged's socket
    nodes: list[str]
    port: int  # slurmctld's
    munge_dir: Path
    daemons: dict[str, BedDaemon] = field(default_factory=dict)
    netns: str | None = None  # the network namespace it runs in (None: ours)

    def command(self, *argv: str) -> list[str]:
        """argv as run where the bed runs (a Slurm client must reach 127.0.0.1 there)."""
        return [*run.in_netns(self.netns), *argv]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment to reach this Slurm (munged's socket is in slurm.conf)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    @contextlib.contextmanager
    def create(cls, workdir: Path, nodes: int = 4,
               netns: str | None = None) -> Iterator[SlurmBed]:  # fmt: skip
        """Start munged, slurmctld and the nodes' slurmd under workdir/slurm, and wait
        until every node is idle; on leaving, stop them and remove the files (kept,
        with the logs, if the body raised). Raises SystemFailure, OperationTimeout."""
        root = workdir / "slurm"
        try:
            root.mkdir(parents=True)  # not exist_ok: never two beds in one folder
        except OSError as e:
            raise SystemFailure(f"cannot make the Slurm bed's folder {root}: {e}") from e
        try:
            bed = cls(root, [f"n{k}" for k in range(1, nodes + 1)], _free_ports(nodes + 1),
                      _munge_dir(root), netns=netns)  # fmt: skip
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        ok = False
        try:
            bed._write_files()
            bed._start_munge()
            bed.start_controller(wait_nodes=False)
            for node in bed.nodes:
                bed._start_slurmd(node)
            bed.wait_nodes({"idle"})
            yield bed
            ok = True
        finally:
            bed.destroy(remove=ok)

    def _write_files(self) -> None:
        for sub in ["state", "run", "log", *(f"spool/{n}" for n in self.nodes)]:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        user = pwd.getpwuid(os.getuid()).pw_name
        self.conf.write_text(slurm_conf(self.root, self.munge_socket, len(self.nodes),
                                        self.port, socket.gethostname().split(".")[0],
                                        user))  # fmt: skip
        (self.root / "plugstack.conf").write_text("")
        key = self.root / "munge.key"
        # munged wants a key only its user can read; any 32 bytes or more will do.
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))

    def _start_munge(self) -> None:
        argv = ["munged", "--foreground", f"--socket={self.munge_socket}",
                f"--key-file={self.root}/munge.key", f"--pid-file={self.root}/run/munged.pid",
                f"--seed-file={self.root}/state/munged.seed", "--num-threads=4"]  # fmt: skip
        daemon = self._daemon("munged", argv)
        self._until(self.munge_socket.exists, "munged's socket", daemon)

    def _start_slurmd(self, node: str) -> None:
        self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node])

    def _daemon(self, name: str, argv: list[str]) -> BedDaemon:
        daemon = BedDaemon(name, self.command(*argv), self.root / "log" / f"{name}.log")
        self.daemons[name] = daemon
        daemon.start(self.env)
        return daemon

    def start_controller(self, wait_nodes: bool = True) -> None:
        """(Re)start slurmctld, which recovers its jobs from its state, and wait until
        it answers (and, wait_nodes, until every node has registered with it again:
        a few seconds). Raises SystemFailure, OperationTimeout."""
        if "slurmctld" in self.daemons:
            return
        daemon = self._daemon("slurmctld", ["slurmctld", "-D"])
        self._until(self._controller_answers, "slurmctld", daemon)
        if wait_nodes:
            self.wait_nodes({"idle", "allocated", "mixed", "completing"})

    def _controller_answers(self) -> bool:
        if self.netns is None:
            return _accepts(self.port)
        return run.run(self.command("scontrol", "ping"), env=self.env, timeout=10,
                       check=False).stdout.find("UP") >= 0  # fmt: skip

    def stop_controller(self) -> None:
        """Stop slurmctld (a fault test): the nodes and munged go on."""
        daemon = self.daemons.pop("slurmctld", None)
        if daemon is not None:
            daemon.stop()

    def cancel(self, job_id: int) -> None:
        """Cancel a job from outside, as an administrator would. Raises SnowFlockError."""
        run.run(self.command("scancel", str(job_id)), env=self.env, timeout=30)

    def node_states(self) -> dict[str, str]:
        """{node: sinfo's state word}, e.g. "idle", "allocated", "idle*" (the "*":
        not responding). Raises SnowFlockError."""
        shown = run.run(self.command("sinfo", "--noheader", "--Node", "--format=%N %T"),
                        env=self.env,
                        timeout=30)  # fmt: skip
        return dict(line.split(None, 1) for line in shown.stdout.splitlines() if line.strip())

    def wait_nodes(self, states: set[str], timeout: float = START_TIMEOUT) -> None:
        """Until every node is in one of states. Raises OperationTimeout, SystemFailure
        (a daemon died)."""

        def reached() -> bool:
            found = self.node_states()
            return set(found) == set(self.nodes) and set(found.values()) <= states

        self._until(reached, f"the nodes to be {' or '.join(sorted(states))}", timeout=timeout)

    def _until(self, ready: Callable[[], bool], what: str, daemon: BedDaemon | None = None,
               timeout: float = START_TIMEOUT) -> None:  # fmt: skip
        # Polling: none of these daemons can report readiness on a descriptor.
        deadline = time.monotonic() + timeout
        while not ready():
            for d in [daemon] if daemon else self.daemons.values():
                d.check()
            if time.monotonic() > deadline:
                raise OperationTimeout(f"waited {timeout:g} s for {what}; see {self.root}/log")
            time.sleep(0.05)

    def destroy(self, remove: bool = True) -> None:
        """Stop the daemons, nodes first; remove the files (remove=False: keep them)."""
        self._cancel_all()
        for name in sorted(self.daemons, key=_stop_order):
            status = self.daemons[name].stop()
            if status not in (0, None, -signal.SIGTERM):
                log.warning("%s exited with status %s; see %s", name, status,
                            self.daemons[name].log)  # fmt: skip
        self.daemons.clear()
        if self.munge_dir.parent != self.root:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            log.warning("Slurm bed kept for its logs: %s", self.root)

    def _cancel_all(self) -> None:
        """Jobs that ran steps leave slurmstepd processes, which outlive slurmd (a
        parent-death signal is not inherited across fork): end them through Slurm."""
        needed = [self.daemons.get(name) for name in ("slurmctld", "munged")]
        if not all(d is not None and d.running for d in needed):
            return  # a fault test stopped part of Slurm: nothing to ask
        try:
            if not self._live_jobs():
                return
            user = pwd.getpwuid(os.getuid()).pw_name
            run.run(self.command("scancel", f"--user={user}"), env=self.env, timeout=10)
            self._until(lambda: not self._live_jobs(), "the jobs to end", timeout=10)
        except SnowFlockError as e:
            log.warning("cannot end the Slurm bed's jobs: %s", e)

    def _live_jobs(self) -> list[str]:
        """The ids of the jobs not ended yet (squeue's default states)."""
        shown = run.run(self.command("squeue", "--noheader", "--format=%i"), env=self.env,
                        timeout=10)  # fmt: skip
        return shown.stdout.split()


def _stop_order(name: str) -> int:
    return {"munged": 2, "slurmctld": 1}.get(name, 0)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _free_ports(count: int) -> int:
    """The first of count consecutive ports (from FIRST_PORT, by hundreds) that no one
    listens on, so a bed never meets another Slurm, or a bed left by a killed test.
    Raises SystemFailure."""
    for first in range(FIRST_PORT, FIRST_PORT + 2000, 100):
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise SystemFailure(f"no {count} free consecutive ports from {FIRST_PORT}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons bind
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _munge_dir(root: Path) -> Path:
    """Where munged's socket goes. munged refuses a socket whose folders others
    cannot traverse (pytest's temporary folders are 0700), and socket paths are
    short: so under root if it can, else in a folder of its own in /tmp."""
    wanted = root / "munge"
    if _traversable(root) and len(str(wanted / "munge.socket.lock")) <= MAX_SOCKET_PATH:
        wanted.mkdir()
        wanted.chmod(0o755)  # whatever the umask
        return wanted
    made = Path(tempfile.mkdtemp(prefix="sfmunge-", dir="/tmp"))
    made.chmod(0o755)
    return made


def _traversable(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents])

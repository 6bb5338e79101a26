"""Every subprocess SnowFlock starts goes through here.

Argument lists only (never a shell string), an explicit environment, stdin from
/dev/null unless input is given, a timeout that escalates SIGTERM then SIGKILL, and
stderr captured into the CommandFailed raised on a non-zero exit. Every child gets a
signal when the process that started it dies (die_with_parent), however it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sflib.errors import CommandFailed, OperationTimeout, SystemFailure

log = logging.getLogger(__name__)

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _prepare(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    cmd = [os.fspath(a) for a in argv]
    log.debug("+ %s", " ".join(cmd))
    return cmd


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    check: bool = True,
    cwd: str | os.PathLike[str] | None = None,
    death_signal: int = signal.SIGTERM,
) -> Completed:
    """Run a command to completion and return its output. The child gets death_signal
    if this process dies first (see die_with_parent).

    Raises CommandFailed (non-zero exit, when check), OperationTimeout, SystemFailure
    (the program cannot be started).
    """
    cmd = _prepare(argv)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            text=True,
            preexec_fn=_pdeath(death_signal),  # noqa: PLW1509 (see die_with_parent)
        )
    except OSError as e:
        raise SystemFailure(f"cannot run {cmd[0]}: {e.strerror}") from e
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _terminate(proc)
        raise OperationTimeout(f"{cmd[0]} did not finish within {timeout:g} s") from None
    except BaseException:  # ^C (KeyboardInterrupt) or the like: never leave it running
        proc.kill()
        proc.wait()
        raise
    if check and proc.returncode != 0:
        raise CommandFailed(cmd, proc.returncode, err, out or "")
    return Completed(cmd, proc.returncode, out, err)


def _terminate(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


async def run_async(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    check: bool = True,
    death_signal: int = signal.SIGTERM,
) -> Completed:
    """The asyncio twin of run(), for daemons. Raises as run() does."""
    cmd = _prepare(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            preexec_fn=_pdeath(death_signal),
        )
    except OSError as e:
        raise SystemFailure(f"cannot run {cmd[0]}: {e.strerror}") from e
    try:
        data = input.encode() if input is not None else None
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        await terminate_async(proc)
        raise OperationTimeout(f"{cmd[0]} did not finish within {timeout:g} s") from None
    returncode = proc.returncode if proc.returncode is not None else -1
    if check and returncode != 0:
        raise CommandFailed(
            cmd, returncode, err.decode(errors="replace"), out.decode(errors="replace")
        )
    return Completed(cmd, returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def terminate_async(proc: asyncio.subprocess.Process, grace: float = KILL_GRACE) -> None:
    """SIGTERM, then SIGKILL after grace seconds; always reaps the process."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    """Signal a child started with Popen and reap it, SIGKILL after timeout; its
    exit status."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def ready_line(fd: int, timeout: float) -> bytes:
    """What a daemon started with --ready-fd wrote on fd, up to its first newline
    (b"\n": ready; b"": it closed fd, so it exited). Raises OperationTimeout if it
    says nothing within timeout: a stuck daemon fails its caller, never hangs it."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise OperationTimeout(f"no ready line within {timeout:g} s")
        chunk = os.read(fd, 256)
        if not chunk:
            break
        line += chunk
    return line


def in_netns(netns: str | None) -> list[str]:
    """The argv prefix that runs a command in the named network namespace (None:
    this process's own)."""
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def netns_option(netns: str | None) -> list[str]:
    """ip, bridge and tc's own option for a named network namespace."""
    return ["-n", netns] if netns else []


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """In the child before exec (a preexec_fn): get sig when the daemon that started
    us dies, so a killed sfld never leaves a QEMU behind, whatever killed it (SIGKILL
    included: the kernel sends sig, not sfld). Given the parent's pid, also exit at
    once if the parent died between fork and prctl (nobody would signal us then).

    The kernel's "parent" here is the thread that forked, not the process: the signal
    comes when that thread exits. run() forks in the thread that then waits for the
    child, and the asyncio calls in the loop's thread, which reaps it; so the thread
    outlives its child unless the process dies, also when run() is called from a
    worker thread (asyncio.to_thread). A thread that forked a long-lived child and
    then ended would take the child with it: nothing here does that.

    Python warns that a preexec_fn may deadlock in a threaded program (a lock held by
    another thread at fork); this one only calls prctl and getppid, which take none.
    """
    if _LIBC.prctl(PR_SET_PDEATHSIG, sig) != 0:
        os._exit(111)
    if parent is not None and os.getppid() != parent:
        os._exit(111)


def _pdeath(sig: int) -> Callable[[], None]:
    """die_with_parent as a preexec_fn for a child of this process."""
    return functools.partial(die_with_parent, sig, os.getpid())


async def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_file: Path,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """Start a long-running child (QEMU) with stdout and stderr appended to log_file.

    The child is sent SIGTERM if the calling process (strictly, the loop's thread)
    dies. Raises SystemFailure.
    """
    cmd = _prepare(argv)
    try:
        out = log_file.open("ab")
    except OSError as e:
        raise SystemFailure(f"cannot open {log_file}: {e.strerror}") from e
    try:
        with out:
            return await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=tuple(pass_fds),
                env=dict(env) if env is not None else None,
                preexec_fn=_pdeath(signal.SIGTERM),
            )
    except OSError as e:
        raise SystemFailure(f"cannot run {cmd[0]}: {e.strerror}") from e


async def spawn_ready(
    argv_for: Callable[[int], Sequence[str | os.PathLike[str]]],
    *,
    log_file: Path,
    timeout: float,
) -> tuple[asyncio.subprocess.Process, str]:
    """Start a long-running child that reports readiness s6-style: argv_for(fd) is
    its command line, given the descriptor it writes one line to once ready.

    Returns the child and that line. If the child exits or stays silent first, it is
    stopped and SystemFailure (with the end of its log) or OperationTimeout raised.
    """
    r, w = os.pipe()
    try:
        proc = await spawn(argv_for(w), log_file=log_file, pass_fds=[w])
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        line = await asyncio.wait_for(_read_line(r), timeout)
    except TimeoutError:
        await terminate_async(proc)
        raise OperationTimeout(f"{argv_for(w)[0]} not ready within {timeout:g} s") from None
    if not line.endswith(b"\n"):
        await terminate_async(proc)
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SystemFailure(f"{argv_for(w)[0]} failed to start: {tail[0]}")
    return proc, line.decode().strip()


async def _read_line(fd: int) -> bytes:
    """One line from a pipe without blocking the loop; b"" or a partial line at EOF.
    Closes fd."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await reader.readline()
    finally:
        transport.close()

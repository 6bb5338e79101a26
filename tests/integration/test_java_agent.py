"""The Java binding (java/, snowflock.3java) against the real guest agent and a real
XenStore server, with the fake sfld behind them (fake_sfld.py), on this machine's JVM:
no VM. build/snowflock-test.jar's Drive makes each call from the command line, as
build/sf-cdrive does for C, so both bindings meet the same answers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sflib.exitcodes import ExitCode
from sflib.guest import layout
from tests.integration.conftest import ROOT
from tests.integration.fake_sfld import (
    CLONE_ID,
    CODES,
    ERRORS,
    HOME,
    JOIN_DELAY,
    Guest,
    fake_guest,
)

JARS = (ROOT / "build/snowflock.jar", ROOT / "build/snowflock-test.jar")
DRIVE = "org.snowflock.test.Drive"
CALL_TIMEOUT = 60.0  # s: a JVM's start on a loaded machine included


@pytest.fixture(scope="module")
def jars() -> None:
    if shutil.which("java") is None:
        pytest.fail("no java on PATH: make deps installs openjdk-17-jdk-headless")
    out = subprocess.run(["make", "-C", str(ROOT), "java"], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"make java failed:\n{out.stdout}{out.stderr}"


@pytest.fixture
async def guest(tmp_path: Path, jars: None) -> AsyncIterator[Guest]:
    async with fake_guest(tmp_path) as g:
        yield g


@dataclass
class Run:
    code: int
    out: list[list[str]]
    err: str


async def drive(guest: Guest, *args: str, env: dict[str, str] | None = None) -> Run:
    classpath = ":".join(str(jar) for jar in JARS)
    proc = await asyncio.create_subprocess_exec(
        "java", "-Xshare:auto", "-cp", classpath, DRIVE, *args, env={**guest.env, **(env or {})},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT)
    assert proc.returncode is not None
    return Run(proc.returncode, [line.split() for line in out.decode().splitlines()], err.decode())


async def test_every_call_and_its_result(guest: Guest) -> None:
    got = await drive(guest, "ticket", "3")
    assert got.code == 0 and got.out[0][0] == "TICKET", got
    ticket = got.out[0][1]
    assert got.out[0][2:] == ["3", "3"]
    assert (await drive(guest, "clone", ticket)).out == [["ID", "0"]]
    assert (await drive(guest, "checkpoint")).out == [["CKPT", "c1-fake", "0"]]
    assert (await drive(guest, "create", "c1-fake", ticket)).out == [["CREATED"]]
    joined = await drive(guest, "join", ticket)
    assert joined.code == 0, joined
    assert joined.out == [["CLONE", str(k), "exited", str(30 + k)] for k in (1, 2, 3)] + [
        ["COUNT", "3"]
    ]
    other = (await drive(guest, "ticket", "2")).out[0][1]
    assert (await drive(guest, "kill", other)).out == [["KILLED", "2"]]
    assert [op for op, _ in guest.sfld.requests] == [
        "ticket", "clone", "checkpoint", "create_clones", "join", "ticket", "kill"
    ]  # fmt: skip
    assert guest.sfld.requests[0][1] == {"n": 3}
    assert guest.sfld.requests[3][1] == {"checkpoint": "c1-fake", "ticket": ticket}
    assert guest.server.local.directory(f"{HOME}/{layout.REPLIES}") == []  # each removed
    assert guest.held() == 0  # every client's watch gone with it


async def test_errors_carry_the_exit_codes(guest: Guest) -> None:
    for ticket, code in CODES.items():
        got = await drive(guest, "join", ticket)
        expected = [["ERR", str(code), ERRORS[ticket].__name__]]  # sfld's error type
        assert (got.code, got.out) == (code, expected), (ticket, got)
        assert f"error: fake {ticket}" in got.err
    got = await drive(guest, "join", "t-nosuch")
    assert (got.code, got.out) == (3, [["ERR", "3", "NotFoundError"]])
    got = await drive(guest, "ticket", "0")
    assert got.code == 2 and "n must be an integer" in got.err
    got = await drive(guest, "ticket", "9")
    assert got.code == 4 and "no clone slot is free (try fewer)" in got.err
    got = await drive(guest, "create", "c9-nosuch", (await drive(guest, "ticket", "1")).out[0][1])
    assert got.code == 3
    got = await drive(guest, "exit", "0")  # in a parent: refused
    assert (got.code, got.out) == (4, [["ERR", "4", "WrongStateError"]])
    assert "sf-exit is for clones" in got.err


async def test_the_codes_are_the_tools_exit_codes(guest: Guest) -> None:
    got = await drive(guest, "codes")
    assert {line[1]: int(line[2]) for line in got.out} == {c.name: int(c) for c in ExitCode
                                                           if c != ExitCode.OK}  # fmt: skip


async def test_exit_waits_for_the_end_after_sfld_took_it(guest: Guest) -> None:
    classpath = ":".join(str(jar) for jar in JARS)
    proc = await asyncio.create_subprocess_exec("java", "-cp", classpath, DRIVE, "exit", "7",
                                                env=guest.env)  # fmt: skip
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5.0)
        assert ("exit", {"status": 7}) in guest.sfld.requests
    finally:
        proc.kill()
        await proc.wait()


async def test_unreachable_without_agent_or_port(guest: Guest, tmp_path: Path) -> None:
    missing = {"XENSTORED_PATH": str(tmp_path / "none"), "SF_XENBUS": str(tmp_path / "none")}
    got = await drive(guest, "ticket", "1", env=missing)
    assert (got.code, got.out) == (5, [["ERR", "5", "-"]])
    assert "is this a SnowFlock VM?" in got.err


async def test_a_dead_agents_socket_leaves_the_port(guest: Guest, tmp_path: Path) -> None:
    """A socket file nobody listens on: the binding goes to the port, as libsnowflock."""
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # bound, never listening: connect() is refused
        got = await drive(guest, "ticket", "1", env={"XENSTORED_PATH": str(dead)})
    assert (got.code, got.out) == (5, [["ERR", "5", "-"]])
    assert "no XenStore port at /dev/virtio-ports/org.snowflock.xenbus" in got.err


async def test_the_port_directly_when_sf_xenbus_names_it(guest: Guest) -> None:
    """$SF_XENBUS bypasses the agent; the binding removes its watch itself there."""
    got = await drive(guest, "ticket", "2", env={"SF_XENBUS": guest.env["SF_PORT_SOCKET"]})
    assert got.code == 0 and got.out[0][0] == "TICKET", got
    await asyncio.sleep(0.1)
    assert guest.held() == 0


async def test_a_clone_runs_its_hooks_with_its_identity(guest: Guest) -> None:
    post = guest.hooks / "clone-post.d"
    post.mkdir(parents=True)
    record = guest.hooks / "env.out"
    (post / "10-record").write_text(f"#!/bin/sh\nenv | sort > {record}\n")
    (post / "20-fails").write_text("#!/bin/sh\necho why not >&2\nexit 3\n")
    (post / "30-after").write_text(f"#!/bin/sh\ntouch {guest.hooks}/after\n")
    (post / "40-skipped.bak").write_text(f"#!/bin/sh\ntouch {guest.hooks}/bak\n")
    for hook in post.iterdir():
        hook.chmod(0o755)
    (post / "35-not-executable").write_text(f"#!/bin/sh\ntouch {guest.hooks}/noexec\n")
    identity = {"id": CLONE_ID, "family": "fake", "ticket": "t1", "domid": 9, "ip": "10.1.0.4/24",
                "flag": True, "none": None, "net": {"a": [1, "b"]}}  # fmt: skip
    guest.server.local.write(f"{HOME}/{layout.IDENTITY}", json.dumps(identity).encode())
    ticket = (await drive(guest, "ticket", "7")).out[0][1]
    got = await drive(guest, "clone", ticket, env={"SF_EXTRA": "kept", "OTHER": "dropped"})
    assert (got.code, got.out) == (0, [["ID", str(CLONE_ID)]]), got
    env = dict(line.split("=", 1) for line in record.read_text().splitlines())
    assert env["SF_ID"] == "3" and env["SF_FAMILY"] == "fake" and env["SF_IP"] == "10.1.0.4/24"
    assert env["SF_FLAG"] == "True" and env["SF_NONE"] == "None"
    assert env["SF_NET"] == json.dumps(identity["net"])  # nested: JSON, as libsnowflock
    assert env["SF_HOOKS_EVENT"] == "clone" and env["SF_HOOKS_PHASE"] == "post"
    assert env["SF_EXTRA"] == "kept" and "OTHER" not in env and "XENSTORED_PATH" not in env
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert f"hook {post}/20-fails failed: {post}/20-fails failed with status 3: why not" in got.err
    assert (guest.hooks / "after").exists() and not (guest.hooks / "bak").exists()
    assert not (guest.hooks / "noexec").exists()


async def test_threads_of_one_process_call_at_once(guest: Guest) -> None:
    got = await drive(guest, "threads", "8")
    assert got.code == 0, got
    assert got.out[-1][0] == "ELAPSED-MS", got  # the threads' time, not the JVM's start
    elapsed, lines = float(got.out[-1][1]) / 1000, got.out[:-1]
    tickets = [line[2] for line in lines]
    assert len(set(tickets)) == 8 and all(line[3] == "1" for line in lines)
    assert elapsed < 4 * JOIN_DELAY, f"8 joins of {JOIN_DELAY} s took {elapsed:.2f} s"
    assert guest.held() == 0


async def test_latency_of_a_request_through_the_agent(guest: Guest) -> None:
    got = await drive(guest, "bench", "200")
    assert got.code == 0, got
    mean_ms = float(got.out[0][1])
    print(f"\nrequestTicket from Java through the agent: {mean_ms:.3f} ms per call")  # pytest -s
    assert mean_ms < 50

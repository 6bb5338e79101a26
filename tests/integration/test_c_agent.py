"""libsnowflock (c/snowflock.h) and snowflock.hpp against the real guest agent and a
real XenStore server, with a fake sfld behind them (fake_sfld.py): no VM. The C
calls run in build/sf-cdrive (linked to libsnowflock.so) and build/sf-cxxtest.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sflib.guest import layout
from tests.integration.conftest import ROOT
from tests.integration.fake_sfld import CLONE_ID, CODES, HOME, JOIN_DELAY, Guest, fake_guest


@pytest.fixture(scope="module")
def binaries() -> None:
    out = subprocess.run(["make", "-C", str(ROOT), "build/sf-cdrive", "build/sf-cxxtest"],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"make failed:\n{out.stdout}{out.stderr}"


@pytest.fixture
async def guest(tmp_path: Path, binaries: None) -> AsyncIterator[Guest]:
    async with fake_guest(tmp_path) as g:
        yield g


@dataclass
class Run:
    code: int
    out: list[list[str]]
    err: str


async def run(guest: Guest, program: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 20.0) -> Run:  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "build" / program), *args, env={**guest.env, **(env or {})},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, [line.split() for line in out.decode().splitlines()], err.decode())


async def drive(guest: Guest, *args: str, env: dict[str, str] | None = None) -> Run:
    return await run(guest, "sf-cdrive", *args, env=env)


async def test_every_call_and_its_result(guest: Guest) -> None:
    got = await drive(guest, "ticket", "3")
    assert got.code == 0 and got.out[0][0] == "TICKET", got
    ticket, granted, requested = got.out[0][1], got.out[0][2], got.out[0][3]
    assert (granted, requested) == ("3", "3")
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


async def test_errors_map_to_the_exit_codes(guest: Guest) -> None:
    for ticket, code in CODES.items():
        got = await drive(guest, "join", ticket)
        assert (got.code, got.out) == (code, [["ERR", str(code), "0"]]), (ticket, got)
        assert f"snowflock: sf_join: error: fake {ticket}" in got.err
    got = await drive(guest, "join", "t-nosuch")
    assert (got.code, got.out) == (3, [["ERR", "3", "0"]])
    got = await drive(guest, "ticket", "0")
    assert got.code == 2 and "n must be an integer" in got.err
    got = await drive(guest, "ticket", "9")
    assert got.code == 4 and "no clone slot is free (try fewer)" in got.err
    got = await drive(guest, "create", "c9-nosuch", (await drive(guest, "ticket", "1")).out[0][1])
    assert got.code == 3
    got = await drive(guest, "exit", "0")  # in a parent: refused, and the process exits 4
    assert got.code == 4 and "sf-exit is for clones" in got.err


async def test_exit_waits_for_the_end_after_sfld_took_it(guest: Guest) -> None:
    proc = await asyncio.create_subprocess_exec(str(ROOT / "build/sf-cdrive"), "exit", "7",
                                                env=guest.env)  # fmt: skip
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(proc.wait(), 1.0)
    assert ("exit", {"status": 7}) in guest.sfld.requests
    proc.kill()
    await proc.wait()


async def test_unreachable_without_agent_or_port(guest: Guest, tmp_path: Path) -> None:
    missing = {"XENSTORED_PATH": str(tmp_path / "none"), "SF_XENBUS": str(tmp_path / "none")}
    got = await drive(guest, "ticket", "1", env=missing)
    assert (got.code, got.out) == (5, [["ERR", "5", "0"]])
    assert "is this a SnowFlock VM?" in got.err


async def test_the_port_directly_when_sf_xenbus_names_it(guest: Guest) -> None:
    """$SF_XENBUS bypasses the agent; the library removes its watch itself there."""
    got = await drive(guest, "ticket", "2", env={"SF_XENBUS": guest.env["SF_PORT_SOCKET"]})
    assert got.code == 0 and got.out[0][0] == "TICKET", got
    await asyncio.sleep(0.1)
    assert guest.held() == 0


async def test_a_clone_reseeds_and_runs_its_hooks_with_its_identity(guest: Guest) -> None:
    post = guest.hooks / "clone-post.d"
    post.mkdir(parents=True)
    record = guest.hooks / "env.out"
    (post / "10-record").write_text(f"#!/bin/sh\nenv | sort > {record}\n")
    (post / "20-fails").write_text("#!/bin/sh\necho why not >&2\nexit 3\n")
    (post / "30-after").write_text(f"#!/bin/sh\ntouch {guest.hooks}/after\n")
    (post / "40-skipped.bak").write_text(f"#!/bin/sh\ntouch {guest.hooks}/bak\n")
    for hook in post.iterdir():
        hook.chmod(0o755)
    identity = {"id": CLONE_ID, "family": "fake", "ticket": "t1", "domid": 9, "ip": "10.1.0.4/24"}
    guest.server.local.write(f"{HOME}/{layout.IDENTITY}", json.dumps(identity).encode())
    ticket = (await drive(guest, "ticket", "7")).out[0][1]
    got = await drive(guest, "clone", ticket, env={"SF_EXTRA": "kept", "OTHER": "dropped"})
    assert (got.code, got.out) == (0, [["ID", str(CLONE_ID)]]), got
    env = dict(line.split("=", 1) for line in record.read_text().splitlines())
    assert env["SF_ID"] == "3" and env["SF_FAMILY"] == "fake" and env["SF_IP"] == "10.1.0.4/24"
    assert env["SF_HOOKS_EVENT"] == "clone" and env["SF_HOOKS_PHASE"] == "post"
    assert env["SF_EXTRA"] == "kept" and "OTHER" not in env and "XENSTORED_PATH" not in env
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert f"hook {post}/20-fails failed: {post}/20-fails failed with status 3: why not" in got.err
    assert (guest.hooks / "after").exists() and not (guest.hooks / "bak").exists()
    if os.geteuid() != 0:  # RNDRESEEDCRNG is root's: a warning, and the clone goes on
        assert "cannot reseed the kernel's RNG" in got.err


async def test_threads_of_one_process_call_at_once(guest: Guest) -> None:
    started = time.monotonic()
    got = await drive(guest, "threads", "8")
    elapsed = time.monotonic() - started
    assert got.code == 0, got
    tickets = [line[2] for line in got.out]
    assert len(set(tickets)) == 8 and all(line[3] == "1" for line in got.out)
    assert elapsed < 4 * JOIN_DELAY, f"8 joins of {JOIN_DELAY} s took {elapsed:.2f} s"
    assert guest.held() == 0


async def test_processes_call_at_once(guest: Guest) -> None:
    started = time.monotonic()
    runs = await asyncio.gather(*(drive(guest, "threads", "2") for _ in range(6)))
    elapsed = time.monotonic() - started
    assert all(r.code == 0 for r in runs), runs
    assert len({line[2] for r in runs for line in r.out}) == 12
    assert elapsed < 8 * JOIN_DELAY, f"12 joins in 6 processes took {elapsed:.2f} s"


async def test_cxx_program_tickets_clones_joins_and_throws(guest: Guest) -> None:
    got = await run(guest, "sf-cxxtest")
    assert got.code == 0 and got.out[-1] == ["CXX-TEST", "PASS"], got
    assert [line for line in got.out if line[0] == "CXX-JOIN"] == [
        ["CXX-JOIN", "1", "exited", "31"], ["CXX-JOIN", "2", "exited", "32"]
    ]  # fmt: skip
    # Its errors reached sfld as requests, except the moved-from ticket's (none made).
    assert [op for op, _ in guest.sfld.requests] == ["join", "ticket", "ticket", "clone", "join"]


async def test_cxx_checkpoint_create_clones_and_kill(guest: Guest) -> None:
    got = await run(guest, "sf-cxxtest", "more")
    assert got.code == 0 and got.out[-1] == ["CXX-TEST", "PASS"], got
    assert ["CXX-CKPT", "c1-fake", "CXX-KILLED", "2"] in got.out
    assert [op for op, _ in guest.sfld.requests] == [
        "checkpoint", "ticket", "create_clones", "kill", "ticket", "create_clones"
    ]  # fmt: skip


async def test_latency_of_a_request_through_the_agent(guest: Guest) -> None:
    got = await drive(guest, "bench", "200")
    assert got.code == 0, got
    mean_ms = float(got.out[0][1])
    print(f"\nsf_request_ticket through the agent: {mean_ms:.3f} ms per call")  # pytest -s
    assert mean_ms < 50


async def test_cxx_bench_times_joins_of_an_unknown_ticket(guest: Guest) -> None:
    got = await run(guest, "sf-cxxtest", "bench", "20")
    assert got.code == 0 and got.out[0][0] == "MEAN-MS" and float(got.out[0][1]) > 0, got
    assert [op for op, _ in guest.sfld.requests] == ["join"] * 20
    bad = await run(guest, "sf-cxxtest", "bench", "0")
    assert bad.code == 2

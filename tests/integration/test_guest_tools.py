"""The guest tools, in both their forms, against the real guest agent and XenStore
server with a fake sfld behind them (fake_sfld.py): no VM.

The Python tools (bin/, sflib/cli) are the spec; the C ones (build/sf-tools, what the
guest image ships) must do the same: each test runs both and asserts what a shell
script would check, output, messages and exit status. Avoidance is off throughout:
outside a VM, taking "the guest's" free memory would take this machine's (the VM
tests cover it).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer

from sflib.cli import GUEST_TOOLS
from sflib.guest import layout
from tests.integration.conftest import ROOT
from tests.integration.fake_sfld import CLONE_ID, CODES, HOME, Guest, fake_guest

TICKET = r"^t\d+-[0-9a-f]{6}$"


@pytest.fixture(scope="module")
def c_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = subprocess.run(["make", "-C", str(ROOT), "build/sf-tools"], capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"make failed:\n{out.stdout}{out.stderr}"
    folder = tmp_path_factory.mktemp("c-tools")
    for tool in GUEST_TOOLS:
        (folder / tool).symlink_to(ROOT / "build/sf-tools")
    return folder


@pytest.fixture(params=["python", "c"])
def tools(request: pytest.FixtureRequest, c_tools: Path) -> Path:
    return ROOT / "bin" if request.param == "python" else c_tools


@dataclass
class Run:
    code: int
    out: str
    err: str


@dataclass
class Shell:
    """Runs the tools of one form in the fake guest."""

    guest: Guest
    tools: Path

    async def run(self, tool: str, *args: str, stdin: bytes = b"",
                  env: dict[str, str] | None = None, timeout: float = 30.0) -> Run:  # fmt: skip
        environment = {**self.guest.env, "SF_AVOIDANCE": "0", **(env or {})}
        proc = await asyncio.create_subprocess_exec(
            str(self.tools / tool), *args, env=environment, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        assert proc.returncode is not None
        return Run(proc.returncode, out.decode(), err.decode())

    async def ticket(self, n: int = 3) -> str:
        got = await self.run("sf-ticket", str(n))
        assert got.code == 0, got
        return got.out.strip()


@pytest.fixture
async def sh(tmp_path: Path, tools: Path) -> AsyncIterator[Shell]:
    async with fake_guest(tmp_path) as guest:
        yield Shell(guest, tools)


async def test_ticket_prints_it_or_its_json_and_warns_of_fewer(sh: Shell) -> None:
    got = await sh.run("sf-ticket", "3")
    assert got.code == 0 and got.err == "", got
    assert re.match(TICKET, got.out.strip()), got
    got = await sh.run("sf-ticket", "--json", "5")
    data = json.loads(got.out)
    assert (data["granted"], data["requested"]) == (4, 5), got
    assert got.err == "sf-ticket: WARNING: granted 4 of 5 clones\n"
    assert sh.guest.sfld.requests == [("ticket", {"n": 3}), ("ticket", {"n": 5})]


async def test_sfld_errors_are_one_line_and_the_exit_code(sh: Shell) -> None:
    got = await sh.run("sf-ticket", "0")
    assert (got.code, got.out) == (2, ""), got
    assert got.err == "sf-ticket: error: n must be an integer from 1 to 2147483648\n"
    got = await sh.run("sf-ticket", "9")
    assert (got.code, got.err) == (4, "sf-ticket: error: no clone slot is free (try fewer)\n")
    for ticket, code in CODES.items():
        for tool in ("sf-join", "sf-kill", "sf-clone"):
            got = await sh.run(tool, ticket)
            assert (got.code, got.out, got.err) == (code, "", f"{tool}: error: fake {ticket}\n")
    got = await sh.run("sf-join", "t-nosuch")
    assert (got.code, got.err) == (3, "sf-join: error: no ticket t-nosuch\n")
    got = await sh.run("sf-exit", "0")
    assert (got.code, got.err) == (4, "sf-exit: error: sf-exit is for clones; fake is a parent\n")
    assert sh.guest.server.local.directory(f"{HOME}/{layout.REPLIES}") == []
    assert sh.guest.held() == 0  # no watch left behind


async def test_usage_errors_exit_2_and_say_so(sh: Shell) -> None:
    for tool, args, says in [
        ("sf-ticket", [], "Error: Missing argument 'N'."),
        ("sf-ticket", ["x"], "Error: Invalid value for 'N': 'x' is not a valid integer."),
        ("sf-ticket", ["1", "2"], "Error: Got unexpected extra argument (2)"),
        ("sf-exit", ["256"], "256 is not in the range 0<=x<=255."),
        ("sf-clone", ["--from"], "Error: Option '--from' requires an argument."),
        ("sf-share", [], "Error: Missing command."),
        ("sf-share", ["get", "t1", "0", "k"], "0 is not in the range x>=1."),
    ]:
        got = await sh.run(tool, *args)
        assert got.code == 2 and got.out == "", (tool, args, got)
        assert says in got.err, (tool, args, got)
        assert args == ["--from"] or got.err.startswith(f"Usage: {tool}"), got  # click's way
    got = await sh.run("sf-ticket", "--bogus", "1")
    assert got.code == 2 and "--bogus" in got.err
    got = await sh.run("sf-clone", "t1", env={"SF_AVOIDANCE": "maybe"})
    assert got.code == 2 and "'maybe' is not a valid boolean" in got.err
    assert sh.guest.sfld.requests == []  # none reached sfld


async def test_clone_checkpoint_and_create_clones(sh: Shell) -> None:
    ticket = await sh.ticket(3)
    assert (await sh.run("sf-clone", ticket)).out == "0\n"
    assert json.loads((await sh.run("sf-clone", "--json", ticket)).out) == {"id": 0}
    got = await sh.run("sf-checkpoint")
    assert (got.code, got.out) == (0, "c1-fake 0\n"), got
    got = await sh.run("sf-checkpoint", "--json")
    assert json.loads(got.out) == {"checkpoint": "c1-fake", "id": 0}
    got = await sh.run("sf-clone", "--from", "c1-fake", ticket)
    assert (got.code, got.out) == (0, "0\n"), got
    got = await sh.run("sf-clone", "--from=c9-nosuch", ticket)
    assert (got.code, got.err) == (3, "sf-clone: error: no checkpoint c9-nosuch\n")
    ops = [(op, args) for op, args in sh.guest.sfld.requests if op != "ticket"]
    assert ops == [("clone", {"ticket": ticket}), ("clone", {"ticket": ticket}),
                   ("checkpoint", {}), ("checkpoint", {}),
                   ("create_clones", {"checkpoint": "c1-fake", "ticket": ticket}),
                   ("create_clones", {"checkpoint": "c9-nosuch", "ticket": ticket})]  # fmt: skip


async def test_a_clone_runs_its_hooks_from_hooks_dir(sh: Shell, tmp_path: Path) -> None:
    hooks = tmp_path / "my-hooks"
    (hooks / "clone-post.d").mkdir(parents=True)
    for name, body in [
        ("10-record", f"echo $SF_ID $SF_HOOKS_EVENT-$SF_HOOKS_PHASE > {tmp_path}/ran; echo hi"),
        ("20-fails", "echo trying; echo not today >&2; exit 1"),
        ("30-after", f"touch {tmp_path}/after"),
    ]:
        (hooks / "clone-post.d" / name).write_text(f"#!/bin/sh\n{body}\n")
        (hooks / "clone-post.d" / name).chmod(0o755)
    identity = {"id": CLONE_ID, "family": "fake", "ticket": "t1", "share": "snowflock/share/t1/3"}
    sh.guest.server.local.write(f"{HOME}/{layout.IDENTITY}", json.dumps(identity).encode())
    ticket = await sh.ticket(7)  # the fake answers "clone 3" for a ticket of 7
    got = await sh.run("sf-clone", "--hooks-dir", str(hooks), ticket)
    assert (got.code, got.out) == (0, f"{CLONE_ID}\n"), got
    assert (tmp_path / "ran").read_text() == f"{CLONE_ID} clone-post\n"
    assert (tmp_path / "after").exists()  # after the failed one
    failing = hooks / "clone-post.d/20-fails"
    assert got.err.splitlines() == [
        "sf-clone: INFO: 10-record: hi", "sf-clone: INFO: 20-fails: trying",
        "sf-clone: INFO: 20-fails: not today",
        f"sf-clone: WARNING: hook {failing} failed: {failing} failed with status 1: not today",
    ], got  # fmt: skip
    got = await sh.run("sf-clone", "-q", "--hooks-dir", str(hooks), await sh.ticket(7))
    assert [x.split(": ")[1] for x in got.err.splitlines()] == ["WARNING"], got  # no INFO


async def test_join_and_kill_print_the_clones(sh: Shell) -> None:
    ticket = await sh.ticket(3)
    got = await sh.run("sf-join", ticket)
    assert got.out == "1 exited 31\n2 exited 32\n3 exited 33\n", got
    assert got.code == 1  # the clones' statuses are not all 0
    ticket = await sh.ticket(2)
    got = await sh.run("sf-join", "--json", ticket)
    data = json.loads(got.out)
    assert data["ticket"] == ticket and sorted(data["clones"]) == ["1", "2"], got
    assert data["clones"]["2"] == {"id": 2, "vm": f"{ticket}-2", "state": "exited",
                                   "status": 32, "host": "h1", "ready_ms": 61.5}  # fmt: skip
    assert got.out.startswith('{\n  "ticket": ')  # indented, as json.dumps(indent=2)
    ticket = await sh.ticket(3)
    got = await sh.run("sf-kill", ticket)
    assert (got.code, got.out) == (0, "1 2 3\n"), got
    ticket = await sh.ticket(1)
    got = await sh.run("sf-kill", "--json", ticket)
    assert json.loads(got.out)["clones"]["1"]["state"] == "killed"


async def test_exit_blocks_once_sfld_took_it(sh: Shell) -> None:
    task = asyncio.create_task(sh.run("sf-exit", "7"))
    await asyncio.sleep(2.0)
    assert ("exit", {"status": 7}) in sh.guest.sfld.requests
    assert not task.done()  # it waits for sfld to stop the VM
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_share_put_get_ls_clear(sh: Shell, tmp_path: Path) -> None:
    identity = {
        "id": 2,
        "family": "fake",
        "ticket": "t1-abcdef",
        "share": "snowflock/share/t1-abcdef/2",
    }
    sh.guest.server.local.write(f"{HOME}/{layout.IDENTITY}", json.dumps(identity).encode())
    data = bytes(range(256)) * 40  # 10 KiB: 7 chunks
    (tmp_path / "in").write_bytes(data)
    assert (await sh.run("sf-share", "put", "result", str(tmp_path / "in"))).code == 0
    assert (await sh.run("sf-share", "put", "empty", stdin=b"")).code == 0
    assert (await sh.run("sf-share", "-q", "put", "note", stdin=b"hello\n")).code == 0
    got = await sh.run("sf-share", "get", "t1-abcdef", "2", "result", str(tmp_path / "out"))
    assert got.code == 0 and (tmp_path / "out").read_bytes() == data, got
    got = await sh.run("sf-share", "get", "t1-abcdef", "2", "note")
    assert (got.code, got.out) == (0, "hello\n")
    got = await sh.run("sf-share", "get", "t1-abcdef", "2", "empty")
    assert (got.code, got.out) == (0, "")
    got = await sh.run("sf-share", "ls", "t1-abcdef")
    assert got.out == "2 empty\n2 note\n2 result\n", got
    got = await sh.run("sf-share", "ls", "--json", "t1-abcdef")
    assert json.loads(got.out) == {"2": ["empty", "note", "result"]}
    got = await sh.run("sf-share", "get", "t1-abcdef", "1", "result")
    assert (got.code, got.err) == (3, "sf-share: error: clone 1 of t1-abcdef shared no result\n")
    got = await sh.run("sf-share", "put", "no/slash", stdin=b"x")
    assert got.code == 2 and "invalid key" in got.err
    assert (await sh.run("sf-share", "clear", "t1-abcdef")).code == 0
    got = await sh.run("sf-share", "ls", "t1-abcdef")
    assert (got.code, got.err) == (3, "sf-share: error: no share for t1-abcdef\n")


async def test_share_over_the_quota_exits_111_and_leaves_nothing(sh: Shell) -> None:
    identity = {
        "id": 1,
        "family": "fake",
        "ticket": "t1-abcdef",
        "share": "snowflock/share/t1-abcdef/1",
    }
    sh.guest.server.local.write(f"{HOME}/{layout.IDENTITY}", json.dumps(identity).encode())
    got = await sh.run("sf-share", "put", "big", stdin=b"x" * (2 << 20))  # > 1000 nodes
    assert got.code == 111, got
    assert got.err.startswith("sf-share: error: cannot share big (2097152 bytes): over the "
                              "domain's XenStore quota")  # fmt: skip
    assert sh.guest.server.local.directory(f"{HOME}/snowflock/share/t1-abcdef/1") == []
    assert (await sh.run("sf-share", "put", "small", stdin=b"ok")).code == 0  # room again


async def test_unreachable_without_agent_or_port(sh: Shell, tmp_path: Path) -> None:
    missing = {"XENSTORED_PATH": str(tmp_path / "none"), "SF_XENBUS": str(tmp_path / "none")}
    for tool, args in [("sf-ticket", ["1"]), ("sf-clone", ["t1"]), ("sf-share", ["ls", "t1"])]:
        got = await sh.run(tool, *args, env=missing)
        assert (got.code, got.out) == (5, ""), got
        assert (
            got.err
            == f"{tool}: error: no XenStore port at {tmp_path}/none (is this a SnowFlock VM?)\n"
        )


# The spec: the C tools take what the click commands take ------------------------------


def _click_spec(command: click.Command) -> tuple[set[str], list[str], set[str | None]]:
    """The option names, the arguments (optional ones as [NAME]) and the env vars."""
    options = {name for p in command.params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}  # fmt: skip
    arguments = [p.human_readable_name if p.required else f"[{p.human_readable_name}]"
                 for p in command.params if isinstance(p, click.Argument)]  # fmt: skip
    envs = {p.envvar for p in command.params if isinstance(p, click.Option) and p.envvar}
    return options, arguments, {str(e) for e in envs}


def _help_spec(text: str) -> tuple[set[str], list[str], set[str | None]]:
    """The same, read from a --help: the Options and Arguments sections."""
    sections = dict(re.findall(r"(?ms)^(\w+):\n(.*?)(?:\n\n|\Z)", text))
    options = {name for line in sections.get("Options", "").splitlines()
               for name in re.findall(r"(?<![\w-])(--?[\w-]+)", line.split("  ", 2)[1])
               if not line.startswith(" " * 4)}  # fmt: skip
    arguments = [line.split()[0] for line in sections.get("Arguments", "").splitlines()]
    envs = set(re.findall(r"\[env var:\s+(\w+)\]", text))  # wrapped or not
    return options, arguments, {str(e) for e in envs}


def test_each_c_tool_takes_the_click_commands_options(c_tools: Path) -> None:
    for tool in GUEST_TOOLS:
        module = importlib.import_module(f"sflib.cli.{tool.removeprefix('sf-')}")
        command = typer.main.get_command(module.app)
        commands = command.commands if isinstance(command, click.Group) else {}
        for name, spec in [(None, command), *commands.items()]:
            argv = [str(c_tools / tool), *([name] if name else []), "--help"]
            shown = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
            assert _help_spec(shown.stdout) == _click_spec(spec), (tool, name, shown.stdout)
            if isinstance(command, click.Group) and name is None:
                listed = re.findall(r"(?m)^  (\w+)  ", shown.stdout.split("Commands:")[1])
                assert listed == list(commands), shown.stdout

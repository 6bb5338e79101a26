"""Every executable has a launcher, a man page covering its options and exit codes,
a completion script and a mention in the README."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click
import pytest

from sflib.cli import PROGRAMS
from sflib.cli.completion import bash_script, command_of
from sflib.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "ENVIRONMENT",
            "FILES", "EXAMPLES", "SEE ALSO"]  # fmt: skip


def man_source(program: str) -> str:
    pages = sorted((ROOT / "man").glob(f"{program}.[1-8].md"))
    assert pages, f"no man page for {program}"
    return pages[0].read_text()


def section(text: str, name: str) -> str:
    match = re.search(rf"^# {name}\n(.*?)(?=^# |\Z)", text, re.M | re.S)
    assert match, f"section {name} missing"
    return match.group(1)


def all_options(command: click.Command) -> set[str]:
    names = {n for p in command.params if isinstance(p, click.Option) for n in p.opts}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names |= all_options(sub)
    return names


@pytest.mark.parametrize("program", PROGRAMS)
def test_launcher_exists(program: str) -> None:
    assert os.access(ROOT / "bin" / program, os.X_OK)


@pytest.mark.parametrize("program", PROGRAMS)
def test_man_page_has_every_section_option_and_exit_code(program: str) -> None:
    text = man_source(program)
    for name in SECTIONS:
        section(text, name)
    options = section(text, "OPTIONS").replace("\\-", "-")
    for opt in all_options(command_of(program)) | {"--help"}:
        assert re.search(rf"\*\*{re.escape(opt)}\*\*", options), f"{opt} not on {program}'s page"
    exits = section(text, "EXIT STATUS")
    for code in ExitCode:
        assert f"**{int(code)}**" in exits, f"exit code {int(code)} not on {program}'s page"


@pytest.mark.parametrize("program", PROGRAMS)
def test_completion_is_generated_and_current(program: str) -> None:
    script = ROOT / "completion" / "bash" / program
    assert script.read_text() == bash_script(program, command_of(program))


@pytest.mark.parametrize("program", PROGRAMS)
def test_readme_mentions_program(program: str) -> None:
    assert program in (ROOT / "README.md").read_text()


def test_overview_page_lists_every_program() -> None:
    overview = (ROOT / "man" / "snowflock.7.md").read_text()
    for program in PROGRAMS:
        assert f"**{program}**" in overview


def test_every_hook_point_is_documented() -> None:
    """Hook points are <event>-<phase>.d folders; each has a HOOKS section naming it."""
    points = {p.name for p in (ROOT / "hooks.d").iterdir() if p.is_dir()}
    assert points == {"clone-post.d"}
    for point in points:
        for page in ("sf-clone", "sf-checkpoint"):
            assert point in section(man_source(page), "HOOKS"), f"{point} not in {page}(1)"
        assert point in (ROOT / "hooks.d" / "README.md").read_text()

"""What every executable shares: option types, error mapping, exit codes.

Only here do exceptions become a line on stderr ("prog: error: message (hint)")
and an exit status from sflib.exitcodes; tracebacks only with --debug.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer

from sflib import log as sflog
from sflib.errors import SnowFlockError, UsageError
from sflib.exitcodes import ExitCode
from sflib.settings import Setting, to_toml

DebugOption = Annotated[
    bool, typer.Option("--debug", help="Log debug messages and show tracebacks on errors.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")]


class _Settings:
    """What main() needs to know of the options a command parsed."""

    debug = False


def make_app(help_text: str) -> typer.Typer:
    return typer.Typer(
        help=help_text,
        add_completion=False,  # completion scripts are generated into completion/
        no_args_is_help=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        rich_markup_mode=None,
    )


def setup_logging(program: str, debug: bool, quiet: bool) -> None:
    _Settings.debug = debug
    sflog.setup(program, debug=debug, quiet=quiet)


def fail(program: str, message: str, code: ExitCode) -> NoReturn:
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(int(code))


def main(program: str, app: typer.Typer | Callable[..., object]) -> NoReturn:
    """Run a typer app as program; map every error to a message and an exit code."""
    try:
        command = typer.main.get_command(app) if isinstance(app, typer.Typer) else app
        assert isinstance(command, click.Command)
        command.main(prog_name=program, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        e.show(file=sys.stderr)
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.Abort:
        fail(program, "interrupted", ExitCode.FAILED)
    except SnowFlockError as e:
        if _Settings.debug:
            logging.getLogger(program).exception("traceback")
        fail(program, str(e), e.exit_code)
    except KeyboardInterrupt:
        fail(program, "interrupted", ExitCode.FAILED)
    sys.exit(int(ExitCode.OK))


def setting_option(setting: Setting) -> click.Option:
    """The command-line option of a setting (sflib.settings)."""
    kind: Any = (
        click.Choice(setting.choices)
        if setting.choices
        else click.Path(path_type=str)
        if setting.type is Path
        else setting.type
    )
    where = f"[TOML: {setting.key}; env: {setting.env}]"
    return click.Option([setting.option], type=kind, default=None, help=f"{setting.help} {where}")


def notify_ready(fd: int | None) -> None:
    """s6-style readiness: a newline on fd, which is then closed."""
    if fd is None:
        return
    try:
        os.write(fd, b"\n")
        os.close(fd)
    except OSError as e:
        raise UsageError(f"--ready-fd {fd}: {e.strerror}") from e


def show_config(settings: tuple[Setting, ...], values: dict[str, Any], as_json: bool,
                 table: str) -> None:  # fmt: skip
    """--print-config: the effective settings as TOML, or as JSON."""
    if as_json:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()},
                         indent=2))  # fmt: skip
    else:
        sys.stdout.write(to_toml(settings, values, table))

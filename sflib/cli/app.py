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
from sflib.paths import Paths
from sflib.settings import Setting, resolve, to_toml

DebugOption = Annotated[
    bool, typer.Option("--debug", help="Log debug messages and show tracebacks on errors.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
SocketOption = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        "-s",
        envvar="SF_SFLD_SOCKET",
        help="sfld's control socket [default: $SF_ROOTDIR/run/snowflock/sfld.sock].",
    ),
]
AvoidanceOption = Annotated[
    bool,
    typer.Option(
        "--avoidance/--no-avoidance",
        envvar="SF_AVOIDANCE",
        help="Report the guest's free pages so clones never fetch them.",
    ),
]


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


def print_result(result: Any, as_json: bool, text: str | None = None) -> None:
    """A command's result on stdout: JSON with --json, else text, or by default one
    "key: value" line per item of a mapping."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(text if text is not None else "\n".join(f"{k}: {v}" for k, v in result.items()))


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
        if setting.type in (int, float, bool, str)
        else str  # parsed by the setting, whose message names it
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


def daemon_command(program: str, help_text: str, settings: tuple[Setting, ...],
                   run: Callable[[dict[str, Any], int | None], None]) -> click.Command:  # fmt: skip
    """A daemon's command line: an option per setting, and --config, --print-config,
    --json, --ready-fd, --debug, --quiet. The settings come from the TOML table named
    after the program; run(values, ready_fd) gets them resolved."""

    def callback(config: str | None, print_config: bool, as_json: bool, ready_fd: int | None,
                 debug: bool, quiet: bool, **cli: Any) -> None:  # fmt: skip
        setup_logging(program, debug, quiet)
        values = resolve(settings, Paths.from_env(), Path(config) if config else None, cli,
                         table=program)  # fmt: skip
        if print_config:
            show_config(settings, values, as_json, program)
            return
        log = logging.getLogger(program)
        log.info("started as: %s", " ".join([program, *sys.argv[1:]]))
        log.info("configuration: %s", ", ".join(f"{k}={v}" for k, v in values.items()))
        run(values, ready_fd)

    return click.Command(
        program, callback=callback, help=help_text,
        context_settings={"help_option_names": ["-h", "--help"]},
        params=[
            click.Option(["--config", "-c"], type=click.Path(dir_okay=False),
                         help=f"TOML config file [default: $SF_ROOTDIR/etc/snowflock/"
                              f"{program}.toml]."),
            *(setting_option(s) for s in settings),
            click.Option(["--print-config"], is_flag=True,
                         help="Print the effective configuration and exit."),
            click.Option(["--json", "as_json"], is_flag=True,
                         help="With --print-config: as JSON."),
            click.Option(["--ready-fd"], type=int, help="Write a newline to this fd once ready."),
            click.Option(["--debug"], is_flag=True,
                         help="Log debug messages and show tracebacks."),
            click.Option(["--quiet", "-q"], is_flag=True, help="Log only warnings and errors."),
        ],
    )  # fmt: skip

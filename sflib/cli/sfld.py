"""sfld: the SnowFlock local daemon, in the foreground.

Its options come from the settings table (sflib/settings.py), which also defines
the TOML keys and environment variables.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from sflib.cli.app import main, setup_logging
from sflib.errors import UsageError
from sflib.paths import BUILD_DIR, Paths
from sflib.settings import SFLD_SETTINGS, Setting, resolve, to_toml
from sflib.sfld.daemon import Daemon

PROGRAM = "sfld"
log = logging.getLogger(PROGRAM)


def _option(setting: Setting) -> click.Option:
    kind: Any = (
        click.Choice(setting.choices)
        if setting.choices
        else click.Path(path_type=str)
        if setting.type is Path
        else setting.type
    )
    where = f"[TOML: {setting.key}; env: {setting.env}]"
    return click.Option([setting.option], type=kind, default=None, help=f"{setting.help} {where}")


def _run(config: str | None, print_config: bool, as_json: bool, ready_fd: int | None,
         debug: bool, quiet: bool, **cli: Any) -> None:  # fmt: skip
    setup_logging(PROGRAM, debug, quiet)
    paths = Paths.from_env()
    settings = resolve(SFLD_SETTINGS, paths, Path(config) if config else None, cli)
    if print_config:
        if as_json:
            print(json.dumps({k: str(v) if isinstance(v, Path) else v
                              for k, v in settings.items()}, indent=2))  # fmt: skip
        else:
            sys.stdout.write(to_toml(SFLD_SETTINGS, settings))
        return
    log.info("started as: %s", " ".join([PROGRAM, *sys.argv[1:]]))
    log.info("configuration: %s", ", ".join(f"{k}={v}" for k, v in settings.items()))
    probe = Path(os.environ.get("SF_KVM_PROBE", BUILD_DIR / "kvm-probe.bin"))
    daemon = Daemon(settings, probe)
    asyncio.run(daemon.run(on_ready=lambda: _notify(ready_fd)))


def _notify(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, b"\n")
        os.close(fd)
    except OSError as e:
        raise UsageError(f"--ready-fd {fd}: {e.strerror}") from e


app = click.Command(
    PROGRAM,
    callback=_run,
    help="Run the SnowFlock local daemon in the foreground: the host's XenStore, its VMs, "
    "and the control socket used by sf-vm.",
    context_settings={"help_option_names": ["-h", "--help"]},
    params=[
        click.Option(["--config", "-c"], type=click.Path(dir_okay=False),
                     help="TOML config file [default: $SF_ROOTDIR/etc/snowflock/sfld.toml]."),
        *(_option(s) for s in SFLD_SETTINGS),
        click.Option(["--print-config"], is_flag=True,
                     help="Print the effective configuration and exit."),
        click.Option(["--json", "as_json"], is_flag=True, help="With --print-config: as JSON."),
        click.Option(["--ready-fd"], type=int, help="Write a newline to this fd once ready."),
        click.Option(["--debug"], is_flag=True, help="Log debug messages and show tracebacks."),
        click.Option(["--quiet", "-q"], is_flag=True, help="Log only warnings and errors."),
    ],
)  # fmt: skip

if __name__ == "__main__":
    main(PROGRAM, app)

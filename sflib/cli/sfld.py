"""sfld: the SnowFlock local daemon, in the foreground.

Its options come from the settings table (sflib/settings.py), which also defines
the TOML keys and environment variables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from sflib.cli.app import main, notify_ready, setting_option, setup_logging, show_config
from sflib.paths import BUILD_DIR, Paths
from sflib.settings import SFLD_SETTINGS, resolve
from sflib.sfld.daemon import Daemon

PROGRAM = "sfld"
log = logging.getLogger(PROGRAM)


def _run(config: str | None, print_config: bool, as_json: bool, ready_fd: int | None,
         debug: bool, quiet: bool, **cli: Any) -> None:  # fmt: skip
    setup_logging(PROGRAM, debug, quiet)
    paths = Paths.from_env()
    settings = resolve(SFLD_SETTINGS, paths, Path(config) if config else None, cli)
    if print_config:
        show_config(SFLD_SETTINGS, settings, as_json, "sfld")
        return
    log.info("started as: %s", " ".join([PROGRAM, *sys.argv[1:]]))
    log.info("configuration: %s", ", ".join(f"{k}={v}" for k, v in settings.items()))
    probe = Path(os.environ.get("SF_KVM_PROBE", BUILD_DIR / "kvm-probe.bin"))
    daemon = Daemon(settings, probe)
    asyncio.run(daemon.run(on_ready=lambda: notify_ready(ready_fd)))


app = click.Command(
    PROGRAM,
    callback=_run,
    help="Run the SnowFlock local daemon in the foreground: the host's XenStore, its VMs, "
    "and the control socket used by sf-vm.",
    context_settings={"help_option_names": ["-h", "--help"]},
    params=[
        click.Option(["--config", "-c"], type=click.Path(dir_okay=False),
                     help="TOML config file [default: $SF_ROOTDIR/etc/snowflock/sfld.toml]."),
        *(setting_option(s) for s in SFLD_SETTINGS),
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

"""sfmasterd: the SnowFlock master daemon, in the foreground.

Its options come from MASTER_SETTINGS (sflib/settings.py), which also defines the
TOML keys (table [sfmasterd]) and environment variables.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from sflib.cli.app import main, notify_ready, setting_option, setup_logging, show_config
from sflib.cluster.master import Master, open_registry
from sflib.cluster.wire import read_secret
from sflib.paths import Paths
from sflib.settings import MASTER_SETTINGS, resolve

PROGRAM = "sfmasterd"
TABLE = "sfmasterd"
log = logging.getLogger(PROGRAM)


def _run(config: str | None, print_config: bool, as_json: bool, ready_fd: int | None,
         debug: bool, quiet: bool, **cli: Any) -> None:  # fmt: skip
    setup_logging(PROGRAM, debug, quiet)
    settings = resolve(MASTER_SETTINGS, Paths.from_env(), Path(config) if config else None, cli,
                       table=TABLE)  # fmt: skip
    if print_config:
        show_config(MASTER_SETTINGS, settings, as_json, TABLE)
        return
    log.info("started as: %s", " ".join([PROGRAM, *sys.argv[1:]]))
    log.info("configuration: %s", ", ".join(f"{k}={v}" for k, v in settings.items()))
    secret = read_secret(Path(settings["secret_file"]))
    master = Master(open_registry(Path(settings["state_dir"])), settings["heartbeat"],
                    settings["host_timeout"])  # fmt: skip
    asyncio.run(_serve(master, settings["listen"], secret, ready_fd))


async def _serve(master: Master, listen: str, secret: bytes, ready_fd: int | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await master.run(listen, secret, stopping, on_ready=lambda: notify_ready(ready_fd))


app = click.Command(
    PROGRAM,
    callback=_run,
    help="Run the SnowFlock master daemon in the foreground: the hosts of the cluster "
    "register and heartbeat here, and tickets are granted across them.",
    context_settings={"help_option_names": ["-h", "--help"]},
    params=[
        click.Option(["--config", "-c"], type=click.Path(dir_okay=False),
                     help="TOML config file [default: $SF_ROOTDIR/etc/snowflock/sfmasterd.toml]."),
        *(setting_option(s) for s in MASTER_SETTINGS),
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

"""sfmasterd: the SnowFlock master daemon, in the foreground.

Its options come from MASTER_SETTINGS (sflib/settings.py), which also defines the
TOML keys (table [sfmasterd]) and environment variables.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from sflib.address import split_address
from sflib.cli.app import daemon_command, main, notify_ready
from sflib.cluster import grants
from sflib.cluster.master import Master, open_registry
from sflib.cluster.wire import read_secret
from sflib.settings import MASTER_SETTINGS

PROGRAM = "sfmasterd"


def _run(settings: dict[str, Any], ready_fd: int | None) -> None:
    split_address(settings["listen"])  # before anything is made on disk
    secret = read_secret(Path(settings["secret_file"]))
    allocator = grants.make(settings)  # a bad slurm_nodes is refused before anything
    master = Master(open_registry(Path(settings["state_dir"])), settings["heartbeat"],
                    settings["host_timeout"], allocator,
                    settings["loop_stall_warning"])  # fmt: skip
    asyncio.run(_serve(master, settings["listen"], secret, ready_fd))


async def _serve(master: Master, listen: str, secret: bytes, ready_fd: int | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await master.run(listen, secret, stopping, on_ready=lambda: notify_ready(ready_fd))


app = daemon_command(
    PROGRAM,
    "Run the SnowFlock master daemon in the foreground: the hosts of the cluster register "
    "and heartbeat here, and tickets are granted across them.",
    MASTER_SETTINGS,
    _run,
)

if __name__ == "__main__":
    main(PROGRAM, app)

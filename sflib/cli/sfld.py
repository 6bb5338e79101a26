"""sfld: the SnowFlock local daemon, in the foreground.

Its options come from the settings table (sflib/settings.py), which also defines
the TOML keys and environment variables.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from sflib.cli.app import daemon_command, main, notify_ready
from sflib.paths import BUILD_DIR
from sflib.settings import SFLD_SETTINGS
from sflib.sfld.daemon import Daemon

PROGRAM = "sfld"


def _run(settings: dict[str, Any], ready_fd: int | None) -> None:
    probe = Path(os.environ.get("SF_KVM_PROBE", BUILD_DIR / "kvm-probe.bin"))
    daemon = Daemon(settings, probe)
    asyncio.run(daemon.run(on_ready=lambda: notify_ready(ready_fd)))


app = daemon_command(
    PROGRAM,
    "Run the SnowFlock local daemon in the foreground: the host's XenStore, its VMs, "
    "and the control socket used by sf-vm.",
    SFLD_SETTINGS,
    _run,
)

if __name__ == "__main__":
    main(PROGRAM, app)

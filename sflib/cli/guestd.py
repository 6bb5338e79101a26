"""sf-guestd: the guest's XenStore agent, in the foreground (sf-guestd(8)).

It owns the guest's virtio-serial XenStore port and serves any number of guest
processes on Xen's xenstored socket (sflib.guest.agent). The guest's init starts
it; guests that boot systemd use its unit, sf-guestd.service.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from sflib.cli.app import daemon_command, main, notify_ready
from sflib.errors import UsageError
from sflib.guest import agent
from sflib.settings import GUESTD_SETTINGS

PROGRAM = "sf-guestd"


def _run(settings: dict[str, Any], ready_fd: int | None) -> None:
    try:
        mode = int(settings["socket_mode"], 8)
    except ValueError:
        raise UsageError(
            f"socket_mode must be octal, like 0660, not {settings['socket_mode']!r}"
        ) from None
    asyncio.run(_serve(Path(settings["xenbus_port"]), Path(settings["xenstored_socket"]), mode,
                       ready_fd))  # fmt: skip


async def _serve(port: Path, socket_path: Path, mode: int, ready_fd: int | None) -> None:
    stopping = asyncio.Event()
    ready = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    serving = asyncio.create_task(agent.serve(port, socket_path, mode, ready, stopping))
    await asyncio.wait([serving, asyncio.create_task(ready.wait())],
                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    if ready.is_set():
        notify_ready(ready_fd)
    await serving


app = daemon_command(
    PROGRAM,
    "Run the guest's XenStore agent in the foreground: it owns the VM's XenStore port "
    "and serves any number of guest processes on Xen's xenstored socket.",
    GUESTD_SETTINGS,
    _run,
)

if __name__ == "__main__":
    main(PROGRAM, app)

"""Run in the guest by its init: tell sfld the guest is up.

Writes snowflock/ready (relative: the guest's own domain) over the XenStore port,
with the guest's uptime in seconds as the value.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sflib.guest.bus import open_bus

READY_KEY = b"snowflock/ready"


def main() -> int:
    uptime = Path("/proc/uptime").read_text().split()[0]
    with open_bus() as bus:
        bus.write(READY_KEY, uptime.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

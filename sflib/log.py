"""Logging set-up, done once by each executable (never by the library).

Messages go to stderr, one line each, prefixed with the program name: journald
adds its own timestamps, so there are none here unless stderr is a terminal.
"""

from __future__ import annotations

import logging
import sys


def setup(program: str, *, debug: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    fmt = f"{program}: %(levelname)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # qemu.qmp narrates every connection at INFO; only its warnings concern users.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if debug else logging.WARNING)

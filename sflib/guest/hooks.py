"""Runs hooks.d/<event>-<phase>.d/* the way Ganeti runs its hooks.

Scripts whose names match ^[A-Za-z0-9_-]+$ (others, like editor backups, are
skipped), in lexicographic order; the environment cleared except SF_* and a fixed
PATH; stdin /dev/null; each script's output logged. A failing pre-hook aborts
(HookFailed); a failing post-hook is reported and the rest still run.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from sflib.errors import CommandFailed, OperationTimeout, SnowFlockError
from sflib.run import run

log = logging.getLogger(__name__)

DEFAULT_DIR = "/etc/snowflock/hooks.d"
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 120.0


class HookFailed(SnowFlockError):
    pass


def hooks_in(directory: Path) -> list[Path]:
    """The scripts that run, in order (pure apart from listing the folder)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if NAME.match(p.name) and p.is_file() and os.access(p, os.X_OK))  # fmt: skip


def environment(event: str, phase: str, identity: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("SF_")}
    env.update({"PATH": PATH, "SF_HOOKS_EVENT": event, "SF_HOOKS_PHASE": phase})
    for key, value in identity.items():
        env[f"SF_{key.upper()}"] = str(value)
    return env


def run_hooks(
    event: str, phase: str, identity: dict[str, Any], hooks_dir: str | None = None
) -> list[str]:
    """Run the hooks of event-phase; returns the names of those that failed.

    Raises HookFailed for a failing pre-hook.
    """
    root = Path(hooks_dir or os.environ.get("SF_HOOKS_DIR", DEFAULT_DIR))
    failed = []
    env = environment(event, phase, identity)
    for script in hooks_in(root / f"{event}-{phase}.d"):
        try:
            done = run([script], env=env, timeout=TIMEOUT)
            _log_output(script, done.stdout + done.stderr)
        except (CommandFailed, OperationTimeout) as e:
            if isinstance(e, CommandFailed):
                _log_output(script, e.stdout + e.stderr)
            if phase == "pre":
                raise HookFailed(f"hook {script} failed: {e}") from e
            log.warning("hook %s failed: %s", script, e)
            failed.append(script.name)
    return failed


def _log_output(script: Path, output: str) -> None:
    for line in output.splitlines():
        log.info("%s: %s", script.name, line)

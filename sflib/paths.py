"""Where SnowFlock keeps its files, in one place.

Every path hangs off a root prefix ($SF_ROOTDIR, default "/"), so several hosts'
daemons can run side by side on one machine in tests (Ganeti's pathutils idea).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Paths:
        env = os.environ if environ is None else environ
        return cls(Path(env.get("SF_ROOTDIR", "/")))

    def _under(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def config_file(self) -> Path:
        return self._under("/etc/snowflock/sfld.toml")

    @property
    def hooks_dir(self) -> Path:
        return self._under("/etc/snowflock/hooks.d")

    @property
    def state_dir(self) -> Path:
        return self._under("/var/lib/snowflock")

    @property
    def run_dir(self) -> Path:
        return self._under("/run/snowflock")

    @property
    def xenstored_socket(self) -> Path:
        return self.run_dir / "xenstored.sock"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "sfld.sock"

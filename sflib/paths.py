"""Where SnowFlock keeps its files, in one place.

Every path hangs off a root prefix ($SF_ROOTDIR, default "/"), so several hosts'
daemons can run side by side on one machine in tests (Ganeti's pathutils idea).
"""

from __future__ import annotations

import hashlib
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
    def secret_file(self) -> Path:
        return self._under("/etc/snowflock/secret")

    @property
    def hooks_dir(self) -> Path:
        return self._under("/etc/snowflock/hooks.d")

    @property
    def state_dir(self) -> Path:
        return self._under("/var/lib/snowflock")

    @property
    def master_state_dir(self) -> Path:
        return self._under("/var/lib/snowflock-master")

    @property
    def run_dir(self) -> Path:
        return self._under("/run/snowflock")

    @property
    def memory_dir(self) -> Path:
        """Guest RAM files: always on tmpfs, one folder per SF_ROOTDIR."""
        if self.root == Path("/"):
            return Path("/dev/shm/snowflock")
        tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:8]
        return Path(f"/dev/shm/snowflock-{tag}")

    @property
    def xenstored_socket(self) -> Path:
        return self.run_dir / "xenstored.sock"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "sfld.sock"


# A checkout keeps what `make` builds (images, the KVM probe) in build/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = PROJECT_ROOT / "build"

"""Fixtures for integration tests that boot guests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sflib.image import build as image
from sflib.image.initramfs import default_compression
from sflib.paths import Paths


@pytest.fixture(scope="session")
def guest_image() -> image.Result:
    """The guest image, built once into build/image/ and reused while its inputs hold.

    The .deb cache (build/cache/debs/) is shared with sf-image, so it is fetched once.
    """
    opts = image.Options(
        out=image.default_out(),
        cache=image.default_cache(),
        hooks=image.default_hooks(),
        compression=default_compression(),
    )
    result = image.build(opts)
    for path in (result.kernel, result.initrd):
        assert Path(path).is_file(), f"{path} missing after the build"
    return result


ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Host:
    """A real sfld under its own SF_ROOTDIR, and the tools to talk to it."""

    root: Path
    image: Path
    accel: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "sfld.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SF_ROOTDIR": str(self.root)}

    @property
    def run_dir(self) -> Path:
        return self.root / "run/snowflock"

    @property
    def memory_dir(self) -> Path:
        return Paths(self.root).memory_dir

    def start(self, *extra: str) -> None:
        r, w = os.pipe()
        argv = [str(ROOT / "bin/sfld"), "--accel", self.accel, "--image-dir", str(self.image),
                "--ready-fd", str(w), *extra]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, pass_fds=[w], stderr=log)
        os.close(w)
        with os.fdopen(r, "rb") as ready:
            assert ready.readline() == b"\n", f"sfld did not start:\n{self.log.read_text()}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        status = self.proc.wait(timeout=60)
        self.proc = None
        return status

    def tool(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run bin/<argv[0]> against this host; check=True demands exit 0."""
        out = subprocess.run([str(ROOT / "bin" / argv[0]), *argv[1:]], env=self.env,
                             capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        if check:
            assert out.returncode == 0, f"{argv} exited {out.returncode}: {out.stderr}"
        return out

    def vm_json(self, *argv: str) -> Any:
        return json.loads(self.tool("sf-vm", *argv, "--json").stdout)

    def xenstore(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XENSTORED_PATH": str(self.run_dir / "xenstored.sock")}
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=30, check=False
        )

    def leftovers(self) -> list[str]:
        """Whatever VM files or QEMU processes of this host still exist."""
        found = [str(p) for p in self.memory_dir.glob("*")] if self.memory_dir.exists() else []
        found += [str(p) for p in self.run_dir.glob("*.qmp")]
        found += [str(p) for p in self.run_dir.glob("*.xenbus")]
        found += [str(p) for p in (self.root / "var/lib/snowflock/vms").glob("*")]
        found += qemu_processes(self.memory_dir)
        return found


def qemu_processes(memory_dir: Path) -> list[str]:
    """QEMUs whose command line mentions memory_dir (so: of that host)."""
    out = subprocess.run(["pgrep", "-af", f"qemu-system.*{memory_dir}/"], capture_output=True,
                         text=True, check=False)  # fmt: skip
    return out.stdout.splitlines()


@pytest.fixture
def host(guest_image: image.Result) -> Iterator[Host]:
    """A running sfld (TCG) with its own root; on teardown, SIGTERM must leave nothing."""
    root = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))  # short: socket paths
    h = Host(root, guest_image.out, "tcg")
    try:
        h.start()
        yield h
        if h.proc is not None:
            assert h.stop() == 0, h.log.read_text()
        assert h.leftovers() == []
    finally:
        if h.proc is not None:
            h.proc.kill()
            h.proc.wait()
        for line in qemu_processes(h.memory_dir):
            os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(h.memory_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

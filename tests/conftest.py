"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib import run

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[Path]:
    """A real sf-xenstored process; yields its socket. Checks a clean SIGTERM exit."""
    sock = tmp_path / "xs.sock"
    r, w = os.pipe()
    proc = subprocess.Popen(
        [BIN / "sf-xenstored", "--socket", sock, "--ready-fd", str(w), "--quiet"],
        pass_fds=[w],
        stderr=subprocess.PIPE,
    )
    os.close(w)
    try:
        try:
            line = run.ready_line(r, 60)
        finally:
            os.close(r)
        assert line == b"\n", "sf-xenstored did not become ready"
        yield sock
        assert proc.poll() is None, "sf-xenstored died during the test"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    assert not sock.exists(), "socket left behind after SIGTERM"

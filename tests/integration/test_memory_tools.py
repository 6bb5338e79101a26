"""sf-memserver and sf-memtap as an admin uses them: serve a folder, mount an image
from it, read it, look at the counters, unmount; and their errors."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "bin"
PAGE = 4096


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    out = subprocess.run(["make", "-C", str(ROOT), "build/memserver", "build/memtap"],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


READY_TIMEOUT = 60.0  # seconds for a tool to report it is ready


@contextlib.contextmanager
def started(argv: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A tool started with --ready-fd; yields it and the line it reported once ready.
    Whatever happens, it is not left running: SIGTERM, then SIGKILL."""
    r, w = os.pipe()
    proc = subprocess.Popen([*argv, "--ready-fd", str(w)], pass_fds=[w], stderr=subprocess.PIPE)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            readable, _, _ = select.select([ready], [], [], READY_TIMEOUT)
            line = ready.readline() if readable else b""
        assert line.endswith(b"\n"), f"{argv[0]} not ready: {stderr_of(proc)}"
        yield proc, line.decode().strip()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    """What a tool said, once it is stopped."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace")


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    images = tmp_path / "images"
    images.mkdir()
    data = os.urandom(64 * PAGE) + bytes(64 * PAGE)
    (images / "a.mem").write_bytes(data)
    with started([str(BIN / "sf-memserver"), "serve", "--dir", str(images)]) as (proc, port):
        yield f"127.0.0.1:{port}", data
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_mount_read_look_and_unmount(server: tuple[str, bytes], tmp_path: Path) -> None:
    address, data = server
    point = tmp_path / "tap"
    point.mkdir()  # as for mount(8), the folder must be there
    try:
        with started([str(BIN / "sf-memtap"), "mount", "--server", address, "--image",
                      "a.mem", "--prefetch", "0", str(point)]) as (tap, _):  # fmt: skip
            assert (point / "a.mem").read_bytes() == data
            stats = json.loads(tool("sf-memtap", "stats", str(point), "--json").stdout)
            assert stats["pages"] == 128 and stats["pages_fetched"] == 64  # the zero half
            listed = json.loads(tool("sf-memtap", "ls", "--json").stdout)
            assert str(point) in [m["mountpoint"] for m in listed]
            served = json.loads(tool("sf-memserver", "stats", address, "--json").stdout)
            assert served["pages_sent"] == 64 and served["pages_zero"] == 64
            assert "pages_fetched: 64" in tool("sf-memtap", "stats", str(point)).stdout
            assert tool("sf-memtap", "umount", str(point)).returncode == 0
            assert tap.wait(timeout=30) == 0  # memtap ends when its mount goes
    finally:  # memtap is stopped by now; a mount it could not remove goes by force
        if str(point) in Path("/proc/mounts").read_text():
            subprocess.run(["umount", "-l", str(point)], check=False)
    assert str(point) not in Path("/proc/mounts").read_text()
    assert not point.with_suffix(".cache").exists()


def test_wrong_use_is_refused_with_the_documented_codes(server: tuple[str, bytes],
                                                         tmp_path: Path) -> None:  # fmt: skip
    address, _ = server
    assert tool("sf-memtap", "stats", str(tmp_path)).returncode == 3  # no mount there
    assert tool("sf-memtap", "umount", str(tmp_path)).returncode == 3
    assert tool("sf-memserver", "stats", "nonsense").returncode == 2
    assert tool("sf-memserver", "stats", "127.0.0.1:1").returncode == 5  # nobody there
    bad = tool("sf-memtap", "mount", "--server", address, "--image", "missing.mem",
               str(tmp_path / "m"))  # fmt: skip
    assert bad.returncode == 111 and "memtap:" in bad.stderr
    assert str(tmp_path / "m") not in Path("/proc/mounts").read_text()

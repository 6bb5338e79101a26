"""The KVM probe: its image, and its QEMU's lifetime under a real sfld.

Under TCG the image must reach long mode and exit 85, so that a probe failing under
KVM says something about KVM, not about the probe.

A probe that hangs (as it does on a host whose KVM cannot enter long mode) must not
outlive sfld, however sfld ends, nor its own timeout. Where KVM works the real probe
ends at once, so these tests make it hang anywhere: a probe image that halts at its
reset vector. Each copies its image under its own root, so that pgrep on that path
finds its QEMU and no other test's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sflib.paths import Paths
from sflib.vm.accel import PROBE_EXIT, probe_argv

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "build/kvm-probe.bin"
DEADLINE = 60.0  # seconds: generous on a loaded machine; an orphan would run for ever
# A 64 KiB BIOS whose reset vector (offset 0xfff0) halts for ever: hlt; jmp back.
HALTING = b"\xf4" * 0xFFF0 + b"\xf4\xeb\xfd" + b"\xf4" * 13


def built_probe() -> Path:
    if not PROBE.exists():
        subprocess.run(["make", "-C", str(ROOT), "c"], check=True, timeout=120)
    return PROBE


def test_probe_reaches_long_mode_under_tcg() -> None:
    argv = probe_argv("qemu-system-x86_64", built_probe())
    argv[argv.index("kvm")] = "tcg"
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == PROBE_EXIT, done.stderr


def wait_for(what: Callable[[], bool], why: str) -> None:
    end = time.monotonic() + DEADLINE
    while not what():
        assert time.monotonic() < end, why
        time.sleep(0.05)


@dataclass
class ProbingSfld:
    """An sfld with --accel auto whose KVM probe is image, under root."""

    root: Path
    image: Path
    proc: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.root / "sfld.log").read_text(errors="replace")

    def probes(self) -> list[tuple[int, int]]:
        """(pid, parent pid) of each QEMU running this sfld's probe image."""
        out = subprocess.run(["pgrep", "-f", f"qemu-system.*-bios {self.image} "],
                             capture_output=True, text=True, check=False).stdout  # fmt: skip
        found = []
        for pid in out.split():
            with contextlib.suppress(FileNotFoundError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found.append((int(pid), int(stat[1])))
        return found

    def probing(self) -> bool:
        """True once the probe's QEMU runs; fails if sfld got past the probe."""
        if self.probes():
            return True
        assert "accelerator:" not in self.log, f"the probe did not hang:\n{self.log}"
        assert self.proc.poll() is None, f"sfld exited {self.proc.returncode}:\n{self.log}"
        return False


@contextlib.contextmanager
def probing_sfld(image: bytes, ready_fd: int | None = None) -> Iterator[ProbingSfld]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm: sfld runs no KVM probe")
    root = Path(tempfile.mkdtemp(prefix="sf-probe-", dir="/tmp"))
    (root / "kvm-probe.bin").write_bytes(image)
    env = {**os.environ, "SF_ROOTDIR": str(root), "SF_KVM_PROBE": str(root / "kvm-probe.bin")}
    argv = [str(ROOT / "bin/sfld"), "--accel", "auto", "--network", "none"]
    fds = () if ready_fd is None else (ready_fd,)
    argv += [f"--ready-fd={ready_fd}"] if fds else []
    with (root / "sfld.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=env, stderr=log, pass_fds=fds)
    sfld = ProbingSfld(root, root / "kvm-probe.bin", proc)
    try:
        yield sfld
    finally:
        proc.kill()
        proc.wait()
        for pid, _ in sfld.probes():  # a failed test's orphan must not spin on
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(Paths(root).memory_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: s.name)  # fmt: skip
def test_a_hanging_probe_dies_with_sfld(sig: signal.Signals) -> None:
    with probing_sfld(HALTING) as sfld:
        wait_for(sfld.probing, "the probe's QEMU never started")
        assert [ppid for _, ppid in sfld.probes()] == [sfld.proc.pid]
        sfld.proc.send_signal(sig)
        sfld.proc.wait(DEADLINE)  # ^C waits for the probe's thread: up to its timeout
        wait_for(lambda: not sfld.probes(), f"the probe's QEMU outlived sfld ({sig.name})")


def test_the_real_probe_dies_with_sfld_where_kvm_hangs() -> None:
    """The case as it was found, on a host whose KVM cannot enter long mode."""
    with probing_sfld(built_probe().read_bytes()) as sfld:
        try:
            wait_for(sfld.probing, "the probe's QEMU never started")
        except AssertionError:
            if "accelerator: kvm" in sfld.log:
                pytest.skip("KVM works here: the real probe does not hang")
            raise
        sfld.proc.send_signal(signal.SIGTERM)
        sfld.proc.wait(DEADLINE)
        wait_for(lambda: not sfld.probes(), "the probe's QEMU outlived sfld")


def test_a_hanging_probe_is_stopped_at_its_timeout() -> None:
    r, w = os.pipe()
    with os.fdopen(r, "rb") as ready, probing_sfld(HALTING, ready_fd=w) as sfld:
        os.close(w)
        assert ready.readline() == b"\n", f"sfld did not start:\n{sfld.log}"
        assert sfld.probes() == []
        assert "accelerator: tcg (a KVM guest did not reach long mode within " in sfld.log
        sfld.proc.send_signal(signal.SIGTERM)
        assert sfld.proc.wait(DEADLINE) == 0, sfld.log

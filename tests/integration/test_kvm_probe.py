"""The KVM probe image itself: under TCG it must reach long mode and exit 85, so that
a probe failing under KVM says something about KVM, not about the probe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sflib.vm.accel import PROBE_EXIT, probe_argv

pytestmark = pytest.mark.vm

PROBE = Path(__file__).resolve().parents[2] / "build/kvm-probe.bin"


def test_probe_reaches_long_mode_under_tcg() -> None:
    if not PROBE.exists():
        subprocess.run(["make", "-C", str(PROBE.parents[1]), "c"], check=True, timeout=120)
    argv = probe_argv("qemu-system-x86_64", PROBE)
    argv[argv.index("kvm")] = "tcg"
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == PROBE_EXIT, done.stderr

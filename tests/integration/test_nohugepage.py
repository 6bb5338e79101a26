"""c/nohugepage.c, preloaded into a real process: MADV_HUGEPAGE is declined, every
other advice still reaches the kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "build/libnohugepage.so"

PROBE = r"""
import errno, mmap
m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
m[0] = 7
m.madvise(mmap.MADV_DONTNEED)     # passes through: anonymous memory reads zero again
assert m[0] == 0, m[0]
try:
    m.madvise(12345)              # and the kernel's errors come back
except OSError as e:
    assert e.errno == errno.EINVAL, e
else:
    raise AssertionError("bad advice accepted")
import ctypes
start = ctypes.addressof(ctypes.c_char.from_buffer(m))
text = open("/proc/self/smaps").read().splitlines()
for i, line in enumerate(text):
    if line.split("-")[0] == format(start, "x"):
        flags = next(l for l in text[i:] if l.startswith("VmFlags:"))
        print("HUGEPAGE" if " hg" in flags else "NOHUGEPAGE")
        break
"""


@pytest.fixture(scope="module")
def shim() -> Path:
    out = subprocess.run(["make", "-C", str(ROOT), "build/libnohugepage.so"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return SHIM


def probe(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_huge_pages_are_declined_and_other_advice_passes(shim: Path) -> None:
    assert probe({**os.environ, "LD_PRELOAD": str(shim)}) == "NOHUGEPAGE"


def test_without_the_shim_the_same_advice_takes_effect(shim: Path) -> None:
    # The probe can tell: without the shim the kernel marks the mapping.
    assert probe({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}) == "HUGEPAGE"

"""Which accelerator QEMU should use: KVM only if it really runs a guest.

The existence of /dev/kvm proves nothing: some hosts expose one that runs real-mode
code but hangs as soon as a guest enters long mode, as a Linux kernel does while it
decompresses. So the probe boots build/kvm-probe.bin (c/kvm-probe.S), which walks
from reset into 64-bit long mode with paging and then exits QEMU through the
isa-debug-exit port; only that exit status proves KVM works.

A probe that hangs is stopped at PROBE_TIMEOUT, and its QEMU is SIGKILLed by the
kernel if sfld dies first, whatever kills it: a KVM guest stuck on such a host
would otherwise spin at full CPU for ever, an orphan of init.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sflib.errors import OperationTimeout, SnowFlockError, UsageError, WrongStateError
from sflib.run import run

log = logging.getLogger(__name__)

PROBE_EXIT = (0x2A << 1) | 1  # what isa-debug-exit makes of the probe's 0x2a
PROBE_TIMEOUT = 5.0


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel  # KVM or TCG, never AUTO
    reason: str


def probe_argv(qemu: str, probe_bios: Path) -> list[str]:
    return [
        qemu, "-accel", "kvm", "-machine", "pc", "-m", "16", "-display", "none",
        "-nodefaults", "-no-reboot", "-bios", str(probe_bios),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip


def probe_kvm(qemu: str, probe_bios: Path) -> tuple[bool, str]:
    """(works, why): run the long-mode probe under KVM."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if not probe_bios.is_file():
        raise UsageError(f"KVM probe image {probe_bios} is missing", hint="run make c")
    try:
        # SIGKILL: the probe has nothing to save, and a QEMU whose vCPU is stuck in
        # KVM may take its time over SIGTERM.
        done = run(probe_argv(qemu, probe_bios), timeout=PROBE_TIMEOUT, check=False,
                   death_signal=signal.SIGKILL)  # fmt: skip
    except OperationTimeout:
        return False, f"a KVM guest did not reach long mode within {PROBE_TIMEOUT:g} s"
    except SnowFlockError as e:
        return False, f"the probe could not run: {e}"
    if done.returncode == PROBE_EXIT:
        return True, "a KVM guest reached long mode"
    last = done.stderr.strip().splitlines()[-1:] or ["no message"]
    return False, f"the KVM probe exited {done.returncode}: {last[0]}"


def choose(requested: Accel, qemu: str, probe_bios: Path) -> AccelChoice:
    """The accelerator to use. Raises WrongStateError if kvm is demanded but broken."""
    if requested == Accel.TCG:
        return AccelChoice(Accel.TCG, "requested")
    works, why = probe_kvm(qemu, probe_bios)
    if works:
        return AccelChoice(Accel.KVM, why)
    if requested == Accel.KVM:
        raise WrongStateError(f"KVM requested but unusable: {why}", hint="use --accel tcg")
    log.info("using TCG: %s", why)
    return AccelChoice(Accel.TCG, why)

"""A real guest under KVM, where this host's KVM runs one (sflib.vm.accel's probe
says so): it boots and forks as under TCG. Where it does not, the test is skipped
and says why (pytest -ra prints it): every other VM test runs under TCG."""

from __future__ import annotations

import re

import pytest

from sflib.image import build as image
from sflib.vm.accel import Accel, choose
from tests.integration.conftest import boot, console, running_host, vm_names
from tests.integration.test_kvm_probe import built_probe

pytestmark = pytest.mark.vm

FORK = """
t=$(sf-ticket 1)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" | sed 's/^/JOINED /'; echo SF-DONE
else
  sf-exit 7
fi
"""


def kvm_or_skip() -> None:
    """Skips the test, saying why, unless a KVM guest runs here."""
    choice = choose(Accel.AUTO, "qemu-system-x86_64", built_probe())
    if choice.accel != Accel.KVM:
        pytest.skip(f"KVM cannot run a guest on this host ({choice.reason}); "
                    "the other VM tests run under TCG")  # fmt: skip


def test_a_guest_boots_and_forks_under_kvm(guest_image: image.Result) -> None:
    kvm_or_skip()
    with running_host(guest_image, accel="kvm") as h:
        boot(h, "fast", FORK)
        out = console(h, "fast")
        assert re.search(r"^JOINED 1 exited 7$", out, re.M), out[-3000:]
        (vm,) = h.vm_json("ls")
        assert vm["accel"] == "kvm" and vm_names(h) == ["fast"]
        assert "accelerator: kvm" in h.log.read_text()

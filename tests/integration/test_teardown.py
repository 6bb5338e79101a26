"""The test harness's own promise (issue 16): a test that fails leaves the machine
clean, even when sfld cannot clean up after itself. The fixture gives sfld SIGTERM
and a deadline, then SIGKILL, then removes by force whatever leftovers() would list."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from sflib.image import build as image
from sflib.net import fabric
from tests.integration.conftest import (
    boot,
    console,
    memtap_mounts,
    processes,
    qemu_processes,
    running_host,
)

pytestmark = pytest.mark.vm


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                         check=True).stdout  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_a_failed_test_leaves_nothing_even_when_sfld_cleans_up_nothing(
    guest_image: image.Result,
) -> None:
    left: dict[str, object] = {}
    with (
        pytest.raises(RuntimeError, match="on purpose"),
        running_host(guest_image, stop_timeout=5) as h,
    ):
        boot(h, "left", "echo SF-DONE")
        console(h, "left")
        assert h.proc is not None and h.netns is not None
        left.update(memory=h.memory_dir, root=h.root, netns=h.netns)
        # What sfld would remove on SIGTERM is there: a QEMU, its dnsmasq, its
        # family's network.
        assert qemu_processes(h.memory_dir) and processes(f"dnsmasq .*{h.root}/")
        assert asyncio.run(fabric.leftovers(h.netns)) == [1]
        os.kill(h.proc.pid, signal.SIGSTOP)  # from now on it cleans up nothing
        raise RuntimeError("a test failing on purpose")
    memory, root, netns = Path(str(left["memory"])), Path(str(left["root"])), str(left["netns"])
    assert qemu_processes(memory) == []
    assert processes(f"dnsmasq .*{root}/") == []
    assert processes(f"build/(memserver|memtap) .*{memory}( |/)") == []
    assert memtap_mounts(memory) == []
    assert not memory.exists() and not root.exists()
    assert [ns for ns in namespaces() if ns == netns or ns.startswith(f"{netns}-")] == []

"""sfld and sf-vm with real VMs under TCG: the life of a VM, faults, clean-up."""

from __future__ import annotations

import base64
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Host, qemu_processes

pytestmark = pytest.mark.vm

GUEST_CHECK = """
import errno
from pyxs import Client, PyXSError
with Client() as c:  # through sf-guestd(8), at Xen's xenstored socket
    c.write(b"data/x", b"from-guest")
    ok = c.read(b"data/x") == b"from-guest"
    try:
        c.write(b"/local/domain/99/x", b"evil")
        ok = False
    except PyXSError as e:
        ok = ok and e.args[0] == errno.EACCES
print("SF-TEST PASS" if ok else "SF-TEST FAIL", flush=True)
"""


def guest_script(code: str) -> str:
    """A kernel command line that runs code in the guest (base64: no quoting trouble)."""
    b64 = base64.b64encode(code.encode()).decode()
    return f'sf.run="echo {b64} | base64 -d > /t.py && python3 /t.py; sleep 100000"'


def wait_for(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_run_ls_logs_stop(host: Host) -> None:
    info = host.vm_json("run", "--name", "web", "--memory", "320", "--wait-ready")
    assert info["state"] == "ready"
    assert info["accel"] == "tcg"
    assert info["boot_to_ready_s"] > 0
    mem = host.memory_dir / "web.mem"
    assert mem.stat().st_size == 320 << 20  # the guest's RAM is this shared file
    assert f"mem-path={mem},share=on" in qemu_processes(host.memory_dir)[0]
    listed = host.vm_json("ls")
    assert [(v["name"], v["state"], v["accel"]) for v in listed] == [("web", "ready", "tcg")]
    table = host.tool("sf-vm", "ls").stdout
    assert "web" in table and "tcg" in table
    assert "snowflock-guest: ready" in host.tool("sf-vm", "logs", "web").stdout
    ready = host.xenstore("xenstore-read", f"/local/domain/{info['domid']}/snowflock/ready")
    assert ready.returncode == 0 and float(ready.stdout) > 0  # the guest's uptime
    assert host.tool("sf-vm", "stop", "web").stdout.strip() == "web"
    assert not os.path.exists(f"/proc/{info['pid']}")
    assert host.leftovers() == []
    assert host.xenstore("xenstore-ls", f"/local/domain/{info['domid']}").returncode != 0


def test_guest_uses_its_own_domain_and_is_refused_others(host: Host) -> None:
    info = host.vm_json("run", "--name", "g", "--append", guest_script(GUEST_CHECK),
                        "--wait-ready")  # fmt: skip
    assert wait_for(lambda: "SF-TEST" in host.tool("sf-vm", "logs", "g").stdout, 60)
    assert "SF-TEST PASS" in host.tool("sf-vm", "logs", "g").stdout
    got = host.xenstore("xenstore-read", f"/local/domain/{info['domid']}/data/x")
    assert got.stdout.strip() == "from-guest"  # the relative path landed in its domain
    assert host.xenstore("xenstore-read", "/local/domain/99/x").returncode != 0


def test_two_vms_get_their_own_domains(host: Host) -> None:
    a = host.vm_json("run", "--name", "a")
    b = host.vm_json("run", "--name", "b", "--wait-ready")
    host.tool("sf-vm", "run", "--name", "a", check=False)
    assert {a["domid"], b["domid"]} == {1, 2}
    dup = host.tool("sf-vm", "run", "--name", "a", check=False)
    assert dup.returncode == 4 and "already running" in dup.stderr
    host.tool("sf-vm", "stop", "a", "b")
    assert host.vm_json("ls") == []


def test_too_little_memory_for_the_image_is_refused(host: Host) -> None:
    out = host.tool("sf-vm", "run", "--memory", "128", check=False)
    assert out.returncode == 2
    assert "128 MiB is too little for the image" in out.stderr and "at least" in out.stderr
    assert host.leftovers() == []


def test_vm_that_powers_off_is_removed(host: Host) -> None:
    host.vm_json("run", "--name", "brief", "--append", 'sf.run="true"')
    assert wait_for(lambda: host.vm_json("ls") == [], 120)
    assert "VM brief exited" in host.log.read_text()
    assert host.leftovers() == []


def test_qemu_failing_at_start_is_reported_and_leaves_nothing(host: Host, tmp_path: Path) -> None:
    bad = tmp_path
    (bad / "vmlinuz").write_bytes(b"not a kernel")
    (bad / "initrd.img").write_bytes(b"")
    out = host.tool("sf-vm", "run", "--name", "bad", "--image", str(bad), check=False)
    assert out.returncode == 111, out.stderr
    assert out.stderr.startswith("sf-vm: error: QEMU exited with status 1:")
    assert host.leftovers() == []
    assert host.vm_json("ls") == []


def test_sigterm_stops_every_vm_and_cleans_up(host: Host) -> None:
    info = host.vm_json("run", "--name", "t", "--wait-ready")
    assert host.stop(signal.SIGTERM) == 0
    assert not os.path.exists(f"/proc/{info['pid']}")
    assert host.leftovers() == []
    assert not (host.run_dir / "sfld.sock").exists()


def test_killed_sfld_leaves_no_qemu_and_a_restart_cleans_files(host: Host) -> None:
    info = host.vm_json("run", "--name", "orphan", "--wait-ready")
    host.stop(signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"), 15), "QEMU outlived sfld"
    assert (host.memory_dir / "orphan.mem").exists()  # nobody removed it yet
    host.start()
    assert host.leftovers() == []
    assert "cleaned up VM orphan left by a previous sfld" in host.log.read_text()
    assert host.vm_json("ls") == []


def test_auto_accel_boots_a_real_guest(host: Host) -> None:
    """auto's choice must run a kernel: on a host whose /dev/kvm cannot, that is TCG."""
    host.stop()
    host.accel = "auto"
    host.start()
    status = host.vm_json("status")
    assert status["accel"] in ("kvm", "tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert status["accel"] == "tcg"
    info = host.vm_json("run", "--wait-ready", "--timeout", "240")
    assert info["state"] == "ready" and info["accel"] == status["accel"]

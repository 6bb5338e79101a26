"""A VM's tap (sflib.net.tap), on a real tun device: its virtio-net header size,
and its hold (c/taphold.c) preloaded into a real process, which a new QEMU started
beside its VM's running one has (sflib.fork.standby.start_next)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sflib.errors import SystemFailure
from sflib.net import tap


def test_the_header_size_is_read_and_put_back() -> None:
    fd = tap.open_tap(f"sftu{os.getpid() % 100000}")
    try:
        tap.set_vnet_header_size(fd, 12)  # what a QEMU whose guest has VERSION_1 uses
        assert tap.vnet_header_size(fd) == 12
        tap.set_vnet_header_size(fd, 10)  # what a new QEMU's card sets
        assert tap.vnet_header_size(fd) == 10
    finally:
        os.close(fd)


def test_a_descriptor_that_is_no_tap_is_a_clear_error() -> None:
    read, write = os.pipe()
    try:
        with pytest.raises(SystemFailure, match="header size"):
            tap.vnet_header_size(read)
        with pytest.raises(SystemFailure, match="header size"):
            tap.set_vnet_header_size(read, 12)
    finally:
        os.close(read)
        os.close(write)


# A process the shim is preloaded into (as into QEMU): it polls the tap through
# poll() and ppoll() (QEMU's main loop), and sets the header size and offloads as a
# new QEMU's card does, when told to on stdin.
PRELOADED = r"""
import ctypes, fcntl, select, struct, sys
fd = int(sys.argv[1])
class PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]
libc = ctypes.CDLL(None, use_errno=True)
for line in sys.stdin:
    if line.strip() == "poll":
        p = select.poll()
        p.register(fd, select.POLLOUT)  # a tap is always writable
        entry = PollFd(fd, select.POLLOUT, 0)
        timeout = struct.pack("ll", 0, 50_000_000)
        n = libc.ppoll(ctypes.byref(entry), 1, timeout, None)
        print(len(p.poll(50)), n, entry.events == select.POLLOUT, flush=True)
    else:
        fcntl.ioctl(fd, 0x400454D8, struct.pack("i", 10))  # TUNSETVNETHDRSZ
        fcntl.ioctl(fd, 0x400454D0, 0)  # TUNSETOFFLOAD: none
        print("set", flush=True)
"""

TUNSETOFFLOAD, TUN_F_CSUM = 0x400454D0, 1
# Whether the tap's offloads have the host leave checksums to its reader (ethtool -k).
TX_CHECKSUMMING = r"""
import ctypes, fcntl, socket, struct, sys
value = ctypes.create_string_buffer(struct.pack("II", 0x16, 0))  # ETHTOOL_GTXCSUM
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s, 0x8946, struct.pack("16sP", sys.argv[1].encode(), ctypes.addressof(value)))
print(struct.unpack("II", value.raw[:8])[1])
"""


@dataclass
class Tap:
    name: str
    fd: int
    netns: str

    def tx_checksumming(self) -> bool:
        out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c",
                              TX_CHECKSUMMING, self.name], capture_output=True, text=True,
                             check=True, timeout=30)  # fmt: skip
        return out.stdout.strip() != "0"


@pytest.fixture
def a_tap() -> Iterator[Tap]:
    """A tap that is up, in a namespace of its own: a tap that is down is never
    ready to write to, and one that is up says so as QEMU's card polls it."""
    name = netns = f"sfth{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    fd = tap.open_tap(name)
    try:
        subprocess.run(["ip", "link", "set", name, "netns", netns], check=True, timeout=30)
        subprocess.run(["ip", "-n", netns, "link", "set", name, "up"], check=True, timeout=30)
        tap.set_vnet_header_size(fd, 12)  # as the running QEMU left it
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
        yield Tap(name, fd, netns)
    finally:
        os.close(fd)
        subprocess.run(["ip", "netns", "delete", netns], check=True, timeout=30)


def ask(child: subprocess.Popen[str], what: str) -> str:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(what + "\n")
    child.stdin.flush()
    return child.stdout.readline().strip()


def test_a_held_tap_is_left_as_the_running_qemu_set_it(a_tap: Tap, tmp_path: Path) -> None:
    fd = a_tap.fd
    hold = tap.Hold(tmp_path / "v.g1.taphold", fd)
    hold.create(held=True)
    other = {"PATH": os.environ["PATH"], "LD_PRELOAD": "/x/other.so"}
    assert hold.environment(other)["LD_PRELOAD"] == f"/x/other.so {tap.TAPHOLD}"
    env = hold.environment({"PATH": os.environ["PATH"]})
    child = subprocess.Popen([sys.executable, "-c", PRELOADED, str(fd)], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, pass_fds=[fd])  # fmt: skip
    try:
        # Held: neither poll nor ppoll sees the tap, whose entry comes back as it was,
        # and the new card's settings do not reach it.
        assert ask(child, "poll") == "0 0 True"
        assert ask(child, "set") == "set"
        assert tap.vnet_header_size(fd) == 12
        assert a_tap.tx_checksumming()
        # Released (as the QEMU loads its VM's state), it is the QEMU's.
        hold.set(held=False)
        assert ask(child, "poll") == "1 1 True"
        assert ask(child, "set") == "set"
        assert tap.vnet_header_size(fd) == 10
        assert not a_tap.tx_checksumming()
        # Held again (as the QEMU stops for good), it polls nothing.
        hold.set(held=True)
        assert ask(child, "poll") == "0 0 True"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0
    assert child.stderr is not None and child.stderr.read() == ""
    hold.remove()
    assert not hold.path.exists()


def test_a_bad_hold_is_said_once_and_changes_nothing(a_tap: Tap) -> None:
    fd = a_tap.fd
    env = {"PATH": os.environ["PATH"], "LD_PRELOAD": str(tap.TAPHOLD), "SF_TAPHOLD": f"{fd}"}
    out = subprocess.run([sys.executable, "-c", PRELOADED, str(fd)], env=env, text=True,
                         input="poll\nset\n", capture_output=True, pass_fds=[fd],
                         timeout=30, check=True)  # fmt: skip
    assert out.stdout.splitlines() == ["1 1 True", "set"]
    assert out.stderr == "taphold: SF_TAPHOLD: not DESCRIPTOR:FILE; the tap is never held\n"
    assert tap.vnet_header_size(fd) == 10
    assert not a_tap.tx_checksumming()


def test_a_hold_without_the_shim_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tap, "TAPHOLD", tmp_path / "libtaphold.so")
    with pytest.raises(SystemFailure, match=r"libtaphold\.so is missing"):
        tap.Hold(tmp_path / "v.taphold", 3).create(held=False)

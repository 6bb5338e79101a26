"""A VM's tap device, opened by sfld and handed to each QEMU the VM has.

sfld holds the tap's file descriptor for the VM's whole life and passes it down
(-netdev tap,fd=N): a VM that goes on in a new QEMU after a checkpoint keeps its
tap, which a second QEMU could not open by name while the first still holds it.
The tap is not persistent, so it disappears when sfld closes it or dies. It always
carries virtio-net headers: a clone's device state, saved with the offloads its
parent negotiated, loads only onto a tap that has them.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from sflib.errors import SystemFailure
from sflib.paths import BUILD_DIR

TUNSETIFF = 0x400454CA
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def open_tap(name: str) -> int:
    """A new tap device called name; returns its file descriptor (inheritable, so
    QEMU gets it). Raises SystemFailure."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as e:
        raise SystemFailure(f"cannot open /dev/net/tun: {e.strerror}") from e
    try:
        request = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, request)
        os.set_inheritable(fd, True)
    except OSError as e:
        os.close(fd)
        raise SystemFailure(f"cannot create tap {name}: {e.strerror}") from e
    return fd


def vnet_header_size(fd: int) -> int:
    """The size of the virtio-net header the tap's reader and writer use: a QEMU
    sets it when its card is made, and again when it loads a card's state. Raises
    SystemFailure."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)))[0])
    except OSError as e:
        raise SystemFailure(f"cannot read the tap's virtio-net header size: {e.strerror}") from e


def set_vnet_header_size(fd: int, size: int) -> None:
    """Raises SystemFailure."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", size))
    except OSError as e:
        raise SystemFailure(f"cannot set the tap's virtio-net header size: {e.strerror}") from e


TAPHOLD = BUILD_DIR / "libtaphold.so"
HELD, FREE = b"1", b"0"


class Hold:
    """Whether a QEMU leaves alone the tap it shares with its VM's other QEMU.

    A VM's next QEMU starts while the VM runs in its current one, on the same tap
    (sflib.fork.standby). c/taphold.c, preloaded into every QEMU with a card, reads
    the first byte of a file: while the tap is held, that QEMU reads no frame from
    it (frames wait in the tap's queue for the other QEMU) and does not change the
    tap's virtio-net header size or offloads, which belong to the tap and which the
    running QEMU set for its guest.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def create(self, held: bool) -> None:
        """Raises SystemFailure."""
        if not TAPHOLD.is_file():
            raise SystemFailure(f"{TAPHOLD} is missing", hint="run make c")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(HELD if held else FREE)
        except OSError as e:
            raise SystemFailure(f"cannot write {self.path}: {e.strerror}") from e

    def set(self, held: bool) -> None:
        """Takes effect as the QEMU next polls: once it has handled what wakes it
        next (a command, at the latest). Raises SystemFailure."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, HELD if held else FREE, 0)  # QEMU's shared mapping sees it
            finally:
                os.close(fd)
        except OSError as e:
            raise SystemFailure(f"cannot write {self.path}: {e.strerror}") from e

    def environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """env (or ours), with the shim preloaded beside what env preloads."""
        base = dict(os.environ if env is None else env)
        preload = " ".join(filter(None, (base.get("LD_PRELOAD"), str(TAPHOLD))))
        return {**base, "LD_PRELOAD": preload, "SF_TAPHOLD": f"{self.fd}:{self.path}"}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

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
import threading

from sflib.errors import SystemFailure

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


class HeaderKeeper:
    """Keeps a tap's virtio-net header size while a new QEMU starts on it: QEMU
    sets the size to its new card's (10 bytes) as it makes the card, under the
    QEMU that runs the guest (12 once the guest negotiated VERSION_1), and every
    frame would then be cut wrong both ways. A thread puts the size back within
    about a millisecond of each change, until stop(). Use as a context manager."""

    POLL = 0.001  # seconds between looks: frames in that window are lost

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = vnet_header_size(fd)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"tap-header-{fd}", daemon=True)

    def __enter__(self) -> HeaderKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._put_back()

    def _keep(self) -> None:
        while not self._stop.wait(self.POLL):
            self._put_back()

    def _put_back(self) -> None:
        try:
            if vnet_header_size(self.fd) != self.size:
                set_vnet_header_size(self.fd, self.size)
        except SystemFailure:
            self._stop.set()  # the tap is gone: its VM is ending

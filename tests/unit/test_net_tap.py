"""A VM's tap (sflib.net.tap), on a real tun device: the virtio-net header size a
QEMU resets under the running one, read and put back as sfld does around a new
QEMU's start (sflib.fork.standby.start_next)."""

from __future__ import annotations

import os

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

"""The guest's end of the XenStore channel: pyxs on the virtio-serial port.

pyxs opens the port as it would open /dev/xen/xenbus on Xen.
"""

from __future__ import annotations

import os

from pyxs import Client

from sflib.errors import UnreachableError
from sflib.vm.qemu import XENBUS_PORT

PORT_PATH = f"/dev/virtio-ports/{XENBUS_PORT}"


def open_bus(path: str | None = None) -> Client:
    """A connected pyxs client. Raises UnreachableError if there is no port."""
    path = path or os.environ.get("SF_XENBUS", PORT_PATH)
    if not os.path.exists(path):
        raise UnreachableError(f"no XenStore port at {path}", hint="is this a SnowFlock VM?")
    client = Client(xen_bus_path=path)
    client.connect()
    return client

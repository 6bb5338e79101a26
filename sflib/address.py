"""HOST:PORT addresses, as every setting and tool that names a daemon gives them."""

from __future__ import annotations

from sflib.errors import UsageError


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port". Raises UsageError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"invalid address {address!r}", hint="use HOST:PORT")
    return host, int(port)

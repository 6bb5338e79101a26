"""The family share: clones hand results back to their parent through XenStore.

sfld gives clone k of a ticket a folder in its parent's domain,
snowflock/share/<ticket>/<k>, that the clone may write and the parent read. A value
is stored as base64 chunks (XenStore takes 7-bit text, at most 2048 bytes a value
from a guest): <key>/<i> for each chunk, then <key>/chunks, written last, so a
reader never sees half a value.
"""

from __future__ import annotations

import base64
import errno
import logging
import re
from collections.abc import Callable

from pyxs import Client, PyXSError

from sflib.errors import NotFoundError, SystemFailure, UsageError
from sflib.guest import layout
from sflib.guest.api import identity
from sflib.guest.bus import open_bus

log = logging.getLogger(__name__)

CHUNK = 1536  # base64 makes 2048 of it
KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def chunks(data: bytes) -> list[bytes]:
    """data as base64 chunks of at most 2048 bytes (pure); none for no data (XenStore
    takes an empty value, pyxs does not)."""
    return [base64.b64encode(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]


def _check_key(key: str) -> str:
    if not KEY.match(key):
        raise UsageError(f"invalid key {key!r}", hint="use [A-Za-z0-9_-], at most 64")
    return key


PARENT = "parent"  # a parent's own results, for the host: snowflock/share/parent/0/<key>


def put(key: str, data: bytes) -> str:
    """Store data under key in this clone's share folder (in a parent: in its own
    domain, for the host to collect); returns the path used."""
    me = identity()
    # In a clone sfld says where: its parent's domain, or (another host's) its own.
    folder = str(me["share"]) if me else layout.share_dir(PARENT, 0)
    base = f"{folder}/{_check_key(key)}"
    parts = chunks(data)
    with open_bus() as client:
        try:
            for i, part in enumerate(parts):
                client.write(f"{base}/{i}".encode(), part)
            client.write(f"{base}/chunks".encode(), str(len(parts)).encode())
        except PyXSError as e:
            _drop(client, base)  # half a value only uses up the quota the rest needs
            raise SystemFailure(f"cannot share {key} ({len(data)} bytes): {_why(e)}",
                                hint="XenStore holds little; share a digest or a path "
                                     "on shared storage instead") from None  # fmt: skip
    return base


def _why(error: PyXSError) -> str:
    code = error.args[0] if error.args else None
    if code == errno.ENOSPC:
        return "over the domain's XenStore quota"
    return str(error.args[1] if len(error.args) > 1 else error)


def _drop(client: Client, base: str) -> None:
    try:
        client.delete(base.encode())
    except PyXSError as e:
        log.warning("the half-shared %s stays: %s", base, e)


def get(ticket: str, clone_id: int, key: str) -> bytes:
    """What clone clone_id of ticket stored under key. Raises NotFoundError."""
    base = f"{layout.share_dir(ticket, clone_id)}/{_check_key(key)}"
    with open_bus() as client:
        try:
            parts = read_chunks(lambda path: bytes(client.read(path.encode())), base)
        except PyXSError:
            raise NotFoundError(f"clone {clone_id} of {ticket} shared no {key}") from None
    return b"".join(base64.b64decode(part) for part in parts)


def read_chunks(read: Callable[[str], bytes], base: str) -> list[bytes]:
    """The base64 chunks of the value stored at base (read: a XenStore read).
    Raises what read raises, ValueError for a bad count."""
    return [read(f"{base}/{i}") for i in range(int(read(f"{base}/chunks")))]


def keys(ticket: str) -> dict[int, list[str]]:
    """Each clone's keys in the share of ticket."""
    with open_bus() as client:
        return {int(k): _complete(client, f"{layout.SHARE}/{ticket}/{k}")
                for k in _list(client, f"{layout.SHARE}/{ticket}")}  # fmt: skip


def clear(ticket: str) -> None:
    with open_bus() as client:
        client.delete(f"{layout.SHARE}/{ticket}".encode())


def _list(client: Client, path: str) -> list[str]:
    try:
        return [x.decode() for x in client.list(path.encode())]
    except PyXSError:
        raise NotFoundError(f"no share for {path.rsplit('/', 1)[-1]}") from None


def _complete(client: Client, folder: str) -> list[str]:
    return sorted(k for k in _list(client, folder)
                  if client.exists(f"{folder}/{k}/chunks".encode()))  # fmt: skip

"""One request in, its reply and the watch events it causes out (pure).

handle() is the whole protocol logic of the server: argument parsing per message
type, permission to use domain-0-only messages, and error replies.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from sflib.xenstore import names
from sflib.xenstore.perms import parse_perms
from sflib.xenstore.store import Event, Session, Store
from sflib.xenstore.wire import (
    PAYLOAD_MAX,
    Op,
    Packet,
    XenStoreError,
    error_reply,
    join_strings,
    reply,
    split_list,
    split_path_value,
    split_strings,
)

OK = b"OK\0"


@dataclass
class Outcome:
    reply: Packet
    events: list[Event] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # domains whose sessions must close


Handler = Callable[[Store, Session, Packet], Outcome]


def handle(store: Store, session: Session, packet: Packet) -> Outcome:
    handler = _HANDLERS.get(packet.op, _unknown)
    try:
        return handler(store, session, packet)
    except XenStoreError as e:
        return Outcome(error_reply(packet, e))


def _path_arg(session: Session, packet: Packet) -> str:
    (path,) = split_strings(packet.payload, 1)
    return names.resolve(path, session.domid)


def _domid_arg(text: str) -> int:
    if not text.isdigit() or int(text) >= 1 << 16:
        raise XenStoreError(errno.EINVAL, f"invalid domain id {text!r}")
    return int(text)


def _privileged(session: Session) -> None:
    if not session.privileged:
        raise XenStoreError(errno.EACCES, "domain 0 only")


def _read(store: Store, session: Session, packet: Packet) -> Outcome:
    path = _path_arg(session, packet)
    return Outcome(reply(packet, store.tree(session, packet.tx_id).read(path)))


def _directory(store: Store, session: Session, packet: Packet) -> Outcome:
    path = _path_arg(session, packet)
    payload = join_strings(list(store.tree(session, packet.tx_id).directory(path)))
    if len(payload) > PAYLOAD_MAX:
        raise XenStoreError(errno.E2BIG, "use DIRECTORY_PART")
    return Outcome(reply(packet, payload))


def _directory_part(store: Store, session: Session, packet: Packet) -> Outcome:
    path, offset_text = split_strings(packet.payload, 2)
    if not offset_text.isdigit():
        raise XenStoreError(errno.EINVAL, "invalid offset")
    tree = store.tree(session, packet.tx_id)
    absolute = names.resolve(path, session.domid)
    listing = join_strings(list(tree.directory(absolute)))
    offset = int(offset_text)
    if offset > len(listing):
        raise XenStoreError(errno.EINVAL, "offset beyond the list")
    head = str(tree.generation(absolute)).encode() + b"\0"
    room = PAYLOAD_MAX - len(head) - 1
    chunk = listing[offset : offset + room]
    if offset + room >= len(listing):
        return Outcome(reply(packet, head + chunk + b"\0"))  # an empty name ends the list
    cut = chunk.rfind(b"\0") + 1  # whole names only
    return Outcome(reply(packet, head + chunk[:cut]))


def _get_perms(store: Store, session: Session, packet: Packet) -> Outcome:
    path = _path_arg(session, packet)
    perms = store.tree(session, packet.tx_id).get_perms(path)
    return Outcome(reply(packet, join_strings([str(p) for p in perms])))


def _modify(packet: Packet, store: Store, session: Session, action: Callable[..., None]) -> Outcome:
    tree = store.tree(session, packet.tx_id)
    action(tree)
    return Outcome(reply(packet, OK), store.finish(session, packet.tx_id, tree))


def _write(store: Store, session: Session, packet: Packet) -> Outcome:
    raw, value = split_path_value(packet.payload)
    path = names.resolve(raw, session.domid)
    return _modify(packet, store, session, lambda t: t.write(path, value))


def _mkdir(store: Store, session: Session, packet: Packet) -> Outcome:
    path = _path_arg(session, packet)
    return _modify(packet, store, session, lambda t: t.mkdir(path))


def _rm(store: Store, session: Session, packet: Packet) -> Outcome:
    path = _path_arg(session, packet)
    return _modify(packet, store, session, lambda t: t.rm(path))


def _set_perms(store: Store, session: Session, packet: Packet) -> Outcome:
    items = split_list(packet.payload)
    path = names.resolve(items[0], session.domid)
    perms = parse_perms(items[1:])
    return _modify(packet, store, session, lambda t: t.set_perms(path, perms))


def _watch(store: Store, session: Session, packet: Packet) -> Outcome:
    path, token = _watch_args(packet)
    return Outcome(reply(packet, OK), store.watch(session, path, token))


def _unwatch(store: Store, session: Session, packet: Packet) -> Outcome:
    path, token = _watch_args(packet)
    store.unwatch(session, path, token)
    return Outcome(reply(packet, OK))


def _watch_args(packet: Packet) -> tuple[str, bytes]:
    # Tokens are opaque bytes, the path is ASCII; both NUL-terminated.
    parts = packet.payload.split(b"\0")
    if len(parts) != 3 or parts[2] != b"":
        raise XenStoreError(errno.EINVAL, "expected path and token")
    path = split_strings(parts[0] + b"\0", 1)[0]
    return path, parts[1]


def _transaction_start(store: Store, session: Session, packet: Packet) -> Outcome:
    if packet.tx_id != 0:
        raise XenStoreError(errno.EBUSY, "already in a transaction")
    return Outcome(reply(packet, str(store.transaction_start(session)).encode() + b"\0"))


def _transaction_end(store: Store, session: Session, packet: Packet) -> Outcome:
    (flag,) = split_strings(packet.payload, 1)
    if flag not in ("T", "F"):
        raise XenStoreError(errno.EINVAL, "expected T or F")
    events = store.transaction_end(session, packet.tx_id, commit=flag == "T")
    return Outcome(reply(packet, OK), events)


def _introduce(store: Store, session: Session, packet: Packet) -> Outcome:
    _privileged(session)
    args = split_list(packet.payload)
    if len(args) < 3:
        raise XenStoreError(errno.EINVAL, "expected domid, mfn and port")
    return Outcome(reply(packet, OK), store.introduce(_domid_arg(args[0])))


def _release(store: Store, session: Session, packet: Packet) -> Outcome:
    _privileged(session)
    domid = _domid_arg(split_strings(packet.payload, 1)[0])
    return Outcome(reply(packet, OK), store.release(domid), released=[domid])


def _get_domain_path(store: Store, session: Session, packet: Packet) -> Outcome:
    domid = _domid_arg(split_strings(packet.payload, 1)[0])
    return Outcome(reply(packet, names.domain_path(domid).encode() + b"\0"))


def _is_domain_introduced(store: Store, session: Session, packet: Packet) -> Outcome:
    domid = _domid_arg(split_strings(packet.payload, 1)[0])
    known = domid == 0 or domid in store.introduced
    return Outcome(reply(packet, b"T\0" if known else b"F\0"))


def _reset_watches(store: Store, session: Session, packet: Packet) -> Outcome:
    store.reset_watches(session)
    return Outcome(reply(packet, OK))


def _unknown(store: Store, session: Session, packet: Packet) -> Outcome:
    raise XenStoreError(errno.EINVAL, f"unknown message type {packet.op}")


def _unsupported(store: Store, session: Session, packet: Packet) -> Outcome:
    raise XenStoreError(errno.ENOSYS, f"{Op(packet.op).name} is not supported")


_HANDLERS: dict[int, Handler] = {
    Op.READ: _read,
    Op.DIRECTORY: _directory,
    Op.DIRECTORY_PART: _directory_part,
    Op.GET_PERMS: _get_perms,
    Op.WRITE: _write,
    Op.MKDIR: _mkdir,
    Op.RM: _rm,
    Op.SET_PERMS: _set_perms,
    Op.WATCH: _watch,
    Op.UNWATCH: _unwatch,
    Op.TRANSACTION_START: _transaction_start,
    Op.TRANSACTION_END: _transaction_end,
    Op.INTRODUCE: _introduce,
    Op.RELEASE: _release,
    Op.GET_DOMAIN_PATH: _get_domain_path,
    Op.IS_DOMAIN_INTRODUCED: _is_domain_introduced,
    Op.RESET_WATCHES: _reset_watches,
    Op.CONTROL: _unsupported,
    Op.RESUME: _unsupported,
    Op.SET_TARGET: _unsupported,
}

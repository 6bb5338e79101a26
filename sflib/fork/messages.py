"""What a fork tells: the clone start one host asks of another, what each clone
hears from sf-clone, and who each clone is. Encoded and decoded here only, by both
ends (the parent's host, sflib.fork.remote; the clone's host, sflib.fork.hosted).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from sflib.errors import UsageError

START = "clone.start"  # the peer call that carries a CloneStart


@dataclass(frozen=True)
class CloneStart:
    """Start clones ids of ticket here, from the descriptor of a checkpoint on the
    parent's host (owner_host, whose sfld listens at owner_address), mapping its
    memory image through a memtap mount of that host's memory server."""

    ticket: str
    ids: list[int]
    family: str  # the parent VM's name
    parent_domid: int  # its domain on its own host
    owner_host: str
    owner_address: str
    rid: str  # the request the parent was blocked in: each clone gets its reply
    reply: dict[str, Any]  # what every clone's reply holds besides its own (clone_reply)
    manifest: dict[str, Any]  # sflib.fork.checkpoint's descriptor
    devstate: bytes
    memserver: str  # HOST:PORT
    image: str  # the image's name at that server
    network: dict[str, Any] | None  # the family network's plan (sflib.fork.network)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["devstate"] = base64.b64encode(self.devstate).decode()
        return data

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> CloneStart:
        """Raises UsageError for a message that is not one."""
        try:
            start = cls(
                ticket=_typed(args, "ticket", str), ids=[int(k) for k in args["ids"]],
                family=_typed(args, "family", str),
                parent_domid=_typed(args, "parent_domid", int),
                owner_host=_typed(args, "owner_host", str),
                owner_address=_typed(args, "owner_address", str),
                rid=_typed(args, "rid", str), reply=_typed(args, "reply", dict),
                manifest=_typed(args, "manifest", dict),
                devstate=base64.b64decode(_typed(args, "devstate", str), validate=True),
                memserver=_typed(args, "memserver", str), image=_typed(args, "image", str),
                network=args.get("network"),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise UsageError(f"{START}: malformed request: {e}") from None
        if start.network is not None and not isinstance(start.network, dict):
            raise UsageError(f"{START}: malformed request: network")
        return start


NET_CONNECT = "net.connect"  # a family's network here reaches more hosts (FamilyPeers)
NET_PREPARE = "net.prepare"  # make a family's network here before its clones (FamilyPeers)


@dataclass(frozen=True)
class FamilyPeers:
    """Family number's network on the hosts at these underlay addresses: the peer
    calls net.connect (a network here reaches them too) and net.prepare (a ticket
    placed clones here: make the network now, before they come)."""

    family: int
    peers: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, op: str, args: dict[str, Any]) -> FamilyPeers:
        """Raises UsageError for a message that is not one."""
        try:
            family, peers = _typed(args, "family", int), _typed(args, "peers", list)
        except (KeyError, TypeError) as e:
            raise UsageError(f"{op}: malformed request: {e}") from None
        if not all(isinstance(p, str) for p in peers):
            raise UsageError(f"{op}: malformed request: peers must be strings")
        return cls(family, peers)


def _typed(args: dict[str, Any], key: str, kind: type) -> Any:
    value = args[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"{key} must be {kind.__name__}")
    return value


def clone_reply(clone_id: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """What sf-clone (or sf-checkpoint) returns in a member of a family: its ID, and a
    seed of its own that the guest mixes into its kernel's RNG at once (the VM's
    new generation ID reseeds it too, a little later: sf-clone(1), UNIQUENESS)."""
    return {**(base or {}), "id": clone_id, "seed": secrets.token_hex(32)}


@dataclass(frozen=True)
class Identity:
    """Who a clone is, written into its XenStore domain (sflib.guest.layout.IDENTITY)
    for its hooks (each key becomes SF_<KEY>)."""

    id: int
    family: str
    ticket: str
    domid: int
    parent_domid: int  # on the parent's host
    host: str  # the host that runs it
    parent_host: str
    share: str  # the XenStore folder its sf-share put writes (sflib.guest.share)

    def to_json(self, network: dict[str, Any] | None = None) -> dict[str, Any]:
        """With the clone's identity on its family network, if it has one."""
        return {**asdict(self), **(network or {})}

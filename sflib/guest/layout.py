"""The SnowFlock keys in a domain's XenStore subtree, and the messages in them (pure).

A guest asks by writing snowflock/requests/<rid> = {"op": ..., "args": {...}} and
waits on a watch for snowflock/replies/<rid> = {"ok": true, "result": ...} or
{"ok": false, "error": {"type", "message", "hint"}}. sfld removes each request
before acting on it, so a clone never inherits one. Paths are relative: a clone is
a new domain and the guest inside does not know its number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sflib.errors import SnowFlockError, UsageError

REQUESTS = "snowflock/requests"
REPLIES = "snowflock/replies"
IDENTITY = "snowflock/identity"  # {"id", "family", "ticket", ...}, written by sfld
FREEPAGES = "snowflock/freepages"  # <key>/<i>, <key>/chunks: sflib.guest.freepages
FREEPAGES_KEY = re.compile(r"^snowflock/freepages/[0-9a-f]{1,32}$")
SHARE = "snowflock/share"  # in the parent's domain: <ticket>/<clone id>/<key>
OPS = ("ticket", "clone", "checkpoint", "create_clones", "exit", "join", "kill", "link")

_REQUEST_PATH = re.compile(r"^/local/domain/(\d+)/snowflock/requests/([A-Za-z0-9_-]{1,64})$")


@dataclass(frozen=True)
class Request:
    domid: int
    rid: str
    op: str
    args: dict[str, Any]


def request_key(rid: str) -> str:
    return f"{REQUESTS}/{rid}"


def reply_key(rid: str) -> str:
    return f"{REPLIES}/{rid}"


def share_dir(ticket: str, clone_id: int) -> str:
    return f"{SHARE}/{ticket}/{clone_id}"


_SHARE_DONE = re.compile(
    r"^/local/domain/(\d+)/snowflock/share/([A-Za-z0-9_-]{1,64})/(\d+)/([A-Za-z0-9_-]{1,64})/chunks$"
)


def parse_share_done(path: str) -> tuple[int, str, int, str] | None:
    """(domid, ticket, clone id, key) if path is the last key a share put writes."""
    match = _SHARE_DONE.match(path)
    if not match:
        return None
    return int(match.group(1)), match.group(2), int(match.group(3)), match.group(4)


def parse_request_path(path: str) -> tuple[int, str] | None:
    """(domid, rid) if path is a request key, else None."""
    match = _REQUEST_PATH.match(path)
    return (int(match.group(1)), match.group(2)) if match else None


def encode_request(op: str, args: dict[str, Any]) -> bytes:
    return json.dumps({"op": op, "args": args}).encode()


def decode_request(domid: int, rid: str, raw: bytes) -> Request:
    """Raises UsageError for a malformed request or an unknown op."""
    try:
        msg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError("malformed request") from None
    if not isinstance(msg, dict) or msg.get("op") not in OPS:
        raise UsageError(f"unknown request {msg.get('op') if isinstance(msg, dict) else msg!r}")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise UsageError("malformed request arguments")
    return Request(domid, rid, msg["op"], args)


def encode_result(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode()


def encode_error(error: SnowFlockError) -> bytes:
    return json.dumps({"ok": False, "error": error.to_wire()}).encode()


def decode_reply(raw: bytes) -> Any:
    """The result, or the host's error raised again here."""
    msg = json.loads(raw)
    if msg.get("ok"):
        return msg.get("result")
    raise SnowFlockError.from_wire(msg.get("error") or {})

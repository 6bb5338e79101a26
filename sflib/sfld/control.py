"""sfld's control protocol: one JSON object per line on a Unix socket.

Request {"op": "vm.run", "args": {...}}; reply {"ok": true, "result": ...} or
{"ok": false, "error": {"type": ..., "message": ..., "hint": ...}}, the error
raised again on the caller's side as the same SnowFlockError subclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sflib.errors import (
    OperationTimeout,
    SnowFlockError,
    SystemFailure,
    UnreachableError,
    UsageError,
)

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
Dispatch = Callable[[str, dict[str, Any]], Awaitable[Any]]


# The codec (pure) ---------------------------------------------------------------


def encode_request(op: str, args: dict[str, Any]) -> bytes:
    return json.dumps({"op": op, "args": args}).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Raises UsageError for anything but {"op": str, "args": object}."""
    try:
        msg = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"malformed request: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise UsageError("malformed request: no op")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise UsageError("malformed request: args must be an object")
    return msg["op"], args


def encode_result(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def encode_error(error: SnowFlockError) -> bytes:
    return json.dumps({"ok": False, "error": error.to_wire()}).encode() + b"\n"


def decode_reply(line: bytes) -> Any:
    """The result, or the error raised again."""
    try:
        msg = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemFailure(f"malformed reply from sfld: {e}") from None
    if msg.get("ok"):
        return msg.get("result")
    raise SnowFlockError.from_wire(msg.get("error") or {})


# The server (asyncio adapter) ----------------------------------------------------


async def serve(path: Path, dispatch: Dispatch) -> asyncio.Server:
    """Listen on path (mode 0600, a stale socket replaced)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(await answer(line, dispatch))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as e:
            log.info("control client dropped: %s", e)
        finally:
            writer.close()

    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_LINE)
    path.chmod(0o600)
    return server


async def answer(line: bytes, dispatch: Dispatch) -> bytes:
    """The reply line to one request line."""
    try:
        op, args = decode_request(line)
        return encode_result(await dispatch(op, args))
    except SnowFlockError as e:
        return encode_error(e)
    except Exception as e:  # one bad request must not kill the daemon
        log.exception("internal error in a control request")
        return encode_error(SystemFailure(f"internal error in sfld: {e}"))


# The client (blocking, for host tools) ------------------------------------------


class ControlClient:
    def __init__(self, path: Path, timeout: float = 600.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        """Send one request, return its result. Raises what sfld raised, or
        UnreachableError, OperationTimeout."""
        with self._connect() as sock:
            sock.settimeout(self.timeout)
            try:
                sock.sendall(encode_request(op, args))
                line = sock.makefile("rb").readline(MAX_LINE)
            except TimeoutError:
                raise OperationTimeout(f"sfld did not answer {op} in {self.timeout:g} s") from None
            except OSError as e:
                raise UnreachableError(f"lost sfld at {self.path}: {e.strerror}") from e
        if not line:
            raise UnreachableError(f"sfld at {self.path} closed the connection")
        return decode_reply(line)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
        except OSError as e:
            sock.close()
            raise UnreachableError(
                f"cannot reach sfld at {self.path}: {e.strerror}", hint="is sfld running?"
            ) from e
        return sock


async def close_server(server: asyncio.Server, path: Path) -> None:
    server.close()
    with contextlib.suppress(OSError):
        await server.wait_closed()
    path.unlink(missing_ok=True)

"""Calls between daemons (sfld to sfmasterd, sfld to sfld): JSON lines over TCP,
each connection first proving both ends know the cluster's shared secret.

The handshake (pure parts below), with ns and nc random nonces:
    server -> {"nonce": ns}
    client -> {"nonce": nc, "proof": HMAC(secret, "client" ns nc)}
    server -> {"ok": true, "proof": HMAC(secret, "server" ns nc)}   (or an error, and close)
then requests and replies as on sfld's control socket (sflib.sfld.control). The
secret itself never crosses the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from pathlib import Path
from typing import Any

from sflib.address import split_address
from sflib.errors import AuthError, OperationTimeout, UnreachableError, UsageError
from sflib.sfld import control

log = logging.getLogger(__name__)

MAX_LINE = 64 << 20  # a clone request carries a descriptor of a few hundred KiB


# The handshake (pure) -----------------------------------------------------------


def proof(secret: bytes, role: str, server_nonce: str, client_nonce: str) -> str:
    message = f"{role}|{server_nonce}|{client_nonce}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def verify(secret: bytes, role: str, server_nonce: str, client_nonce: str, given: object) -> bool:
    expected = proof(secret, role, server_nonce, client_nonce)
    return isinstance(given, str) and hmac.compare_digest(expected, given)


def read_secret(path: Path) -> bytes:
    """The shared secret in a file. Raises UsageError."""
    try:
        secret = path.read_bytes().strip()
    except OSError as e:
        raise UsageError(f"cannot read the shared secret {path}: {e.strerror}") from e
    if len(secret) < 16:
        raise UsageError(f"the shared secret in {path} is too short (16 bytes at least)")
    return secret


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _parse(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


# The server (asyncio adapter) -------------------------------------------------------


async def serve(host: str, port: int, secret: bytes, dispatch: control.Dispatch) -> asyncio.Server:
    """Listen on host:port; answer authenticated clients' requests with dispatch."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if await _accept(reader, writer, secret):
                while line := await reader.readline():
                    writer.write(await control.answer(line, dispatch))
                    await writer.drain()
            else:
                log.warning("refused %s: it does not know the shared secret", peer)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError, TimeoutError) as e:
            log.info("peer %s dropped: %s", peer, e)
        finally:
            writer.close()

    return await asyncio.start_server(on_client, host, port, limit=MAX_LINE)


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  secret: bytes) -> bool:  # fmt: skip
    ns = secrets.token_hex(16)
    writer.write(_line({"nonce": ns}))
    hello = _parse(await asyncio.wait_for(reader.readline(), 10))
    nc = hello.get("nonce")
    if not isinstance(nc, str) or not verify(secret, "client", ns, nc, hello.get("proof")):
        writer.write(control.encode_error(AuthError("wrong shared secret")))
        await writer.drain()
        return False
    writer.write(_line({"ok": True, "proof": proof(secret, "server", ns, nc)}))
    await writer.drain()
    return True


# The client (asyncio) ---------------------------------------------------------------


class PeerClient:
    """Calls a daemon at host:port, one authenticated connection per call."""

    def __init__(self, address: str, secret: bytes, timeout: float = 30.0) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.secret = secret
        self.timeout = timeout

    async def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """One request's result. Raises what the peer raised, or UnreachableError,
        AuthError, OperationTimeout."""
        try:
            return await asyncio.wait_for(self._call(op, args), timeout or self.timeout)
        except TimeoutError:
            raise OperationTimeout(f"{self.address} did not answer {op} in time") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise UnreachableError(f"cannot reach {self.address}: {e}") from e

    async def _call(self, op: str, args: dict[str, Any]) -> Any:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_LINE)
        try:
            await self._handshake(reader, writer)
            writer.write(control.encode_request(op, args))
            await writer.drain()
            line = await reader.readline()
            if not line:
                raise UnreachableError(f"{self.address} closed the connection during {op}")
            return control.decode_reply(line)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ns = _parse(await reader.readline()).get("nonce")
        if not isinstance(ns, str):
            raise UnreachableError(f"{self.address} is no SnowFlock daemon")
        nc = secrets.token_hex(16)
        writer.write(_line({"nonce": nc, "proof": proof(self.secret, "client", ns, nc)}))
        await writer.drain()
        answer = _parse(await reader.readline())
        if not answer.get("ok"):
            raise AuthError(f"{self.address} refused us: wrong shared secret")
        if not verify(self.secret, "server", ns, nc, answer.get("proof")):
            raise AuthError(f"{self.address} does not know the shared secret")

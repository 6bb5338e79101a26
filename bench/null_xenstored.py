"""The baseline for the XenStore benchmark: a server that speaks the protocol but
keeps no store (READ answers a fixed value, WRITE answers OK and fires an event to
every watcher of the written path). It costs what the transport, the codec and
asyncio cost, so sf-xenstored's ratio to it is the price of the store itself.
"""

from __future__ import annotations

import asyncio
import sys

from sflib.xenstore.wire import HEADER, Op, Packet, decode_header, watch_event

WATCHERS: dict[str, list[tuple[asyncio.StreamWriter, bytes]]] = {}


def answer(packet: Packet, writer: asyncio.StreamWriter) -> None:
    out = [Packet(packet.op, packet.req_id, packet.tx_id, b"OK\0")]
    if packet.op == Op.READ:
        out[0] = Packet(packet.op, packet.req_id, packet.tx_id, b"0123456789abcdef")
    elif packet.op == Op.WATCH:
        path, token, _ = packet.payload.split(b"\0")
        WATCHERS.setdefault(path.decode(), []).append((writer, token))
        out.append(watch_event(path.decode(), token))
    elif packet.op == Op.WRITE:
        path = packet.payload.split(b"\0")[0].decode()
        for watcher, token in WATCHERS.get(path, []):
            watcher.write(watch_event(path, token).encode())
    writer.write(b"".join(p.encode() for p in out))


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            op, req, tx, length = decode_header(await reader.readexactly(HEADER.size))
            answer(Packet(op, req, tx, await reader.readexactly(length)), writer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        for watchers in WATCHERS.values():
            watchers[:] = [w for w in watchers if w[0] is not writer]


async def main(path: str) -> None:
    server = await asyncio.start_unix_server(serve, path=path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

"""`make demo`: the clone handshake of SnowFlock, over the real message bus.

Until VM fork lands (issue "VM fork on one host"), the demo shows the part that
exists: a guest domain asks for a clone through XenStore and blocks on a watch;
the host clones the domain three times in the store (subtree and connection
state), answers each domain with its own ID, and every copy of the blocked guest
wakes with its own answer. Each "guest" is a real XenStore connection on a
socketpair, exactly as a VM's virtio-serial port will be.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from rich.console import Console
from rich.table import Table

from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.wire import HEADER, Op, Packet

PARENT = 5
CLONES = (6, 7, 8)


class Guest:
    """A domain's side of its connection, speaking raw XenStore packets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.req = 0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock)

    async def call(self, op: Op, payload: bytes) -> bytes:
        self.req += 1
        self.writer.write(Packet(op, self.req, 0, payload).encode())
        return (await self.next_packet(op)).payload

    async def next_packet(self, op: Op) -> Packet:
        while True:
            kind, req, tx, length = HEADER.unpack(await self.reader.readexactly(HEADER.size))
            packet = Packet(kind, req, tx, await self.reader.readexactly(length))
            if kind == op:
                return packet


async def main() -> None:
    console = Console(stderr=True)
    server = XenStoreServer()
    host_end, guest_end = socket.socketpair()
    server.local.make_domain(PARENT)
    server.attach(PARENT, *await asyncio.open_connection(sock=host_end))
    parent = Guest(guest_end)
    await parent.open()

    await parent.call(Op.WRITE, b"app/scene\0castle.pov loaded, 180 MB of state")
    await parent.call(Op.WATCH, b"snowflock/reply\0clone\0")
    await parent.next_packet(Op.WATCH_EVENT)  # the watch's initial event
    await parent.call(Op.WRITE, b"snowflock/request\0clone 3")
    console.print(f"guest (domain {PARENT}): asked for 3 clones, blocked on its reply watch")

    started = time.perf_counter()
    guests = {PARENT: parent}
    for domid in CLONES:
        host_end, guest_end = socket.socketpair()
        server.clone_domain(PARENT, domid, *await asyncio.open_connection(sock=host_end))
        guests[domid] = Guest(guest_end)
        await guests[domid].open()
    for index, domid in enumerate((PARENT, *CLONES)):
        server.local.write(f"/local/domain/{domid}/snowflock/reply", str(index).encode())

    table = Table(title="one guest, four domains: who woke with what")
    for column in ("domain", "woke with ID", "its app/scene", "latency"):
        table.add_column(column)
    for domid, guest in guests.items():
        await guest.next_packet(Op.WATCH_EVENT)
        reply = await guest.call(Op.READ, b"snowflock/reply\0")
        scene = await guest.call(Op.READ, b"app/scene\0")
        ms = (time.perf_counter() - started) * 1000
        table.add_row(str(domid), reply.decode(), scene.decode(), f"{ms:.2f} ms")
    Console().print(table)
    await server.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(1)

"""Many guest processes over one XenStore connection: the decisions of sf-guestd(8).

The guest has one XenStore connection to its host, the virtio-serial port, and it
is a single session: one set of watches, one set of transactions. The agent owns
it and lets any number of local clients share it, as Xen's xenbus frontend driver
does for each process that opens /dev/xen/xenbus:

- each request gets an ID of the agent's own on the port, and its reply goes back
  to the client that sent it, with the client's ID;
- a watch's token is prefixed with its client's number, so that its events go to
  that client alone (and no two clients' watches can collide);
- a client may use only the transactions it started;
- when a client goes, its watches are removed and its transactions ended (aborted),
  also those whose replies arrive after it went.

Pure: packets in, packets out (Out). sflib.guest.agent does the I/O.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from sflib.xenstore.wire import Op, Packet, XenStoreError, error_reply

AGENT = 0  # the client number of the agent's own requests: their replies are dropped
_ABORT = b"F\0"


@dataclass
class Out:
    """What a step sends: packets to the host, and (client, packet) to clients."""

    host: list[Packet] = field(default_factory=list)
    clients: list[tuple[int, Packet]] = field(default_factory=list)


@dataclass
class _Client:
    watches: set[tuple[bytes, bytes]] = field(default_factory=set)  # (path, its own token)
    transactions: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Pending:
    client: int
    req_id: int  # the client's
    op: int
    watch: tuple[bytes, bytes] | None = None  # WATCH, UNWATCH: (path, the client's token)


class Mux:
    def __init__(self) -> None:
        self.clients: dict[int, _Client] = {}
        self.pending: dict[int, _Pending] = {}  # by the agent's request ID
        self._last_client = AGENT
        self._last_req = 0

    def connect(self) -> int:
        """A new client's number (never reused: late replies cannot reach a newcomer)."""
        self._last_client += 1
        self.clients[self._last_client] = _Client()
        return self._last_client

    def disconnect(self, client: int) -> Out:
        """Forget a client; its watches are removed and its transactions aborted."""
        state = self.clients.pop(client, None)
        out = Out()
        if state is not None:
            out.host += [
                self._unwatch(client, path, token) for path, token in sorted(state.watches)
            ]
            out.host += [self._abort(tx) for tx in sorted(state.transactions)]
        return out

    # A client's request ----------------------------------------------------------

    def from_client(self, client: int, packet: Packet) -> Out:
        if packet.op == Op.RESET_WATCHES and not packet.tx_id:
            return self._reset_watches(client, packet)
        try:
            payload, watch = self._checked(client, packet)
        except XenStoreError as e:
            return Out(clients=[(client, error_reply(packet, e))])
        req_id = self._request(_Pending(client, packet.req_id, packet.op, watch))
        return Out(host=[Packet(packet.op, req_id, packet.tx_id, payload)])

    def _checked(self, client: int, packet: Packet) -> tuple[bytes, tuple[bytes, bytes] | None]:
        """The payload to send for a client's request, and its watch (path, token) if
        it is one. Raises XenStoreError."""
        if packet.tx_id and packet.tx_id not in self.clients[client].transactions:
            raise XenStoreError(errno.EINVAL, "not this client's transaction")
        if packet.op == Op.WATCH_EVENT:
            raise XenStoreError(errno.EINVAL, "a client cannot send watch events")
        if packet.op == Op.RESET_WATCHES:
            raise XenStoreError(errno.EINVAL, "RESET_WATCHES is not for a transaction")
        if packet.op not in (Op.WATCH, Op.UNWATCH):
            return packet.payload, None
        path, token = _watch_args(packet.payload)
        return path + b"\0" + _token(client, token) + b"\0", (path, token)

    def _reset_watches(self, client: int, packet: Packet) -> Out:
        """Only this client's watches: the others' are not its to reset."""
        state = self.clients[client]
        out = Out(host=[self._unwatch(client, p, t) for p, t in sorted(state.watches)])
        state.watches.clear()
        out.clients.append((client, Packet(packet.op, packet.req_id, packet.tx_id, b"OK\0")))
        return out

    # What the host sends ----------------------------------------------------------

    def from_host(self, packet: Packet) -> Out:
        if packet.op == Op.WATCH_EVENT:
            return self._event(packet)
        pending = self.pending.pop(packet.req_id, None)
        if pending is None:
            return Out()  # no request of ours (a reply to one sent before a restart)
        out = self._track(pending, packet)
        if pending.client in self.clients:
            out.clients.append((pending.client, Packet(packet.op, pending.req_id,
                                                       packet.tx_id, packet.payload)))  # fmt: skip
        return out

    def _track(self, pending: _Pending, reply: Packet) -> Out:
        """What a reply changes: the client's watches and transactions. A watch or
        transaction granted to a client that has gone is undone at once."""
        ok = reply.op != Op.ERROR
        state = self.clients.get(pending.client)
        if pending.op == Op.TRANSACTION_END:
            if state is not None and reply.payload != b"EINVAL\0":  # EAGAIN ends it too
                state.transactions.discard(reply.tx_id)
            return Out()
        if not ok or pending.client == AGENT:
            return Out()
        if pending.op == Op.TRANSACTION_START:
            tx = _tx_id(reply.payload)
            if not tx:
                return Out()  # not an ID: nothing to track (or to end)
            if state is None:
                return Out(host=[self._abort(tx)])
            state.transactions.add(tx)
        elif pending.op == Op.WATCH and pending.watch is not None:
            if state is None:
                return Out(host=[self._unwatch(pending.client, *pending.watch)])
            state.watches.add(pending.watch)
        elif pending.op == Op.UNWATCH and pending.watch is not None and state is not None:
            state.watches.discard(pending.watch)
        return Out()

    def _event(self, packet: Packet) -> Out:
        parts = packet.payload.split(b"\0")
        if len(parts) < 2:
            return Out()
        client_part, sep, token = parts[1].partition(b":")
        if not sep or not client_part.isdigit():
            return Out()
        client = int(client_part)
        if client not in self.clients:
            return Out()  # it went; its unwatch is on its way
        payload = parts[0] + b"\0" + token + b"\0"
        return Out(clients=[(client, Packet(Op.WATCH_EVENT, 0, 0, payload))])

    # The agent's own requests -------------------------------------------------------

    def _request(self, pending: _Pending) -> int:
        self._last_req = self._last_req % 0xFFFFFFFF + 1
        while self._last_req in self.pending:  # 4 billion later, still unanswered
            self._last_req = self._last_req % 0xFFFFFFFF + 1
        self.pending[self._last_req] = pending
        return self._last_req

    def _unwatch(self, client: int, path: bytes, token: bytes) -> Packet:
        req_id = self._request(_Pending(AGENT, 0, Op.UNWATCH))
        return Packet(Op.UNWATCH, req_id, 0, path + b"\0" + _token(client, token) + b"\0")

    def _abort(self, tx: int) -> Packet:
        return Packet(Op.TRANSACTION_END, self._request(_Pending(AGENT, 0, Op.TRANSACTION_END)),
                      tx, _ABORT)  # fmt: skip

    def reset(self) -> Packet:
        """The first request on the port: what an earlier agent left (its clients'
        watches) goes."""
        return Packet(Op.RESET_WATCHES, self._request(_Pending(AGENT, 0, Op.RESET_WATCHES)),
                      0, b"")  # fmt: skip


def _token(client: int, token: bytes) -> bytes:
    return b"%d:%s" % (client, token)


def _watch_args(payload: bytes) -> tuple[bytes, bytes]:
    parts = payload.split(b"\0")
    if len(parts) != 3 or parts[2] != b"" or not parts[0]:
        raise XenStoreError(errno.EINVAL, "a watch takes a path and a token")
    return parts[0], parts[1]


def _tx_id(payload: bytes) -> int:
    digits = payload.rstrip(b"\0")
    return int(digits) if digits.isdigit() else 0

"""The store: the committed tree, sessions (one per connection), transactions and
watches. Pure: callers get back the watch events to deliver and do the I/O.
"""

from __future__ import annotations

import errno
import itertools
from collections import Counter
from dataclasses import dataclass, field

from sflib.xenstore import names
from sflib.xenstore.perms import Access, access_of
from sflib.xenstore.tree import Change, Node, NodeMap, Quotas, Tree
from sflib.xenstore.wire import Packet, XenStoreError, watch_event


@dataclass(frozen=True)
class Watch:
    path: str  # absolute, or a special "@" path
    token: bytes
    relative: bool  # the client gave a relative path, so events carry relative paths


@dataclass
class Transaction:
    base: dict[str, Node]  # the committed nodes at start, compared by identity
    nodes: NodeMap
    changes: list[Change] = field(default_factory=list)


@dataclass
class Session:
    """What the store knows of one connection."""

    id: int
    domid: int
    watches: dict[tuple[str, bytes], Watch] = field(default_factory=dict)
    transactions: dict[int, Transaction] = field(default_factory=dict)

    @property
    def privileged(self) -> bool:
        return self.domid == 0


Event = tuple[int, Packet]  # (session id, WATCH_EVENT packet)


class Store:
    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.nodes = NodeMap.initial()
        self.sessions: dict[int, Session] = {}
        self.introduced: set[int] = set()
        self._session_ids = itertools.count(1)
        self._tx_ids = itertools.count(1)

    # Sessions -------------------------------------------------------------

    def open_session(self, domid: int) -> Session:
        session = Session(next(self._session_ids), domid)
        self.sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> None:
        """Forget its watches and discard its transactions uncommitted."""
        self.sessions.pop(session.id, None)

    def reset_watches(self, session: Session) -> None:
        session.watches.clear()
        session.transactions.clear()

    # Node operations -------------------------------------------------------

    def tree(self, session: Session, tx_id: int) -> Tree:
        """The tree as session sees it, inside transaction tx_id if non-zero."""
        if tx_id == 0:
            return Tree(self.nodes, session.domid, self.quotas)
        tx = session.transactions.get(tx_id)
        if tx is None:
            raise XenStoreError(errno.ENOENT, f"no transaction {tx_id}")
        return Tree(tx.nodes, session.domid, self.quotas)

    def finish(self, session: Session, tx_id: int, tree: Tree) -> list[Event]:
        """Account for tree's changes: fire watches now, or at commit in a transaction."""
        if tx_id:
            session.transactions[tx_id].changes.extend(tree.changes)
            return []
        return self.fire(tree.changes)

    # Transactions ----------------------------------------------------------

    def transaction_start(self, session: Session) -> int:
        if not session.privileged and len(session.transactions) >= self.quotas.transactions:
            raise XenStoreError(errno.ENOSPC, "transaction quota exceeded")
        base = dict(self.nodes.nodes)
        work = NodeMap(dict(base), Counter(self.nodes.counts), track=True)
        work.generation = self.nodes.generation
        tx_id = next(self._tx_ids)
        session.transactions[tx_id] = Transaction(base, work)
        return tx_id

    def transaction_end(self, session: Session, tx_id: int, commit: bool) -> list[Event]:
        """Commit (EAGAIN if a touched node changed meanwhile) or abort."""
        tx = session.transactions.pop(tx_id, None)
        if tx is None:
            raise XenStoreError(errno.ENOENT, f"no transaction {tx_id}")
        if not commit:
            return []
        touched = tx.nodes.touched or set()
        if any(self.nodes.nodes.get(p) is not tx.base.get(p) for p in touched):
            raise XenStoreError(errno.EAGAIN, "conflict")
        for path in touched:
            new = tx.nodes.nodes.get(path)
            if new is not tx.base.get(path):
                self.nodes.set_node(path, new)
        return self.fire(tx.changes)

    # Watches ---------------------------------------------------------------

    def watch(self, session: Session, path: str, token: bytes) -> list[Event]:
        """Add a watch; returns its initial event (Xen fires one at once)."""
        absolute = names.resolve_watch(path, session.domid)
        key = (absolute, token)
        if key in session.watches:
            raise XenStoreError(errno.EEXIST, "watch exists")
        if not session.privileged and len(session.watches) >= self.quotas.watches:
            raise XenStoreError(errno.E2BIG, "watch quota exceeded")
        watch = Watch(absolute, token, relative=not path.startswith(("/", "@")))
        session.watches[key] = watch
        return [(session.id, watch_event(self._shown(session, watch, absolute), token))]

    def unwatch(self, session: Session, path: str, token: bytes) -> None:
        key = (names.resolve_watch(path, session.domid), token)
        if session.watches.pop(key, None) is None:
            raise XenStoreError(errno.ENOENT, "no such watch")

    def fire(self, changes: list[Change]) -> list[Event]:
        events: list[Event] = []
        watching = [s for s in self.sessions.values() if s.watches]
        for change in changes:
            for session in watching:
                events.extend(self._matches(session, change))
        return events

    def fire_special(self, path: str) -> list[Event]:
        return [
            (s.id, watch_event(path, w.token))
            for s in self.sessions.values()
            for w in s.watches.values()
            if w.path == path
        ]

    def _matches(self, session: Session, change: Change) -> list[Event]:
        events = []
        for watch in session.watches.values():
            if names.is_within(change.path, watch.path):
                shown = change.path
            elif change.recursive and names.is_within(watch.path, change.path):
                shown = watch.path  # a removed ancestor removes the watched node too
            else:
                continue
            event = watch_event(self._shown(session, watch, shown), watch.token)
            events.append((session.id, event))
        if events and Access.READ not in access_of(change.perms, session.domid):
            return []  # a domain hears only of nodes it may read
        return events

    @staticmethod
    def _shown(session: Session, watch: Watch, path: str) -> str:
        return names.relative_to_domain(path, session.domid) if watch.relative else path

    # Domains ---------------------------------------------------------------

    def introduce(self, domid: int) -> list[Event]:
        self.introduced.add(domid)
        return self.fire_special("@introduceDomain")

    def release(self, domid: int) -> list[Event]:
        """Forget the domain; its sessions are the caller's to close."""
        if domid not in self.introduced:
            raise XenStoreError(errno.ENOENT, f"domain {domid} not introduced")
        self.introduced.discard(domid)
        for session in [s for s in self.sessions.values() if s.domid == domid]:
            self.close_session(session)
        return self.fire_special("@releaseDomain")

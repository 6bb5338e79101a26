"""sfmasterd's memory: hosts and tickets in SQLite, so a restarted master loses
nothing. Every change is committed before the master answers the call that made it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sflib.errors import SystemFailure

SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,      -- the host's sfld, for other sflds (HOST:PORT)
    slots INTEGER NOT NULL,     -- its clone slots
    last_seen REAL NOT NULL,    -- Unix time of its last heartbeat
    alive INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    id TEXT PRIMARY KEY,
    owner_host TEXT NOT NULL,
    owner_vm TEXT NOT NULL,
    requested INTEGER NOT NULL,
    placement TEXT NOT NULL,    -- JSON {host: clones}
    created REAL NOT NULL,
    ended REAL,                 -- NULL while the ticket holds its slots
    job TEXT                    -- the allocator's job behind it (Slurm's id), if any
);
CREATE TABLE IF NOT EXISTS families (
    number INTEGER PRIMARY KEY, -- the family network (sflib.net.identity)
    host TEXT NOT NULL,         -- where its parent runs
    vm TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class HostRecord:
    name: str
    address: str
    slots: int
    last_seen: float
    alive: bool

    def to_json(self) -> dict[str, object]:
        return {"host": self.name, "address": self.address, "slots": self.slots,
                "last_seen": self.last_seen, "alive": self.alive}  # fmt: skip


@dataclass(frozen=True)
class TicketRecord:
    id: str
    owner_host: str
    owner_vm: str
    requested: int
    placement: dict[str, int]
    created: float
    ended: float | None = None
    job: str | None = None

    @property
    def granted(self) -> int:
        return sum(self.placement.values())

    def to_json(self) -> dict[str, object]:
        return {"ticket": self.id, "owner_host": self.owner_host, "owner_vm": self.owner_vm,
                "requested": self.requested, "granted": self.granted,
                "placement": self.placement, "created": self.created,
                "ended": self.ended, "job": self.job}  # fmt: skip


class Registry:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each call
            # The master's loop makes these calls (a heartbeat is one): a commit must
            # not wait for the disk. With a write-ahead log and synchronous=NORMAL it
            # does not fsync; a commit survives the master's crash, and only the
            # machine's own crash can lose the last ones (heartbeats, mostly).
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(tickets)")}
            if "job" not in columns:  # a database from before Slurm
                self.db.execute("ALTER TABLE tickets ADD COLUMN job TEXT")
        except (OSError, sqlite3.Error) as e:
            raise SystemFailure(f"cannot open the master's database {path}: {e}") from e

    def close(self) -> None:
        self.db.close()

    # Hosts -----------------------------------------------------------------------

    def register(self, name: str, address: str, slots: int) -> None:
        self.db.execute(
            "INSERT INTO hosts VALUES (?, ?, ?, ?, 1) ON CONFLICT(name) DO UPDATE SET "
            "address = excluded.address, slots = excluded.slots, "
            "last_seen = excluded.last_seen, alive = 1",
            (name, address, slots, time.time()),
        )

    def seen(self, name: str) -> bool:
        """Record a heartbeat; False if the host is unknown or was declared dead."""
        cur = self.db.execute("UPDATE hosts SET last_seen = ? WHERE name = ? AND alive = 1",
                              (time.time(), name))  # fmt: skip
        return cur.rowcount == 1

    def declare_dead(self, name: str) -> None:
        self.db.execute("UPDATE hosts SET alive = 0 WHERE name = ?", (name,))

    def hosts(self) -> list[HostRecord]:
        rows = self.db.execute("SELECT name, address, slots, last_seen, alive FROM hosts "
                               "ORDER BY name").fetchall()  # fmt: skip
        return [HostRecord(n, a, s, t, bool(alive)) for n, a, s, t, alive in rows]

    def host(self, name: str) -> HostRecord | None:
        return next((h for h in self.hosts() if h.name == name), None)

    # Tickets ---------------------------------------------------------------------

    def add_ticket(self, ticket: TicketRecord) -> None:
        self.db.execute("INSERT INTO tickets VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                        (ticket.id, ticket.owner_host, ticket.owner_vm, ticket.requested,
                         json.dumps(ticket.placement), ticket.created, ticket.job))  # fmt: skip

    def end_ticket(self, ticket_id: str) -> bool:
        """End a live ticket; False if it was unknown or had ended already."""
        cur = self.db.execute("UPDATE tickets SET ended = ? WHERE id = ? AND ended IS NULL",
                              (time.time(), ticket_id))  # fmt: skip
        return cur.rowcount == 1

    def tickets(self, live_only: bool = False) -> list[TicketRecord]:
        query = ("SELECT id, owner_host, owner_vm, requested, placement, created, ended, job "
                 "FROM tickets")  # fmt: skip
        if live_only:
            query += " WHERE ended IS NULL"
        rows = self.db.execute(query + " ORDER BY created").fetchall()
        return [TicketRecord(i, h, v, r, json.loads(p), c, e, j)
                for i, h, v, r, p, c, e, j in rows]  # fmt: skip

    def ticket(self, ticket_id: str) -> TicketRecord | None:
        return next((t for t in self.tickets() if t.id == ticket_id), None)

    # Families ----------------------------------------------------------------------

    def families(self, host: str | None = None) -> dict[int, tuple[str, str]]:
        """{number: (host, vm)}, of one host or of all."""
        rows = self.db.execute("SELECT number, host, vm FROM families").fetchall()
        return {n: (h, v) for n, h, v in rows if host is None or h == host}

    def add_family(self, number: int, host: str, vm: str) -> None:
        self.db.execute("INSERT INTO families VALUES (?, ?, ?)", (number, host, vm))

    def keep_families(self, host: str, held: dict[int, str]) -> list[int]:
        """What a (re)registering host says it holds, {number: vm}, becomes the truth
        for it; returns the numbers it holds that another host took meanwhile."""
        known = self.families()
        for number, (owner, _) in known.items():
            if owner == host and number not in held:
                self.drop_families(host, number)
        taken = []
        for number, vm in held.items():
            if number not in known:
                self.add_family(number, host, vm)
            elif known[number][0] != host:
                taken.append(number)
        return taken

    def drop_families(self, host: str, number: int | None = None) -> int:
        """Forget a host's family number (or all of them); how many went."""
        if number is None:
            cur = self.db.execute("DELETE FROM families WHERE host = ?", (host,))
        else:
            cur = self.db.execute("DELETE FROM families WHERE host = ? AND number = ?",
                                  (host, number))  # fmt: skip
        return cur.rowcount

    def reserved(self) -> dict[str, int]:
        """Clone slots each host gives to live tickets."""
        held: dict[str, int] = {}
        for ticket in self.tickets(live_only=True):
            for host, count in ticket.placement.items():
                held[host] = held.get(host, 0) + count
        return held

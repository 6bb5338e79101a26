"""sf-cluster: the cluster as this host's sfld sees it, and as the master knows it."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from sflib.cli.app import (
    DebugOption,
    JsonOption,
    QuietOption,
    SocketOption,
    main,
    make_app,
    print_result,
    setup_logging,
)
from sflib.paths import Paths
from sflib.sfld.control import ControlClient

PROGRAM = "sf-cluster"
app = make_app("Show the SnowFlock cluster: this host's link, the hosts, the tickets.")


class _Context:
    client: ControlClient


@app.callback()
def options(
    socket: SocketOption = None,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Show the SnowFlock cluster: this host's link, the hosts, the tickets."""
    setup_logging(PROGRAM, debug, quiet)
    _Context.client = ControlClient(socket or Paths.from_env().control_socket)


def _table(columns: list[str], rows: list[list[str]]) -> None:
    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


@app.command()
def status(as_json: JsonOption = False) -> None:
    """This host's name, its address for other sflds, the master, dead hosts."""
    print_result(_Context.client.call("cluster.status"), as_json)


@app.command()
def hosts(as_json: JsonOption = False) -> None:
    """The hosts the master knows: address, slots, slots reserved, alive, last heard."""
    found: list[dict[str, Any]] = _Context.client.call("cluster.hosts")
    if as_json:
        print(json.dumps(found, indent=2))
        return
    now = time.time()
    _table(["HOST", "ADDRESS", "SLOTS", "RESERVED", "ALIVE", "HEARD"],
           [[h["host"], h["address"], str(h["slots"]), str(h["reserved"]),
             "yes" if h["alive"] else "no", f"{now - h['last_seen']:.0f} s ago"]
            for h in found])  # fmt: skip


@app.command()
def tickets(as_json: JsonOption = False) -> None:
    """The master's tickets: owner, clones granted of requested, placement, state."""
    found: list[dict[str, Any]] = _Context.client.call("cluster.tickets")
    if as_json:
        print(json.dumps(found, indent=2))
        return
    _table(["TICKET", "OWNER", "GRANTED", "PLACEMENT", "STATE"],
           [[t["ticket"], f"{t['owner_vm']}@{t['owner_host']}",
             f"{t['granted']}/{t['requested']}",
             " ".join(f"{h}:{n}" for h, n in t["placement"].items()),
             "ended" if t["ended"] else "live"] for t in found])  # fmt: skip


@app.command()
def master(as_json: JsonOption = False) -> None:
    """The master's version, address, hosts alive and live tickets."""
    print_result(_Context.client.call("cluster.master"), as_json)


if __name__ == "__main__":
    main(PROGRAM, app)

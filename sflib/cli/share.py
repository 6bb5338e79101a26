"""sf-share: clones hand results back to their parent (inside VMs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.guest import share

PROGRAM = "sf-share"
app = make_app("Clones hand results back to their parent through XenStore.")
KeyArg = Annotated[str, typer.Argument(help="A name: [A-Za-z0-9_-], at most 64.")]
TicketArg = Annotated[str, typer.Argument(help="The ticket the clones were made with.")]


@app.callback()
def options(debug: DebugOption = False, quiet: QuietOption = False) -> None:
    """Clones hand results back to their parent through XenStore."""
    setup_logging(PROGRAM, debug, quiet)


@app.command()
def put(
    key: KeyArg,
    file: Annotated[Path | None, typer.Argument(help="What to share [default: stdin].")] = None,
) -> None:
    """In a clone: share FILE (or stdin) with the parent under KEY."""
    data = file.read_bytes() if file else sys.stdin.buffer.read()
    share.put(key, data)


@app.command()
def get(
    ticket: TicketArg,
    clone_id: Annotated[int, typer.Argument(help="The clone's ID.", min=1)],
    key: KeyArg,
    file: Annotated[Path | None, typer.Argument(help="Where to write [default: stdout].")] = None,
) -> None:
    """In the parent: what clone ID of TICKET shared under KEY."""
    data = share.get(ticket, clone_id, key)
    if file:
        file.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)


@app.command("ls")
def list_keys(
    ticket: TicketArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """In the parent: each clone's shared keys, "ID KEY" per line."""
    found = share.keys(ticket)
    if as_json:
        print(json.dumps({str(k): v for k, v in found.items()}))
        return
    for clone_id, names in sorted(found.items()):
        for name in names:
            print(clone_id, name)


@app.command()
def clear(ticket: TicketArg) -> None:
    """In the parent: remove everything shared under TICKET."""
    share.clear(ticket)


if __name__ == "__main__":
    main(PROGRAM, app)

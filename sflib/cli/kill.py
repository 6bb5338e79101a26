"""sf-kill: end every clone of a ticket at once (in the parent)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.guest import api

PROGRAM = "sf-kill"
app = make_app("Kill every clone of TICKET and invalidate it.")


@app.command()
def kill(
    ticket: Annotated[str, typer.Argument(help="The ticket the clones were made with.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the ticket as JSON.")] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Kill every clone of TICKET and invalidate it; print the IDs killed."""
    setup_logging(PROGRAM, debug, quiet)
    result = api.kill(ticket)
    killed = [c["id"] for c in result["clones"].values() if c["state"] == "killed"]
    print(json.dumps(result, indent=2) if as_json else " ".join(map(str, sorted(killed))))


if __name__ == "__main__":
    main(PROGRAM, app)

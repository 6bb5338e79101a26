"""sf-join: wait for every clone of a ticket to exit (in the parent)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.exitcodes import ExitCode
from sflib.guest import api

PROGRAM = "sf-join"
app = make_app("Wait until every clone of TICKET has exited; print their statuses.")


@app.command()
def join(
    ticket: Annotated[str, typer.Argument(help="The ticket the clones were made with.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the ticket as JSON.")] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Wait until every clone of TICKET has exited; print "ID STATE STATUS" per clone.

    Exits 0 if every clone called sf-exit 0, else 1.
    """
    setup_logging(PROGRAM, debug, quiet)
    result = api.join(ticket)
    clones = sorted(result["clones"].values(), key=lambda c: c["id"])
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for c in clones:
            print(c["id"], c["state"], "-" if c["status"] is None else c["status"])
    if any(c["state"] != "exited" or c["status"] != 0 for c in clones):
        sys.exit(int(ExitCode.FAILED))


if __name__ == "__main__":
    main(PROGRAM, app)

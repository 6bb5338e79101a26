"""sf-ticket: reserve clone slots; prints the ticket (used inside a VM)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.guest import api

PROGRAM = "sf-ticket"
log = logging.getLogger(PROGRAM)
app = make_app("Reserve resources for N clones of this VM; print the ticket.")


@app.command()
def ticket(
    n: Annotated[int, typer.Argument(help="How many clones to ask for.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print ticket, granted, requested.")
    ] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Reserve resources for N clones of this VM; print the ticket."""
    setup_logging(PROGRAM, debug, quiet)
    t = api.request_ticket(n)
    if t.granted < t.requested:
        log.warning("granted %d of %d clones", t.granted, t.requested)
    data = {"ticket": t.id, "granted": t.granted, "requested": t.requested}
    print(json.dumps(data) if as_json else t.id)


if __name__ == "__main__":
    main(PROGRAM, app)

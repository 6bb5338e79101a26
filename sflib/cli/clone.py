"""sf-clone: clone this VM; prints 0 in the parent and the clone's ID in each clone."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sflib.cli.app import AvoidanceOption, DebugOption, QuietOption, main, make_app, setup_logging
from sflib.guest import api

PROGRAM = "sf-clone"
app = make_app("Clone this VM with TICKET; print 0 in the parent, the clone's ID in clones.")


@app.command()
def clone(
    ticket: Annotated[str, typer.Argument(help="A ticket from sf-ticket.")],
    from_checkpoint: Annotated[
        str | None,
        typer.Option("--from", help="Make the clones from this checkpoint (sf-checkpoint)."),
    ] = None,
    hooks_dir: Annotated[
        str | None,
        typer.Option(
            "--hooks-dir",
            envvar="SF_HOOKS_DIR",
            help="hooks.d to run in clones [default: /etc/snowflock/hooks.d].",
        ),
    ] = None,
    avoidance: AvoidanceOption = True,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"id": N}.')] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Clone this VM with TICKET; print 0 in the parent, the clone's ID in clones.

    With --from, the clones resume inside sf-checkpoint instead, and this prints 0.
    """
    setup_logging(PROGRAM, debug, quiet)
    if from_checkpoint:
        clone_id = api.create_clones(from_checkpoint, ticket)
    else:
        clone_id = api.clone(ticket, hooks_dir, avoidance)
    print(json.dumps({"id": clone_id}) if as_json else clone_id)


if __name__ == "__main__":
    main(PROGRAM, app)

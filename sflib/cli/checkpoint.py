"""sf-checkpoint: an immutable checkpoint of this VM, to clone from later."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sflib.cli.app import AvoidanceOption, DebugOption, QuietOption, main, make_app, setup_logging
from sflib.guest import api

PROGRAM = "sf-checkpoint"
app = make_app("Checkpoint this VM; print the checkpoint and 0 (or, in a clone, its ID).")


@app.command()
def checkpoint(
    hooks_dir: Annotated[
        str | None,
        typer.Option(
            "--hooks-dir",
            envvar="SF_HOOKS_DIR",
            help="hooks.d to run in clones [default: /etc/snowflock/hooks.d].",
        ),
    ] = None,
    avoidance: AvoidanceOption = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print checkpoint and id.")] = False,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Checkpoint this VM; print "CHECKPOINT 0". Clones made from it later with
    sf-clone --from resume here and print "CHECKPOINT ID"."""
    setup_logging(PROGRAM, debug, quiet)
    name, clone_id = api.checkpoint_parent(hooks_dir, avoidance)
    print(json.dumps({"checkpoint": name, "id": clone_id}) if as_json else f"{name} {clone_id}")


if __name__ == "__main__":
    main(PROGRAM, app)

"""sf-exit: end this clone with a status (inside a clone only)."""

from __future__ import annotations

from typing import Annotated

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.guest import api

PROGRAM = "sf-exit"
app = make_app("End this clone; its parent's sf-join reports STATUS.")


@app.command()
def exit_clone(
    status: Annotated[int, typer.Argument(help="Exit status, 0-255.", min=0, max=255)] = 0,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """End this clone; its parent's sf-join reports STATUS. Does not return."""
    setup_logging(PROGRAM, debug, quiet)
    api.exit_clone(status)


if __name__ == "__main__":
    main(PROGRAM, app)

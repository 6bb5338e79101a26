"""sf-xenstored: the XenStore-protocol server alone, in the foreground.

sfld embeds the same server; this executable is for tests, benchmarks and for
poking at the protocol with xenstore-utils.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from sflib.cli.app import DebugOption, QuietOption, main, make_app, notify_ready, setup_logging
from sflib.errors import SystemFailure, UsageError
from sflib.paths import Paths
from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.tree import Quotas

PROGRAM = "sf-xenstored"
log = logging.getLogger(PROGRAM)
DEFAULT_QUOTAS = Quotas()

app = make_app("Run a XenStore-protocol server on a Unix socket, in the foreground.")


@app.command()
def serve(
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            "-s",
            help="Unix socket to listen on [default: $SF_ROOTDIR/run/snowflock/xenstored.sock].",
            dir_okay=False,
        ),
    ] = None,
    ready_fd: Annotated[
        int | None,
        typer.Option("--ready-fd", help="Write a newline to this descriptor once listening."),
    ] = None,
    quota_nodes: Annotated[
        int, typer.Option(help="Nodes a domain may own.", min=1)
    ] = DEFAULT_QUOTAS.nodes,
    quota_value_size: Annotated[
        int, typer.Option(help="Largest value a domain may write, in bytes.", min=1)
    ] = DEFAULT_QUOTAS.value_size,
    quota_watches: Annotated[
        int, typer.Option(help="Watches per domain connection.", min=1)
    ] = DEFAULT_QUOTAS.watches,
    quota_transactions: Annotated[
        int, typer.Option(help="Open transactions per domain connection.", min=1)
    ] = DEFAULT_QUOTAS.transactions,
    quota_outstanding: Annotated[
        int, typer.Option(help="Unanswered requests per domain connection.", min=1)
    ] = DEFAULT_QUOTAS.outstanding,
    debug: DebugOption = False,
    quiet: QuietOption = False,
) -> None:
    """Run a XenStore-protocol server on a Unix socket, in the foreground."""
    setup_logging(PROGRAM, debug, quiet)
    path = socket or Paths.from_env().xenstored_socket
    quotas = Quotas(
        nodes=quota_nodes,
        value_size=quota_value_size,
        watches=quota_watches,
        transactions=quota_transactions,
        outstanding=quota_outstanding,
    )
    asyncio.run(_serve(path, quotas, ready_fd))


async def _serve(path: Path, quotas: Quotas, ready_fd: int | None) -> None:
    server = XenStoreServer(quotas)
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory")
    try:
        await server.listen_unix(path)
    except OSError as e:
        raise SystemFailure(f"cannot listen on {path}: {e.strerror}") from e
    log.info("listening on %s (quotas: %s)", path, quotas)
    notify_ready(ready_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.close()
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    main(PROGRAM, app)

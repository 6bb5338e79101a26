"""sf-memserver: run a memory server by hand, and read a server's counters.

sfld starts its host's memory server itself when a clone needs one; this tool is
for admins, tests and benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from sflib.address import split_address
from sflib.cli.app import DebugOption, QuietOption, main, make_app, setup_logging
from sflib.errors import SystemFailure, UsageError
from sflib.memory.client import MemoryClient
from sflib.memory.server import MEMSERVER, ServerSpec, memserver_argv

PROGRAM = "sf-memserver"
app = make_app("Serve frozen memory images to memtaps, and read a server's counters.")
SecretOption = Annotated[
    Path | None, typer.Option("--secret-file", help="The shared secret.", dir_okay=False)
]


@app.callback()
def options(debug: DebugOption = False, quiet: QuietOption = False) -> None:
    """Serve frozen memory images to memtaps, and read a server's counters."""
    setup_logging(PROGRAM, debug, quiet)


@app.command()
def serve(
    images: Annotated[
        Path, typer.Option("--dir", help="The folder of images to serve.", file_okay=False)
    ],
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any free).")
    ] = "127.0.0.1:0",
    secret_file: SecretOption = None,
    ready_fd: Annotated[
        int | None, typer.Option("--ready-fd", help="Write the port and a newline to FD.")
    ] = None,
) -> None:
    """Serve the images in a folder, in the foreground until SIGTERM."""
    split_address(listen)
    argv = memserver_argv(ServerSpec(images, listen, secret_file), ready_fd)
    try:
        os.execv(MEMSERVER, argv)
    except OSError as e:
        raise SystemFailure(f"cannot run {MEMSERVER}: {e.strerror}", hint="run make c") from e


@app.command()
def stats(
    server: Annotated[str, typer.Argument(help="The memory server, HOST:PORT.")],
    secret_file: SecretOption = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.", min=0.1)] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Print a memory server's counters: clients, requests, pages sent and skipped."""
    host, port = split_address(server)
    try:
        secret = secret_file.read_bytes().removesuffix(b"\n") if secret_file else b""
    except OSError as e:
        raise UsageError(f"cannot read {secret_file}: {e.strerror}") from e
    with MemoryClient.connect(host, port, secret, timeout) as client:
        counters = client.stats()
    per_client = counters.pop("per_client", [])
    if as_json:
        print(json.dumps({**counters, "per_client": per_client}, indent=2))
        return
    print("\n".join(f"{k}: {v}" for k, v in counters.items()))
    for c in per_client:
        print(f"client {c.get('peer')}: " + ", ".join(f"{k}={v}" for k, v in c.items()
                                                    if k != "peer"))  # fmt: skip


if __name__ == "__main__":
    main(PROGRAM, app)

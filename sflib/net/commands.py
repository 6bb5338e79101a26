"""How the network code runs ip, bridge, nft, tc and sysctl from sfld's event loop:
sflib.run.run in a worker thread, so the loop goes on meanwhile.

Not run.run_async: asyncio forks in the loop's thread and waits there until the
child has exec'd, which on a busy machine takes from milliseconds to hundreds of
them (a family's first member on a host, under load: loop held up to 210 ms,
against 25 ms from a thread).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Sequence

from sflib import run as runner


async def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float = 30.0,
              input: str | None = None, check: bool = True) -> runner.Completed:  # fmt: skip
    """sflib.run.run off the loop. Raises as it does (CommandFailed, OperationTimeout,
    SystemFailure); the command runs to its end even if the caller is cancelled."""
    return await asyncio.to_thread(runner.run, argv, timeout=timeout, input=input, check=check)


async def together(*steps: Awaitable[object]) -> None:
    """Run independent steps at once and wait for all of them, whatever happens;
    then raise the first one's error, if any (so that undoing them finds them done)."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result

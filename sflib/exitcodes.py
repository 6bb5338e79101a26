"""The exit codes of every SnowFlock executable, in one table.

Each man page prints this table in EXIT STATUS (generated from here) and the bats
tests check the codes. s6's convention for the high numbers.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the operation failed, or the answer is "no"
    USAGE = 2  # bad command line or bad input
    NOT_FOUND = 3  # no such ticket, VM, checkpoint, key
    WRONG_STATE = 4  # e.g. sf-exit in the parent, a clone already in flight
    UNREACHABLE = 5  # a daemon cannot be reached
    TIMEOUT = 99
    SYSTEM = 111  # a system call or a subprocess failed


DESCRIPTIONS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "the operation failed, or the answer is no",
    ExitCode.USAGE: "usage error: bad option, argument or input",
    ExitCode.NOT_FOUND: "no such ticket, VM, checkpoint or key",
    ExitCode.WRONG_STATE: "the operation is not allowed in the current state",
    ExitCode.UNREACHABLE: "a SnowFlock daemon could not be reached",
    ExitCode.TIMEOUT: "timed out",
    ExitCode.SYSTEM: "a system call or a subprocess failed",
}


def markdown_table() -> str:
    """The table as man-page markdown (a definition list)."""
    return "\n".join(f"**{int(code)}**\n:   {DESCRIPTIONS[code]}\n" for code in ExitCode)

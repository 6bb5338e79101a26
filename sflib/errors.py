"""One exception root for SnowFlock. Each subclass carries its exit code.

The library raises these; only an executable's main() turns them into a line on
stderr and an exit status (sflib.cli.app). Errors crossing daemons travel as
(type name, message, hint) and are raised again by from_wire().
"""

from __future__ import annotations

from sflib.exitcodes import ExitCode


class SnowFlockError(Exception):
    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_wire(self) -> dict[str, str | None]:
        return {"type": type(self).__name__, "message": self.message, "hint": self.hint}

    @staticmethod
    def from_wire(data: dict[str, str | None]) -> SnowFlockError:
        cls = _BY_NAME.get(str(data.get("type")), SnowFlockError)
        return cls(str(data.get("message")), hint=data.get("hint"))


class UsageError(SnowFlockError):
    exit_code = ExitCode.USAGE


class NotFoundError(SnowFlockError):
    exit_code = ExitCode.NOT_FOUND


class WrongStateError(SnowFlockError):
    exit_code = ExitCode.WRONG_STATE


class UnreachableError(SnowFlockError):
    exit_code = ExitCode.UNREACHABLE


class OperationTimeout(SnowFlockError):
    exit_code = ExitCode.TIMEOUT


class SystemFailure(SnowFlockError):
    exit_code = ExitCode.SYSTEM


class AuthError(SnowFlockError):
    """A daemon's peer does not know the cluster's shared secret."""


class CommandFailed(SystemFailure):
    """A subprocess exited non-zero; carries its argv, status, stderr and stdout."""

    def __init__(self, argv: list[str], returncode: int, stderr: str, stdout: str = "") -> None:
        what = f"signal {-returncode}" if returncode < 0 else f"status {returncode}"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{argv[0]} failed with {what}: {last}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout


_BY_NAME: dict[str, type[SnowFlockError]] = {
    cls.__name__: cls
    for cls in (
        SnowFlockError,
        UsageError,
        NotFoundError,
        WrongStateError,
        UnreachableError,
        OperationTimeout,
        SystemFailure,
        AuthError,
    )
}

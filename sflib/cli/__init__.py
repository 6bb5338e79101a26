"""One module per executable; bin/<name> runs sflib.cli.<module> (see module_of)."""

PROGRAMS = ["sf-image", "sf-vm", "sf-xenstored", "sfld"]


def module_of(program: str) -> str:
    """The module implementing an executable: sf-foo-bar -> sflib.cli.foo_bar."""
    stem = program.removeprefix("sf-").replace("-", "_")
    return f"sflib.cli.{stem}"

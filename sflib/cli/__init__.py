"""One module per executable; bin/<name> runs sflib.cli.<module> (see module_of)."""

PROGRAMS = [
    "sf-checkpoint", "sf-clone", "sf-cluster", "sf-exit", "sf-guestd", "sf-image", "sf-join",
    "sf-kill", "sf-memserver", "sf-memtap", "sf-share", "sf-ticket", "sf-vm", "sf-xenstored",
    "sfld", "sfmasterd", "sf-testcluster",
]  # fmt: skip

# The guest's tools: a guest image ships them in C (build/sf-tools, c/sf-tools.c),
# with the same command lines as their modules here, which are their spec.
GUEST_TOOLS = ["sf-checkpoint", "sf-clone", "sf-exit", "sf-join", "sf-kill", "sf-share",
               "sf-ticket"]  # fmt: skip


def module_of(program: str) -> str:
    """The module implementing an executable: sf-foo-bar -> sflib.cli.foo_bar."""
    stem = program.removeprefix("sf-").replace("-", "_")
    return f"sflib.cli.{stem}"

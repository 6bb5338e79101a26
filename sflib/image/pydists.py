"""Our pure-Python dependencies for the guest, copied from the running environment.

The guest runs Debian's Python 3.11 and so does the host's .venv, so the installed
files of each distribution (and of what it requires, extras aside) copy over as is.
"""

from __future__ import annotations

import logging
import re
import shutil
from importlib import metadata
from pathlib import Path

from sflib.errors import NotFoundError, UsageError

log = logging.getLogger(__name__)

GUEST_DISTRIBUTIONS = ("pyxs", "typer", "click", "rich")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> tuple[str, bool] | None:
    """("name", has_marker) of a Requires-Dist line, None if only for an extra."""
    spec, _, marker = requirement.partition(";")
    if "extra" in marker:
        return None
    match = _NAME.match(spec)
    if match is None:
        raise UsageError(f"cannot parse requirement {requirement!r}")
    return match.group(1), bool(marker.strip())


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: tuple[str, ...] = GUEST_DISTRIBUTIONS) -> list[metadata.Distribution]:
    """The installed distributions named and those they require, sorted by name.

    A requirement under an environment marker that is not installed is skipped (it
    was not needed here); any other missing one raises NotFoundError.
    """
    found: dict[str, metadata.Distribution] = {}
    todo = [(n, False) for n in names]
    while todo:
        name, optional = todo.pop()
        if _normal(name) in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if optional:
                log.debug("skipping %s: not installed, only under a marker", name)
                continue
            raise NotFoundError(f"Python package {name} is not installed") from None
        found[_normal(name)] = dist
        todo.extend(r for r in map(requirement_name, dist.requires or []) if r is not None)
    return [found[k] for k in sorted(found)]


def versions(dists: list[metadata.Distribution]) -> list[str]:
    return [f"{d.metadata['Name']}=={d.version}" for d in dists]


def copy_distribution(dist: metadata.Distribution, site: Path) -> int:
    """Copy dist's files under site (a dist-packages dir); returns the count.

    Compiled caches and files outside site-packages (console scripts) are left out.
    Raises NotFoundError if the distribution lists no files.
    """
    files = dist.files
    if files is None:
        raise NotFoundError(f"{dist.metadata['Name']} has no RECORD of its files")
    count = 0
    for entry in files:
        rel = Path(str(entry))
        if rel.parts[0] == ".." or "__pycache__" in rel.parts or rel.suffix == ".pyc":
            continue
        source = Path(str(dist.locate_file(entry)))
        if not source.is_file():
            continue
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, site / rel)
        count += 1
    return count

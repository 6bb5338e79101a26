"""Debian packages: resolve dependencies, find candidate versions, download, unpack.

Only apt's ordinary clients (apt-cache, apt-get download, dpkg-deb) through sflib.run,
so the host's apt sources and proxy settings apply. No root needed.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sflib.errors import CommandFailed, NotFoundError
from sflib.run import run

log = logging.getLogger(__name__)

KERNEL_META = "linux-image-amd64"
# The guest's userland: busybox for the shell and tools, Python 3.11 and its stdlib.
BASE_PACKAGES = ("busybox-static", "python3.11-minimal", "libpython3.11-stdlib")
# Dependencies that only serve dpkg's maintainer scripts or an init system; a guest
# that never runs dpkg does without them (perl comes in through mailcap, for one).
SKIPPED = (
    "dpkg",
    "debconf",
    "install-info",
    "tar",
    "perl",
    "perl-base",
    "perl-modules-*",
    "libperl5*",
    "mailcap",
    "mime-support",
    "sysvinit-utils",
    "lsb-base",
    "init-system-helpers",
    "usrmerge",
    "adduser",
)
DEPENDS_FLAGS = (
    "--recurse",
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
)
UPDATE_HINT = "is the name right? run apt-get update if the package lists are missing"
DOWNLOAD_BATCH = 8  # packages per apt-get call: progress steps without a call each


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str

    @property
    def deb_name(self) -> str:
        """The file name apt-get download gives it (an epoch's colon as %3a)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def parse_depends_output(text: str) -> list[str]:
    """Real package names from apt-cache depends --recurse (virtual ones are <name>)."""
    names = {
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line[0].isspace() and not line.startswith("<")
    }
    return sorted(names)


def is_skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SKIPPED)


def parse_control(text: str) -> list[dict[str, str]]:
    """Stanzas of a Debian control-format text (continuation lines dropped)."""
    stanzas: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def _apt_cache(args: Sequence[str]) -> str:
    try:
        return run(["apt-cache", *args], timeout=120).stdout
    except CommandFailed as e:
        raise NotFoundError(f"apt-cache {args[0]}: {e.stderr.strip()}", hint=UPDATE_HINT) from e


def resolve(names: Iterable[str]) -> list[str]:
    """names and everything they depend on (not recommends), less SKIPPED.

    Raises NotFoundError for an unknown package.
    """
    wanted = sorted(set(names))
    if not wanted:
        return []
    found = parse_depends_output(_apt_cache(["depends", *DEPENDS_FLAGS, *wanted]))
    missing = set(wanted) - set(found)
    if missing:
        raise NotFoundError(f"no such package: {', '.join(sorted(missing))}", hint=UPDATE_HINT)
    return [n for n in found if n in wanted or not is_skipped(n)]


def kernel_package() -> str:
    """The versioned package linux-image-amd64 points to. Raises NotFoundError."""
    text = _apt_cache(["depends", KERNEL_META])
    for line in text.splitlines():
        kind, _, name = line.strip().partition(": ")
        if kind == "Depends" and name.startswith("linux-image-"):
            return name
    raise NotFoundError(f"{KERNEL_META} depends on no linux-image package", hint=UPDATE_HINT)


def candidates(names: Iterable[str]) -> list[Package]:
    """The version apt would install of each name. Raises NotFoundError."""
    wanted = sorted(set(names))
    stanzas = parse_control(_apt_cache(["show", "--no-all-versions", *wanted]))
    found = {s["Package"]: Package(s["Package"], s["Version"], s["Architecture"]) for s in stanzas}
    missing = set(wanted) - set(found)
    if missing:
        raise NotFoundError(f"no candidate version of {', '.join(sorted(missing))}")
    return [found[n] for n in wanted]


def download(
    packages: Sequence[Package], cache: Path, on_done: Callable[[int], None] | None = None
) -> dict[str, Path]:
    """Each package's .deb in cache, downloading the missing ones. Raises CommandFailed."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not (cache / p.deb_name).is_file()]
    if on_done is not None:
        on_done(len(packages) - len(missing))
    for start in range(0, len(missing), DOWNLOAD_BATCH):
        batch = missing[start : start + DOWNLOAD_BATCH]
        log.debug("downloading %s", " ".join(p.name for p in batch))
        run(
            ["apt-get", "download", *(f"{p.name}={p.version}" for p in batch)],
            cwd=cache,
            timeout=900,
        )
        if on_done is not None:
            on_done(len(batch))
    debs = {p.name: cache / p.deb_name for p in packages}
    for name, deb in debs.items():
        if not deb.is_file():
            raise NotFoundError(f"apt-get download left no {deb.name} for {name}")
    return debs


def unpack(deb: Path, dest: Path) -> None:
    """Extract a .deb's files into dest (no maintainer scripts run). Raises CommandFailed."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest], timeout=600)

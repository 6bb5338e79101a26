"""What SnowFlock puts into a guest, and nothing of the host: the agent (sf-guestd),
the Python API (import snowflock) with sflib.guest, the guest tools and libsnowflock
in C, hooks.d and a systemd unit. The guest image gets it (sflib.image.build), and
so does any other distribution's VM from the package (`sf-image guest-package`, a
tarball to unpack at /).

The guest's part of sflib is GUEST_SFLIB: sflib.guest and the few modules it and
sf-guestd's command line import. tests/unit/test_guestpkg.py checks that it
imports with nothing else of sflib there, and that no host part is in it.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from sflib.errors import NotFoundError
from sflib.image import rootfs
from sflib.paths import BUILD_DIR

GUEST_SFLIB = (
    "__init__.py", "errors.py", "exitcodes.py", "log.py", "paths.py", "run.py", "settings.py",
    "cli/__init__.py", "cli/app.py", "cli/guestd.py", "cli/launcher.sh",
    "guest", "xenstore/__init__.py", "xenstore/wire.py",
)  # fmt: skip
GUEST_PROGRAMS = ("sf-guestd",)  # in Python; the tools are in C (rootfs.add_c_api)
SYSTEMD_UNIT = "lib/systemd/system/sf-guestd.service"
REQUIREMENTS = "usr/share/snowflock/requirements.txt"  # what the Python parts import
PYTHON_REQUIREMENTS = ("pyxs", "typer")  # the package's requirements.txt


def default_out() -> Path:
    return BUILD_DIR / "snowflock-guest.tar.gz"


def copy_sflib(source: Path, dest: Path) -> None:
    """The guest's part of the sflib package at source into dest (a package folder)."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in GUEST_SFLIB:
        src, out = source / rel, dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, out, ignore=skip)
        else:
            shutil.copy2(src, out)


def add_python(root: Path, source: Path, python_api: Path) -> None:
    """sflib's guest part and the snowflock module in dist-packages; sf-guestd in
    /usr/bin (via launcher.sh)."""
    packages = root / rootfs.DIST_PACKAGES
    copy_sflib(source, packages / "sflib")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(python_api, packages / "snowflock", ignore=skip)
    launcher = f"/{rootfs.DIST_PACKAGES}/sflib/cli/launcher.sh"
    for program in GUEST_PROGRAMS:
        link = root / "usr/bin" / program
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(launcher)


def add_all(root: Path, source: Path, python_api: Path, build: Path, c_sources: Path,
            hooks: Path) -> None:  # fmt: skip
    """Everything of the guest side into root. Raises NotFoundError (run make c)."""
    add_python(root, source, python_api)
    add_rest(root, source, build, c_sources, hooks)


def add_rest(root: Path, source: Path, build: Path, c_sources: Path, hooks: Path) -> None:
    """All but the Python parts (the image copies those before its Python
    dependencies, add_all at once): the C API and tools, hooks.d, the systemd unit
    and the Python requirements. Raises NotFoundError (run make c)."""
    rootfs.add_c_api(root, build, c_sources)
    rootfs.add_hooks(root, hooks)
    unit = root / SYSTEMD_UNIT
    unit.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "guest/sf-guestd.service", unit)
    requirements = root / REQUIREMENTS
    requirements.parent.mkdir(parents=True, exist_ok=True)
    requirements.write_text("".join(f"{name}\n" for name in PYTHON_REQUIREMENTS))


def write_package(out: Path, source: Path, python_api: Path, build: Path, c_sources: Path,
                  hooks: Path) -> list[str]:  # fmt: skip
    """The guest side as a .tar.gz to unpack at / (owned by root, paths relative);
    returns its members. Raises NotFoundError."""
    if not hooks.is_dir():
        raise NotFoundError(f"{hooks}: no such hooks directory")
    with tempfile.TemporaryDirectory(prefix="sf-guestpkg-") as tmp:
        root = Path(tmp)
        add_all(root, source, python_api, build, c_sources, hooks)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(root.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False,
                        filter=_as_root)  # fmt: skip
            members = tar.getnames()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(out)  # never half a package at out
    return members


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info

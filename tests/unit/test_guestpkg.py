"""The guest side, packaged (sflib.image.guestpkg, `sf-image guest-package`): what it
holds, and that its Python part imports with no host part of sflib beside it."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from sflib.cli import GUEST_TOOLS
from sflib.image import rootfs

ROOT = Path(__file__).resolve().parents[2]
GUEST_MODULES = ("snowflock", "sflib.guest.agent", "sflib.guest.api", "sflib.guest.bus",
                 "sflib.guest.freepages", "sflib.guest.hooks", "sflib.guest.layout",
                 "sflib.guest.mux", "sflib.guest.net", "sflib.guest.ready",
                 "sflib.guest.share", "sflib.cli.guestd")  # fmt: skip
HOST_MODULES = ("sflib.sfld", "sflib.fork", "sflib.cluster", "sflib.net", "sflib.vm",
                "sflib.image", "sflib.memory", "sflib.xenstore.server",
                "sflib.cli.sfld", "sflib.cli.clone")  # fmt: skip


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    targets = ["build/sf-tools", "build/libsnowflock.so.0", "build/libsnowflock.a"]
    made = subprocess.run(["make", "-C", str(ROOT), *targets], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    out = tmp_path_factory.mktemp("pkg") / "guest.tar.gz"
    done = subprocess.run([str(ROOT / "bin/sf-image"), "guest-package", "--json", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["package"] == str(out)
    return out


def test_it_holds_the_agent_the_apis_the_tools_and_hooks(package: Path) -> None:
    with tarfile.open(package) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for path in ("usr/bin/sf-guestd", "lib/systemd/system/sf-guestd.service",
                 "usr/lib/python3/dist-packages/snowflock/__init__.py",
                 "usr/lib/snowflock/sf-tools", "usr/include/snowflock.h",
                 "usr/include/snowflock.hpp", "usr/lib/x86_64-linux-gnu/libsnowflock.so.0",
                 "usr/lib/x86_64-linux-gnu/libsnowflock.a",
                 "etc/snowflock/hooks.d/clone-post.d/10-network",
                 "usr/share/snowflock/requirements.txt"):  # fmt: skip
        assert path in members, path
    for tool in GUEST_TOOLS:
        assert members[f"usr/bin/{tool}"].linkname == f"/{rootfs.GUEST_C_TOOLS}"
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert not [name for name in members if name.startswith("/") or ".." in name]
    sflib = "usr/lib/python3/dist-packages/sflib/"
    assert not [n for n in members if n.startswith(sflib) and n.endswith(".pyc")]
    host = [n for n in members if n.startswith((sflib + "sfld", sflib + "fork", sflib + "net/",
                                                sflib + "cluster", sflib + "vm/"))]  # fmt: skip
    assert host == []


def test_its_python_imports_alone(package: Path, tmp_path: Path) -> None:
    """In a Python that sees the package's dist-packages and the third-party
    libraries only (no site processing: the checkout's editable install stays out)."""
    with tarfile.open(package) as tar:
        tar.extractall(tmp_path)  # our own tarball (3.11.2 has no filter=)
    paths = [str(tmp_path / rootfs.DIST_PACKAGES), sysconfig.get_paths()["purelib"]]
    probe = f"""
import importlib, sys
sys.path[:0] = {paths!r}
for name in {GUEST_MODULES!r}:
    importlib.import_module(name)
assert all(m.__file__.startswith({str(tmp_path)!r}) for n, m in sys.modules.items()
           if n.split(".")[0] in ("sflib", "snowflock")), "a module from elsewhere"
for name in {HOST_MODULES!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"host module {{name}} is in the package")
print("OK")
"""
    got = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert (got.returncode, got.stdout) == (0, "OK\n"), got.stderr


def test_missing_c_parts_exit_3_with_a_hint(tmp_path: Path) -> None:
    """No make c: the C parts are missing, and the package says so."""
    from sflib.errors import NotFoundError
    from sflib.image import guestpkg

    with pytest.raises(NotFoundError, match="not built") as caught:
        guestpkg.write_package(tmp_path / "p.tar.gz", ROOT / "sflib", ROOT / "snowflock",
                               tmp_path / "empty-build", ROOT / "c", ROOT / "hooks.d")  # fmt: skip
    assert caught.value.hint == "run make c"
    assert not (tmp_path / "p.tar.gz").exists()

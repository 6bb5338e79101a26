"""The inputs digest (what makes a rebuild a no-op) and the guest init's syntax."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from sflib.image import build as image
from sflib.image.packages import Package
from sflib.image.rootfs import INIT_SCRIPT, plain_name

PKGS = [Package("busybox-static", "1:1.35", "amd64")]


def opts(tmp_path: Path, **kw: object) -> image.Options:
    hooks = tmp_path / "hooks.d"
    hooks.mkdir(exist_ok=True)
    base: dict[str, object] = {
        "out": tmp_path / "out",
        "cache": tmp_path / "cache",
        "hooks": hooks,
        "compression": "zstd",
    }
    return image.Options(**{**base, **kw})  # type: ignore[arg-type]


def test_digest_is_stable_and_sees_every_input(tmp_path: Path) -> None:
    o = opts(tmp_path)
    first = image.input_digest(o, PKGS, ["pyxs==0.4.1"])
    assert image.input_digest(o, PKGS, ["pyxs==0.4.1"]) == first
    assert image.input_digest(o, PKGS, ["pyxs==0.4.2"]) != first
    newer = [Package("busybox-static", "1:1.36", "amd64")]
    assert image.input_digest(o, newer, ["pyxs==0.4.1"]) != first
    assert image.input_digest(opts(tmp_path, include=("povray",)), PKGS, []) != (
        image.input_digest(o, PKGS, [])
    )
    assert image.input_digest(opts(tmp_path, compression="gzip"), PKGS, []) != (
        image.input_digest(o, PKGS, [])
    )


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    image.tree_digest(h, root)
    return h.hexdigest()


def test_tree_digest_sees_content_names_modes_and_empty_dirs(tmp_path: Path) -> None:
    (tmp_path / "hook").write_text("#!/bin/sh\n")
    before = tree_digest(tmp_path)
    (tmp_path / "hook").chmod(0o755)
    after_chmod = tree_digest(tmp_path)
    assert after_chmod != before
    (tmp_path / "clone-post.d").mkdir()
    assert tree_digest(tmp_path) != after_chmod  # an empty folder counts


def test_tree_digest_ignores_what_python_compiles(tmp_path: Path) -> None:
    """Running the sources (tests, sf-image itself) leaves bytecode beside them; the
    next build must still be a no-op."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/mod.py").write_text("X = 1\n")
    before = tree_digest(tmp_path)
    for folder in (tmp_path, tmp_path / "pkg"):
        (folder / "__pycache__").mkdir()
        (folder / "__pycache__/mod.cpython-311.pyc").write_bytes(b"bytecode")
    (tmp_path / "pkg/stray.pyc").write_bytes(b"bytecode")  # Python 2's place for it
    assert tree_digest(tmp_path) == before
    (tmp_path / "pkg/mod.py").write_text("X = 2\n")
    assert tree_digest(tmp_path) != before  # the sources still count


def test_manifest_unreadable_is_empty(tmp_path: Path) -> None:
    assert image.read_manifest(tmp_path) == {}
    (tmp_path / image.MANIFEST_FILE).write_text("[1, 2]")
    assert image.read_manifest(tmp_path) == {}


def test_plain_module_name() -> None:
    assert plain_name("kernel/a/b.ko.xz") == "kernel/a/b.ko"
    assert plain_name("kernel/a/b.ko") == "kernel/a/b.ko"


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox is not installed")
def test_guest_init_parses_with_busybox_sh() -> None:
    subprocess.run(["busybox", "sh", "-n", str(INIT_SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_guest_init_passes_shellcheck() -> None:
    subprocess.run(["shellcheck", "-s", "sh", str(INIT_SCRIPT)], check=True)

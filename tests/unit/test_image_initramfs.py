"""The newc cpio writer, checked against the cpio program and by parsing its output."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sflib.image.initramfs import CpioWriter, compress, count_entries


def parse(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, body, rdev) of each entry, trailer included."""
    entries, pos = [], 0
    while pos < len(data):
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        body_at = name_at + namesize + (-(110 + namesize) % 4)
        body = data[body_at : body_at + filesize]
        entries.append((name, fields[1], body, (fields[9], fields[10])))
        pos = body_at + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
    return entries


def test_entries_are_aligned_and_typed() -> None:
    out = io.BytesIO()
    w = CpioWriter(out)
    w.add_dir("dev")
    w.add_char_device("dev/console", 5, 1)
    w.add_file("/init", b"#!/bin/sh\n", 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.close()
    entries = parse(out.getvalue())
    assert [e[0] for e in entries] == ["dev", "dev/console", "init", "bin/sh", "TRAILER!!!"]
    assert stat.S_ISCHR(entries[1][1]) and entries[1][3] == (5, 1)
    assert entries[2][1] == stat.S_IFREG | 0o755 and entries[2][2] == b"#!/bin/sh\n"
    assert stat.S_ISLNK(entries[3][1]) and entries[3][2] == b"busybox"
    assert len(out.getvalue()) % 4 == 0


def make_tree(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"x" * 5)
    (root / "usr/bin/tool").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    (root / "empty").mkdir()


def test_add_tree_puts_parents_first(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    out = io.BytesIO()
    w = CpioWriter(out)
    w.add_tree(tmp_path / "t")
    w.close()
    names = [e[0] for e in parse(out.getvalue())]
    assert names == ["bin", "empty", "usr", "usr/bin", "usr/bin/tool", "TRAILER!!!"]
    assert count_entries(tmp_path / "t") == 5


def test_add_path_rejects_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    w = CpioWriter(io.BytesIO())
    with pytest.raises(Exception, match="cannot pack"):
        w.add_path("fifo", tmp_path / "fifo")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio program is not installed")
def test_cpio_program_extracts_it(tmp_path: Path) -> None:
    make_tree(tmp_path / "t")
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f:
        w = CpioWriter(f)
        w.add_tree(tmp_path / "t")
        w.close()
    (tmp_path / "x").mkdir()
    with archive.open("rb") as f:
        subprocess.run(["cpio", "-id", "--quiet"], stdin=f, cwd=tmp_path / "x", check=True)
    assert (tmp_path / "x/usr/bin/tool").read_bytes() == b"xxxxx"
    assert os.readlink(tmp_path / "x/bin") == "usr/bin"


def test_gzip_compression_is_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"data" * 100)
    compress(src, tmp_path / "1.gz", "gzip")
    compress(src, tmp_path / "2.gz", "gzip")
    assert (tmp_path / "1.gz").read_bytes() == (tmp_path / "2.gz").read_bytes()
    assert gzip.decompress((tmp_path / "1.gz").read_bytes()) == b"data" * 100
    with pytest.raises(Exception, match="unknown compression"):
        compress(src, tmp_path / "3", "lz4")


def test_overlay_creates_every_folder_of_a_deep_file(tmp_path: Path) -> None:
    from sflib.image.overlay import overlay

    base = tmp_path / "base"
    base.mkdir()
    for name, data in (("vmlinuz", b"k"), ("manifest.json", b"{}"), ("initrd.img", b"BASE")):
        (base / name).write_bytes(data)
    out = overlay(
        base, tmp_path / "out", {"/etc/snowflock/hooks.d/x.d/50-y": (b"#!/bin/sh\n", 0o755)}
    )
    data = (out / "initrd.img").read_bytes()
    assert data.endswith(b"BASE")
    entries = parse(data[: -len(b"BASE")])
    names = [name for name, *_ in entries]
    expected = ["etc", "etc/snowflock", "etc/snowflock/hooks.d", "etc/snowflock/hooks.d/x.d",
                "etc/snowflock/hooks.d/x.d/50-y"]  # fmt: skip
    assert names[: len(expected)] == expected  # the kernel makes no missing parent

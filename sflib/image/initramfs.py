"""Pack a directory tree into a newc cpio archive, then compress it.

A pure-Python writer: no root needed for device nodes (/dev/console must exist before
the guest mounts devtmpfs, or init starts with no stdio), every owner is root and every
mtime fixed, so the same tree gives the same archive.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from sflib.errors import UsageError
from sflib.run import run

TRAILER = "TRAILER!!!"
COMPRESSIONS = ("zstd", "gzip")


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Writes newc ("070701") entries to a binary stream; close() adds the trailer."""

    def __init__(self, out: BinaryIO, mtime: int = 0) -> None:
        self.out = out
        self.mtime = mtime
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.lstrip("/").encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, self.mtime, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded + _pad(len(header) + len(encoded)))
        self.out.write(data + _pad(len(data)))

    def add_dir(self, name: str, perms: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perms)

    def add_file(self, name: str, data: bytes, perms: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perms, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, name: str, major: int, minor: int, perms: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perms, rdev=(major, minor))

    def add_path(self, name: str, path: Path) -> None:
        """Add one file, directory or symlink from the host, keeping its permissions.

        Raises UsageError for any other kind of file (sockets, devices, fifos).
        """
        st = path.lstat()
        perms = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            self.add_dir(name, perms)
        elif stat.S_ISLNK(st.st_mode):
            self.add_symlink(name, os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            self.add_file(name, path.read_bytes(), perms)
        else:
            raise UsageError(f"{path}: cannot pack this kind of file")

    def add_tree(self, root: Path, on_file: Callable[[], None] | None = None) -> None:
        """Add everything under root (not root itself), parents before children, sorted."""
        for top, dirs, files in os.walk(root):
            dirs.sort()
            here = Path(top)
            for name in [*dirs, *sorted(files)]:
                self.add_path((here / name).relative_to(root).as_posix(), here / name)
                if on_file is not None:
                    on_file()

    def close(self) -> None:
        self._entry(TRAILER, 0)


def count_entries(root: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


def default_compression() -> str:
    return "zstd" if shutil.which("zstd") else "gzip"


def compress(src: Path, dst: Path, method: str) -> None:
    """Compress src into dst. Raises UsageError for an unknown method, CommandFailed."""
    if method == "gzip":
        # No file name and no mtime in the header: the same input gives the same bytes.
        with (
            src.open("rb") as fin,
            dst.open("wb") as raw,
            gzip.GzipFile("", "wb", compresslevel=6, fileobj=raw, mtime=0) as fout,
        ):
            shutil.copyfileobj(fin, fout, 1 << 20)
    elif method == "zstd":
        # One thread: the build machine is shared; -19 buys little over -15 and costs much.
        run(["zstd", "-q", "-f", "-T1", "-15", src, "-o", dst], timeout=900)
    else:
        raise UsageError(f"unknown compression {method!r} (one of {', '.join(COMPRESSIONS)})")

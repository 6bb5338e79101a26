"""An image with a few more files: the base image's initramfs with a small
uncompressed cpio in front (the kernel unpacks every archive it is given, in
order), so a job's scripts reach the guest without rebuilding the image."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from sflib.image.initramfs import CpioWriter


def overlay(base: Path, out: Path, files: dict[str, tuple[bytes, int]]) -> Path:
    """out becomes an image folder: base's kernel and manifest, and its initramfs
    with files ({guest path: (content, mode)}) added. Returns out."""
    out.mkdir(parents=True, exist_ok=True)
    extra = io.BytesIO()
    cpio = CpioWriter(extra)
    # Every ancestor, parents first: the kernel creates no missing folder of a path,
    # it drops the file (and the base archive comes after this one).
    folders = {str(parent) for p in files for parent in Path(p).parents} - {"/", "."}
    for folder in sorted(folders):
        cpio.add_dir(folder.lstrip("/"), 0o755)
    for path, (data, mode) in sorted(files.items()):
        cpio.add_file(path.lstrip("/"), data, mode)
    cpio.close()
    with (out / "initrd.img").open("wb") as initrd, (base / "initrd.img").open("rb") as src:
        initrd.write(extra.getvalue())
        shutil.copyfileobj(src, initrd)
    for name in ("vmlinuz", "manifest.json"):
        shutil.copyfile(base / name, out / name)
    return out

"""Kernel modules for the guest: which files to ship and in which order to load them.

Debian's kernel package ships no modules.dep (depmod runs at install time), so when
it is missing we build the part we need from each module's .modinfo "depends=" field,
read straight from the ELF file: no depmod on the host.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from sflib.errors import NotFoundError, UsageError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")

# What the guest needs: the virtio PCI transport, the XenStore channel, networking.
# Their dependencies are resolved, not listed here.
GUEST_MODULES = ("virtio_pci", "virtio_console", "virtio_net")

DepMap = dict[str, list[str]]  # module path (relative to lib/modules/<ver>) -> deps


def module_name(path: str) -> str:
    """kernel/drivers/net/virtio_net.ko -> virtio_net (dashes become underscores)."""
    base = PurePosixPath(path).name
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> DepMap:
    """Parse modules.dep ("a.ko: b.ko c.ko" per line). Raises UsageError on a bad line."""
    deps: DepMap = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise UsageError(f"modules.dep line {number}: no colon: {line!r}")
        deps[path.strip()] = rest.split()
    return deps


def format_modules_dep(deps: DepMap) -> str:
    return "".join(f"{path}: {' '.join(d)}".rstrip() + "\n" for path, d in sorted(deps.items()))


def load_order(deps: DepMap, wanted: Iterable[str]) -> list[str]:
    """The module paths to load for the wanted names, each after everything it needs.

    Raises NotFoundError for a name no module has.
    """
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)  # before the recursion, so a (broken) cycle cannot loop
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise NotFoundError(f"no kernel module {name}")
        visit(path)
    return order


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value fields of an ELF64 module's .modinfo section (repeated keys kept).

    Raises UsageError if elf is not a little-endian ELF64 file.
    """
    if elf[:4] != b"\x7fELF" or elf[4:6] != b"\x02\x01":
        raise UsageError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        start = names_at + name_off
        if elf[start : elf.index(b"\0", start)] == b".modinfo":
            return _fields(elf[offset : offset + size])
    return {}


def _fields(section: bytes) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    return fields


def depends_of(info: dict[str, list[str]]) -> list[str]:
    """Module names from the depends= field ("a,b" or empty)."""
    return [d for value in info.get("depends", []) for d in value.split(",") if d]


def deps_from_modinfo(
    paths: Iterable[str], read: Callable[[str], bytes], wanted: Iterable[str]
) -> DepMap:
    """A modules.dep-like map for the wanted modules and what they need, from .modinfo.

    paths: every module path of the kernel; read(path) gives a module's (uncompressed)
    bytes. Raises NotFoundError for a missing module.
    """
    by_name = {module_name(p): p for p in paths}
    deps: DepMap = {}
    todo = [n.replace("-", "_") for n in wanted]
    while todo:
        name = todo.pop()
        path = by_name.get(name)
        if path is None:
            raise NotFoundError(f"no kernel module {name}")
        if path in deps:
            continue
        names = depends_of(modinfo(read(path)))
        missing = [n for n in names if n not in by_name]
        if missing:
            raise NotFoundError(f"kernel module {name} needs missing {', '.join(missing)}")
        deps[path] = [by_name[n] for n in names]
        todo.extend(names)
    return deps


def find_modules(moddir: Path) -> list[str]:
    """Every module file under moddir (lib/modules/<version>), relative to it."""
    return sorted(
        p.relative_to(moddir).as_posix()
        for p in moddir.rglob("*.ko*")
        if p.name.endswith(MODULE_SUFFIXES)
    )

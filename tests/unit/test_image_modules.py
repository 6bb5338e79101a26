"""Kernel module resolution: modules.dep parsing, load order, .modinfo from ELF."""

from __future__ import annotations

import struct

import pytest

from sflib.errors import NotFoundError, UsageError
from sflib.image import modules as kmod

DEP = """\
v/virtio_ring.ko:
v/virtio.ko: v/virtio_ring.ko
v/virtio_pci.ko: v/virtio.ko v/virtio_ring.ko
c/failover.ko:
n/net_failover.ko: c/failover.ko
n/virtio_net.ko: n/net_failover.ko c/failover.ko v/virtio.ko
h/hid-generic.ko.xz:
"""


def elf_with_sections(sections: dict[str, bytes]) -> bytes:
    """A minimal little-endian ELF64 file holding the given sections."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [".shstrtab", *sections])
    bodies = [names, *sections.values()]
    offset, blobs, headers = 64, b"", [b"\0" * 64]
    name_at = 1
    for name, body in zip([".shstrtab", *sections], bodies, strict=True):
        headers.append(struct.pack("<IIQQQQ", name_at, 1, 0, 0, offset, len(body)) + b"\0" * 24)
        name_at += len(name) + 1
        blobs += body
        offset += len(body)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, offset)
    struct.pack_into("<HHH", header, 0x3A, 64, len(headers), 1)
    return bytes(header) + blobs + b"".join(headers)


def test_module_name_strips_suffix_and_dashes() -> None:
    assert kmod.module_name("h/hid-generic.ko.xz") == "hid_generic"
    assert kmod.module_name("a/virtio_net.ko") == "virtio_net"


def test_parse_and_format_round_trip() -> None:
    deps = kmod.parse_modules_dep(DEP)
    assert deps["v/virtio_ring.ko"] == []
    assert kmod.parse_modules_dep(kmod.format_modules_dep(deps)) == deps


def test_parse_rejects_line_without_colon() -> None:
    with pytest.raises(UsageError):
        kmod.parse_modules_dep("kernel/a.ko kernel/b.ko\n")


def test_load_order_puts_dependencies_first_once() -> None:
    order = kmod.load_order(kmod.parse_modules_dep(DEP), ["virtio_pci", "virtio_net"])
    names = [kmod.module_name(p) for p in order]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
    ]


def test_load_order_accepts_dashes_and_rejects_unknown() -> None:
    deps = kmod.parse_modules_dep(DEP)
    assert kmod.load_order(deps, ["hid-generic"]) == ["h/hid-generic.ko.xz"]
    with pytest.raises(NotFoundError):
        kmod.load_order(deps, ["nosuch"])


def test_load_order_survives_a_cycle() -> None:
    deps = {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}
    assert sorted(kmod.load_order(deps, ["a"])) == ["a.ko", "b.ko"]


def test_modinfo_reads_the_section() -> None:
    info = b"license=GPL\0depends=virtio,virtio_ring\0alias=x\0alias=y\0"
    elf = elf_with_sections({".text": b"\x90" * 7, ".modinfo": info})
    fields = kmod.modinfo(elf)
    assert fields["alias"] == ["x", "y"]
    assert kmod.depends_of(fields) == ["virtio", "virtio_ring"]
    assert kmod.modinfo(elf_with_sections({".text": b""})) == {}


def test_modinfo_rejects_non_elf() -> None:
    with pytest.raises(UsageError):
        kmod.modinfo(b"#!/bin/sh\n")


def test_deps_from_modinfo_follows_depends() -> None:
    files = {
        "k/virtio_ring.ko": b"depends=\0",
        "k/virtio.ko": b"depends=virtio_ring\0",
        "k/virtio_console.ko": b"depends=virtio,virtio_ring\0",
        "k/unrelated.ko": b"depends=\0",
    }
    elves = {p: elf_with_sections({".modinfo": info}) for p, info in files.items()}
    deps = kmod.deps_from_modinfo(elves, elves.__getitem__, ["virtio_console"])
    assert deps == {
        "k/virtio_console.ko": ["k/virtio.ko", "k/virtio_ring.ko"],
        "k/virtio.ko": ["k/virtio_ring.ko"],
        "k/virtio_ring.ko": [],
    }
    order = kmod.load_order(deps, ["virtio_console"])
    assert order == ["k/virtio_ring.ko", "k/virtio.ko", "k/virtio_console.ko"]


def test_deps_from_modinfo_reports_missing_dependency() -> None:
    elves = {"k/a.ko": elf_with_sections({".modinfo": b"depends=gone\0"})}
    with pytest.raises(NotFoundError, match="gone"):
        kmod.deps_from_modinfo(elves, elves.__getitem__, ["a"])

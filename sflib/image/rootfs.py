"""Assemble the guest's root tree from unpacked packages, sflib and the kernel's modules."""

from __future__ import annotations

import compileall
import gzip
import logging
import lzma
import os
import py_compile
import shutil
import sys
from pathlib import Path

from sflib.cli import GUEST_TOOLS
from sflib.errors import NotFoundError, UsageError
from sflib.image import modules as kmod
from sflib.run import run

log = logging.getLogger(__name__)

PYTHON = "python3.11"
STDLIB = f"usr/lib/{PYTHON}"
DIST_PACKAGES = "usr/lib/python3/dist-packages"
INIT_SCRIPT = Path(__file__).with_name("guest-init.sh")
DHCP_SCRIPT = Path(__file__).with_name("udhcpc.script")
GUEST_DHCP_SCRIPT = "etc/udhcpc/default.script"  # where Debian's busybox udhcpc looks
GUEST_HOOKS = "etc/snowflock/hooks.d"
GUEST_MODULE_LIST = "etc/snowflock/modules"
GUEST_LIB_DIR = "usr/lib/x86_64-linux-gnu"  # libsnowflock, snowflock(3)
GUEST_INCLUDE_DIR = "usr/include"
C_LIBRARIES = ("libsnowflock.so.0", "libsnowflock.a")  # built by `make c` into build/
C_HEADERS = ("snowflock.h", "snowflock.hpp")  # in c/
C_TOOLS = "sf-tools"  # the guest tools in C, built by `make c` into build/
GUEST_C_TOOLS = "usr/lib/snowflock/sf-tools"  # each of GUEST_TOOLS in /usr/bin links here

# Never used in a guest: documentation, translations, and the parts of the stdlib
# for a desktop or for developing CPython itself.
TRIM_PATHS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/menu",
    # glibc's iconv modules: UTF-8 and Latin-1 are built in, and Python has its own codecs.
    "usr/lib/x86_64-linux-gnu/gconv",
    f"{STDLIB}/idlelib",
    f"{STDLIB}/tkinter",
    f"{STDLIB}/turtledemo",
    f"{STDLIB}/ensurepip",
    f"{STDLIB}/pydoc_data",
    f"{STDLIB}/lib2to3",
)
TEST_DIRS = ("test", "tests", "idle_test")
SKELETON_DIRS = ("proc", "sys", "dev", "tmp", "run", "root", "mnt", "var/tmp", "etc/snowflock")
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "etc/ld.so.conf": "include /etc/ld.so.conf.d/*.conf\n",
}


def trim(root: Path) -> None:
    """Remove what the guest never uses (see TRIM_PATHS, and the stdlib's tests)."""
    for rel in TRIM_PATHS:
        shutil.rmtree(root / rel, ignore_errors=True)
    stdlib = root / STDLIB
    if stdlib.is_dir():
        for path in sorted(stdlib.rglob("*"), reverse=True):
            if path.is_dir() and path.name in TEST_DIRS:
                shutil.rmtree(path)


def add_skeleton(root: Path) -> None:
    for rel in SKELETON_DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    for rel, text in ETC_FILES.items():
        (root / rel).write_text(text)
    python3 = root / "usr/bin/python3"
    if not python3.exists():
        python3.symlink_to(PYTHON)
    init = root / "init"
    shutil.copyfile(INIT_SCRIPT, init)
    init.chmod(0o755)
    dhcp = root / GUEST_DHCP_SCRIPT
    dhcp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DHCP_SCRIPT, dhcp)
    dhcp.chmod(0o755)


def add_busybox_links(root: Path) -> int:
    """Link every busybox applet not already provided by a package; returns the count.

    The static binary runs on the host to list its applets. Raises NotFoundError.
    """
    busybox = root / "bin/busybox"
    if not busybox.is_file():
        raise NotFoundError("busybox is missing from the unpacked packages")
    count = 0
    for line in run([busybox, "--list-full"], timeout=30).stdout.split():
        link = root / line
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        count += 1
    return count


def c_api_files(build: Path, sources: Path) -> list[Path]:
    """What add_c_api ships: the built libraries and tools, then the public headers."""
    built = [build / name for name in (*C_LIBRARIES, C_TOOLS)]
    return built + [sources / name for name in C_HEADERS]


def add_c_api(root: Path, build: Path, sources: Path) -> None:
    """Ship libsnowflock (.so.0 with its libsnowflock.so link, and .a) and snowflock.h and
    snowflock.hpp, so guest programs build and run against them (snowflock(3)); and the
    guest tools in C, each of GUEST_TOOLS in /usr/bin a link to them.

    Raises NotFoundError when the libraries are not built.
    """
    missing = [str(p) for p in c_api_files(build, sources) if not p.is_file()]
    if missing:
        raise NotFoundError(f"not built: {', '.join(missing)}", hint="run make c")
    lib_dir, include_dir = root / GUEST_LIB_DIR, root / GUEST_INCLUDE_DIR
    lib_dir.mkdir(parents=True, exist_ok=True)
    include_dir.mkdir(parents=True, exist_ok=True)
    for name in C_LIBRARIES:
        shutil.copyfile(build / name, lib_dir / name)
    (lib_dir / "libsnowflock.so").unlink(missing_ok=True)
    (lib_dir / "libsnowflock.so").symlink_to("libsnowflock.so.0")
    for name in C_HEADERS:
        shutil.copyfile(sources / name, include_dir / name)
    tools = root / GUEST_C_TOOLS
    tools.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / C_TOOLS, tools)
    for program in GUEST_TOOLS:
        link = root / "usr/bin" / program
        link.unlink(missing_ok=True)
        link.symlink_to(f"/{GUEST_C_TOOLS}")


def add_hooks(root: Path, hooks: Path) -> None:
    """Copy the hooks.d tree to /etc/snowflock/hooks.d. Raises NotFoundError."""
    if not hooks.is_dir():
        raise NotFoundError(f"{hooks}: no such hooks directory")
    shutil.copytree(hooks, root / GUEST_HOOKS, symlinks=True)


def read_module(path: Path) -> bytes:
    """A module's bytes, uncompressed (busybox insmod wants plain .ko files).

    Raises UsageError for zstd-compressed modules (not in Debian 12's kernel).
    """
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise UsageError(f"{path.name}: zstd-compressed modules are not supported")
    return data


def plain_name(rel: str) -> str:
    """The module's path once uncompressed: a.ko.xz -> a.ko."""
    return rel[: rel.index(".ko") + 3]


def add_modules(root: Path, kernel_tree: Path, version: str, wanted: tuple[str, ...]) -> list[str]:
    """Copy the wanted modules and their dependencies; returns guest paths in load order.

    Writes modules.dep (for busybox modprobe) and /etc/snowflock/modules (for init).
    Raises NotFoundError for a missing module.
    """
    moddir = kernel_tree / "lib/modules" / version
    depfile = moddir / "modules.dep"
    if depfile.is_file():
        deps = kmod.parse_modules_dep(depfile.read_text())
    else:
        deps = kmod.deps_from_modinfo(
            kmod.find_modules(moddir), lambda rel: read_module(moddir / rel), wanted
        )
    order = kmod.load_order(deps, wanted)
    guest_dir = root / "lib/modules" / version
    for rel in order:
        dest = guest_dir / plain_name(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_module(moddir / rel))
    shipped = {plain_name(p): [plain_name(d) for d in deps.get(p, [])] for p in order}
    (guest_dir / "modules.dep").write_text(kmod.format_modules_dep(shipped))
    paths = [f"/lib/modules/{version}/{plain_name(rel)}" for rel in order]
    (root / GUEST_MODULE_LIST).write_text("".join(p + "\n" for p in paths))
    return paths


def make_ld_cache(root: Path) -> None:
    """Build /etc/ld.so.cache for the tree (the host's ldconfig, -r: chrooted paths)."""
    run(["ldconfig", "-r", root], timeout=120)


def compile_python(root: Path) -> None:
    """Precompile every .py file, so no guest (under TCG, slow) compiles at start-up.

    Unchecked-hash pycs: the sources never change in an image, and the cpio's fixed
    mtimes would defeat timestamp checks. Skipped (with a warning) when this
    interpreter is not the guest's Python version, whose bytecode would not load.
    """
    if sys.version_info[:2] != (3, 11):
        log.warning("not precompiling: this is Python %d.%d, the guest 3.11", *sys.version_info)
        return
    for rel in (STDLIB, DIST_PACKAGES):
        tree = root / rel
        if tree.is_dir():
            compileall.compile_dir(
                tree,
                ddir=f"/{rel}",
                quiet=2,
                workers=1,  # the build machine is shared
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )


def tree_size(root: Path) -> int:
    return sum((Path(top) / f).lstat().st_size for top, _, files in os.walk(root) for f in files)

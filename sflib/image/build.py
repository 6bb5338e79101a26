"""Build the guest image: plan (versions and the inputs' digest), then fetch and pack.

A build whose inputs digest matches the one stored in the output directory's
manifest does nothing. The inputs: every package's version, the include list, our
Python dependencies' versions, the sflib sources (this code and the guest init
among them), hooks.d, libsnowflock as `make c` built it with its headers, and the
compression; with a JVM (Options.jvm), also the JDK's release file, jlink's options
and the Java API's jar as `make java` built it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import sflib
from sflib.errors import NotFoundError, SystemFailure
from sflib.image import guestpkg, jvm, packages, pydists, rootfs
from sflib.image.initramfs import CpioWriter, compress, count_entries
from sflib.image.modules import GUEST_MODULES
from sflib.image.packages import Package
from sflib.paths import BUILD_DIR, PROJECT_ROOT

log = logging.getLogger(__name__)

FORMAT = "snowflock-image-1"  # bump when the layout changes in a way no input shows
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"
SFLIB_DIR = Path(sflib.__file__).resolve().parent
PYTHON_API_DIR = SFLIB_DIR.parent / "snowflock"  # import snowflock (snowflock.3py)
C_SOURCES = PROJECT_ROOT / "c"  # snowflock.h, snowflock.hpp (rootfs.add_c_api)
JAVA_JAR = BUILD_DIR / "snowflock.jar"  # the Java API (jvm.add_jvm)


def default_out(with_jvm: bool = False) -> Path:
    """build/image, or build/image-jvm for an image with a JVM: each keeps its digest."""
    return BUILD_DIR / ("image-jvm" if with_jvm else "image")


def default_cache() -> Path:
    return BUILD_DIR / "cache/debs"


def default_hooks() -> Path:
    return PROJECT_ROOT / "hooks.d"


class Reporter(Protocol):
    """Progress of a build: a stage with an optional number of steps."""

    def stage(self, description: str, total: int | None = None) -> None: ...

    def advance(self, steps: int = 1) -> None: ...


class NullReporter:
    def stage(self, description: str, total: int | None = None) -> None:
        log.info("%s", description)

    def advance(self, steps: int = 1) -> None:
        return None


@dataclass(frozen=True)
class Options:
    out: Path
    cache: Path
    hooks: Path
    compression: str
    include: tuple[str, ...] = ()
    force: bool = False
    jvm: bool = False  # a Java runtime and the Java API (sflib.image.jvm)


@dataclass(frozen=True)
class Plan:
    kernel: Package
    packages: list[Package]
    dists: list[metadata.Distribution]
    digest: str


@dataclass(frozen=True)
class Result:
    out: Path
    kernel: Path
    initrd: Path
    up_to_date: bool
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "up_to_date": self.up_to_date,
            "kernel": {"path": str(self.kernel), "size": self.kernel.stat().st_size},
            "initrd": {"path": str(self.initrd), "size": self.initrd.stat().st_size},
            "kernel_version": self.manifest.get("kernel_version"),
            "rootfs_size": self.manifest.get("rootfs_size"),
            "manifest": str(self.out / MANIFEST_FILE),
        }


def tree_digest(digest: Any, root: Path) -> None:
    """Feed a tree's paths, kinds, modes and contents into a hashlib object."""
    for top, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = Path(top) / name
            if path.suffix == ".pyc":
                continue
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            body = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            digest.update(f"{rel}\0{st.st_mode:o}\0{len(body)}\0".encode() + body)
        digest.update(f"dirs:{','.join(dirs)}\0".encode())


def input_digest(opts: Options, pkgs: list[Package], dist_versions: list[str]) -> str:
    h = hashlib.sha256()
    lines = [FORMAT, opts.compression, *sorted(opts.include)]
    lines += [f"{p.name}={p.version}:{p.arch}" for p in pkgs] + dist_versions
    h.update("\n".join(lines).encode())
    tree_digest(h, SFLIB_DIR)
    h.update(b"\0snowflock\0")
    tree_digest(h, PYTHON_API_DIR)
    h.update(b"\0hooks\0")
    tree_digest(h, opts.hooks)
    for path in rootfs.c_api_files(BUILD_DIR, C_SOURCES):  # a missing one fails _assemble
        h.update(f"\0{path.name}\0".encode() + (path.read_bytes() if path.is_file() else b""))
    if opts.jvm:
        h.update(b"\0jvm\0" + " ".join(jvm.JLINK_OPTIONS).encode() + b"\0")
        h.update(jvm.jdk_release(jvm.find_jlink()))
        h.update(b"\0jar\0" + (JAVA_JAR.read_bytes() if JAVA_JAR.is_file() else b""))
    return h.hexdigest()


def make_plan(opts: Options) -> Plan:
    """Resolve packages and versions. Raises NotFoundError."""
    if not opts.hooks.is_dir():
        raise NotFoundError(f"{opts.hooks}: no such hooks directory")
    kernel_name = packages.kernel_package()
    extra = jvm.PACKAGES if opts.jvm else ()
    names = packages.resolve([*packages.BASE_PACKAGES, *extra, *opts.include])
    found = packages.candidates([kernel_name, *names])
    kernel = next(p for p in found if p.name == kernel_name)
    pkgs = [p for p in found if p.name != kernel_name]
    dists = pydists.closure()
    digest = input_digest(opts, [kernel, *pkgs], pydists.versions(dists))
    return Plan(kernel, pkgs, dists, digest)


def read_manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold out/.lock: two builds into one directory (parallel test runs) take turns."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(opts: Options, reporter: Reporter | None = None) -> Result:
    """Build the image into opts.out unless it is up to date.

    Raises NotFoundError (unknown package or module), CommandFailed, SystemFailure.
    """
    report = reporter or NullReporter()
    report.stage("resolving packages")
    plan = make_plan(opts)
    with locked(opts.out):
        old = read_manifest(opts.out)
        result = Result(opts.out, opts.out / KERNEL_FILE, opts.out / INITRD_FILE, True, old)
        fresh = old.get("inputs") == plan.digest and result.kernel.exists()
        if fresh and result.initrd.exists() and not opts.force:
            log.info("%s is up to date", opts.out)
            return result
        manifest = _build(opts, plan, report)
    return Result(opts.out, result.kernel, result.initrd, False, manifest)


def _build(opts: Options, plan: Plan, report: Reporter) -> dict[str, Any]:
    everything = [plan.kernel, *plan.packages]
    report.stage(f"downloading {len(everything)} packages", len(everything))
    debs = packages.download(everything, opts.cache, report.advance)
    staging = opts.out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        root, kernel_tree = staging / "root", staging / "kernel"
        report.stage("unpacking packages", len(everything))
        packages.unpack(debs[plan.kernel.name], kernel_tree)
        report.advance()
        for pkg in plan.packages:
            packages.unpack(debs[pkg.name], root)
            report.advance()
        version, modules = _assemble(opts, plan, root, kernel_tree, report)
        cpio = staging / "initrd.cpio"
        _pack(root, cpio, report)
        report.stage(f"compressing with {opts.compression}")
        _install(kernel_tree / f"boot/vmlinuz-{version}", opts.out / KERNEL_FILE)
        compress(cpio, staging / INITRD_FILE, opts.compression)
        _install(staging / INITRD_FILE, opts.out / INITRD_FILE)
        manifest = _manifest(plan, version, modules, rootfs.tree_size(root), opts)
        (opts.out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _assemble(
    opts: Options, plan: Plan, root: Path, kernel_tree: Path, report: Reporter
) -> tuple[str, list[str]]:
    report.stage("assembling the root tree")
    version = _kernel_version(kernel_tree)
    rootfs.trim(root)
    rootfs.add_skeleton(root)
    rootfs.add_busybox_links(root)
    guestpkg.add_python(root, SFLIB_DIR, PYTHON_API_DIR)
    for dist in plan.dists:
        pydists.copy_distribution(dist, root / rootfs.DIST_PACKAGES)
    guestpkg.add_rest(root, SFLIB_DIR, BUILD_DIR, C_SOURCES, opts.hooks)
    if opts.jvm:
        report.stage("linking a Java runtime")
        size = jvm.add_jvm(root, jvm.find_jlink(), JAVA_JAR)
        log.info("Java runtime: %.1f MiB in /%s", size / 2**20, jvm.GUEST_HOME)
    modules = rootfs.add_modules(root, kernel_tree, version, GUEST_MODULES)
    rootfs.make_ld_cache(root)
    report.stage("precompiling Python modules")
    rootfs.compile_python(root)
    return version, modules


def _kernel_version(kernel_tree: Path) -> str:
    versions = sorted(p.name for p in (kernel_tree / "lib/modules").iterdir())
    if len(versions) != 1:
        raise SystemFailure(f"expected one kernel in the package, found {versions}")
    return versions[0]


def _pack(root: Path, cpio: Path, report: Reporter) -> None:
    report.stage("packing the initramfs", count_entries(root))
    with cpio.open("wb") as out:
        writer = CpioWriter(out)
        writer.add_tree(root, report.advance)
        writer.add_char_device("dev/console", 5, 1)
        writer.add_char_device("dev/null", 1, 3, 0o666)
        writer.close()


def _install(src: Path, dst: Path) -> None:
    """Copy then rename, so a reader never sees half a file."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _manifest(
    plan: Plan, version: str, modules: list[str], size: int, opts: Options
) -> dict[str, Any]:
    return {
        "inputs": plan.digest,
        "format": FORMAT,
        "kernel_version": version,
        "kernel_package": f"{plan.kernel.name}={plan.kernel.version}",
        "include": list(opts.include),
        "jvm": opts.jvm,
        "compression": opts.compression,
        "packages": {p.name: p.version for p in plan.packages},
        "python": pydists.versions(plan.dists),
        "modules": modules,
        "rootfs_size": size,
    }

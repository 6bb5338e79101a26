"""Fixtures for integration tests that boot guests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sflib import looplag, run
from sflib.cluster.testbed import Daemon, Testbed
from sflib.image import build as image
from sflib.image.initramfs import default_compression
from sflib.net import fabric, router
from sflib.paths import Paths


@pytest.fixture(scope="session")
def guest_image() -> image.Result:
    """The guest image, built once into build/image/ and reused while its inputs hold.

    The .deb cache (build/cache/debs/) is shared with sf-image, so it is fetched once.
    """
    opts = image.Options(
        out=image.default_out(),
        cache=image.default_cache(),
        hooks=image.default_hooks(),
        compression=default_compression(),
    )
    result = image.build(opts)
    for path in (result.kernel, result.initrd):
        assert Path(path).is_file(), f"{path} missing after the build"
    return result


ROOT = Path(__file__).resolve().parents[2]


READY_TIMEOUT = 120.0  # seconds for a daemon's ready line: a stuck one fails its test


@dataclass
class Host:
    """A real sfld under its own SF_ROOTDIR, and the tools to talk to it."""

    root: Path
    image: Path
    accel: str
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None  # its network namespace (a testbed host's, or its own)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "sfld.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SF_ROOTDIR": str(self.root)}

    @property
    def run_dir(self) -> Path:
        return self.root / "run/snowflock"

    @property
    def memory_dir(self) -> Path:
        return Paths(self.root).memory_dir

    def start(self, *extra: str) -> None:
        """Start sfld in the host's network namespace (made the first time): its
        family networks and routing stay out of the machine's own."""
        if self.netns is None:
            self.netns = f"sfh{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", self.netns], check=True, timeout=30)
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True,
                           timeout=30)  # fmt: skip
        r, w = os.pipe()
        argv = [*run.in_netns(self.netns), str(ROOT / "bin/sfld"),
                "--accel", self.accel, "--image-dir", str(self.image), "--ready-fd", str(w),
                *extra]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=self.env, pass_fds=[w], stderr=log)
        os.close(w)
        try:
            line = run.ready_line(r, READY_TIMEOUT)
        finally:
            os.close(r)
        if line != b"\n":
            run.stop(self.proc, timeout=10)
            raise AssertionError(f"sfld did not start:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        status = self.proc.wait(timeout=60)
        self.proc = None
        return status

    def tool(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run bin/<argv[0]> against this host, in its network namespace (where its
        daemons listen on TCP too); check=True demands exit 0."""
        out = subprocess.run([*run.in_netns(self.netns), str(ROOT / "bin" / argv[0]), *argv[1:]],
                             env=self.env,
                             capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        if check:
            assert out.returncode == 0, f"{argv} exited {out.returncode}: {out.stderr}"
        return out

    def vm_json(self, *argv: str) -> Any:
        return json.loads(self.tool("sf-vm", *argv, "--json").stdout)

    def xenstore(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XENSTORED_PATH": str(self.run_dir / "xenstored.sock")}
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=30, check=False
        )

    def leftovers(self) -> list[str]:
        """Whatever VM files or QEMU processes of this host still exist."""
        found = [str(p) for p in self.memory_dir.glob("*")] if self.memory_dir.exists() else []
        found += [str(p) for p in self.run_dir.glob("*.qmp")]
        found += [str(p) for p in self.run_dir.glob("*.xenbus")]
        found += [str(p) for p in (self.root / "var/lib/snowflock/vms").glob("*")]
        found += qemu_processes(self.memory_dir)
        found += memtap_mounts(self.memory_dir)
        found += processes(f"build/(memserver|memtap) .*{self.memory_dir}( |/)")
        found += processes(f"dnsmasq .*{self.root}/")
        if self.netns is not None:
            found += [f"family {f}" for f in asyncio.run(fabric.leftovers(self.netns))]
            found += [f"router {f}" for f in asyncio.run(router.leftovers(self.netns))]
        return found


def qemu_processes(memory_dir: Path) -> list[str]:
    """QEMUs whose command line mentions memory_dir (so: of that host)."""
    return processes(f"qemu-system.*{memory_dir}/")


def processes(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()


@contextlib.contextmanager
def running_host(guest_image: image.Result, *sfld_args: str, stop_timeout: float = 60.0,
                 accel: str = "tcg") -> Iterator[Host]:  # fmt: skip
    """A running sfld (TCG, or accel) with its own root; on exit, SIGTERM must leave
    nothing. After a failure, sfld gets SIGTERM and stop_timeout seconds to clean up,
    then SIGKILL, and whatever it left is removed by force (_remove_leftovers)."""
    root = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))  # short: socket paths
    h = Host(root, guest_image.out, accel)
    try:
        h.start(*sfld_args)
        yield h
        if h.proc is not None:
            assert h.stop() == 0, h.log.read_text()
        assert h.leftovers() == []
        assert_no_stalls(h.log)
    finally:
        if h.proc is not None:
            run.stop(h.proc, signal.SIGTERM, stop_timeout)
            h.proc = None
        _remove_leftovers(h.memory_dir, root, h.netns)
        if h.netns is not None:
            subprocess.run(["ip", "netns", "delete", h.netns], check=False, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


STALL_LIMIT_MS = 1000  # a daemon's event loop held up longer fails the test
# The master's host timeout in test clusters (sfmasterd's default is 5 s): TCG guests
# on both cores of a loaded machine delay heartbeats by seconds, and a host declared
# dead fails its clones. Tests of a host's death wait for it up to a minute.
TEST_HOST_TIMEOUT = 20.0


def assert_no_stalls(*logs: Path) -> None:
    """No daemon's event loop stalled for more than STALL_LIMIT_MS (sflib.looplag)."""
    for log in logs:
        # What the daemon held its loop for: a busy machine's delay is not its doing.
        worst = max(looplag.held(log.read_text(errors="replace")), default=0)
        assert worst <= STALL_LIMIT_MS, f"{log}: the daemon held its event loop {worst} ms"


def _remove_leftovers(memory_dir: Path, root: Path, netns: str | None) -> None:
    """After a failed test: what a host's sfld did not clean up, by force: its
    QEMUs, memory servers, memtaps and dnsmasqs, memtap mounts, memory files and
    router namespaces (its own namespace is its caller's)."""
    for pattern in (f"qemu-system.*{memory_dir}/", f"build/(memserver|memtap) .*{memory_dir}( |/)",
                    f"dnsmasq .*{root}/"):  # fmt: skip
        for line in processes(pattern):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
    for point in memtap_mounts(memory_dir):
        subprocess.run(["umount", "-l", point], check=False, timeout=30)
    shutil.rmtree(memory_dir, ignore_errors=True)
    for ns in router_namespaces(netns):
        subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=30)


def router_namespaces(netns: str | None) -> list[str]:
    """The family routers' namespaces of the sfld in netns (sflib.net.router)."""
    if netns is None:
        return []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                         check=True).stdout  # fmt: skip
    return [ns for ns in (line.split()[0] for line in out.splitlines() if line.strip())
            if re.fullmatch(re.escape(netns) + r"-r\d+", ns)]  # fmt: skip


@pytest.fixture
def host(guest_image: image.Result) -> Iterator[Host]:
    with running_host(guest_image) as h:
        yield h


def memtap_mounts(under: Path) -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if " fuse.memtap " in line and line.split()[1].startswith(f"{under}/")]  # fmt: skip


# Guests that run a shell script and report on their console ----------------------

GO = ("until python3 -c \"from sflib.guest.bus import open_bus; "
      "open_bus().read(b'go')\" 2>/dev/null; do sleep 1; done")  # fmt: skip


def boot(host: Host, name: str, script: str, memory: int = 256) -> dict[str, object]:
    b64 = base64.b64encode(script.encode()).decode()
    append = f'sf.run="echo {b64} | base64 -d > /g.sh && sh /g.sh; sleep 100000"'
    assert len(append) < 2000, "kernel command lines stop at 2048 bytes"
    info: dict[str, object] = host.vm_json("run", "--name", name, "--memory", str(memory),
                                           "--append", append, "--wait-ready")  # fmt: skip
    return info


def console(host: Host, name: str, marker: str = "SF-DONE", timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = host.tool("sf-vm", "logs", name).stdout
        if re.search(f"^{re.escape(marker)}", text, re.M):  # not inside the kernel line
            return text
        time.sleep(1)
    raise AssertionError(f"{marker} not seen in {name}'s console:\n{text[-3000:]}\n"
                         f"sfld:\n{host.log.read_text()[-3000:]}")  # fmt: skip


def vm_names(host: Host) -> list[str]:
    return sorted(v["name"] for v in host.vm_json("ls"))


# A cluster of network-namespace hosts (DESIGN §6) ----------------------------------


@dataclass
class Cluster:
    bed: Testbed
    hosts: list[Host]  # tools against each host's sfld (bed.hosts[i] runs it)

    def leftovers(self) -> list[str]:
        return [item for h in self.hosts for item in h.leftovers()]


@contextlib.contextmanager
def running_cluster(guest_image: image.Result, n: int = 3, *sfld_args: str,
                    host_timeout: float = TEST_HOST_TIMEOUT, stalled: Sequence[str] = (),
                    master_args: Sequence[str] = ()) -> Iterator[Cluster]:  # fmt: skip
    """n hosts and a master (with master_args too); on exit every sfld must stop
    cleanly and leave nothing, and no daemon may have held its event loop (but
    those named in stalled: a test stopped them on purpose)."""
    workdir = Path(tempfile.mkdtemp(prefix="sfc-", dir="/tmp"))
    args = ["--accel", "tcg", "--image-dir", str(guest_image.out), *sfld_args]
    master_args = ["--host-timeout", f"{host_timeout:g}", *master_args]
    cluster_hosts: list[str | None] = [None] * n  # their namespaces, once made
    try:
        with Testbed.create(workdir, hosts=n, sfld_args=args, master_args=master_args) as bed:
            cluster_hosts[:] = [h.netns for h in bed.hosts]
            cluster = Cluster(bed, [Host(h.root, guest_image.out, "tcg", netns=h.netns)
                                    for h in bed.hosts])  # fmt: skip
            for host, daemon in zip(cluster.hosts, bed.hosts, strict=True):
                host.log = daemon.log
            try:
                yield cluster
            except BaseException:
                for shown in [*bed.hosts, bed.master]:  # shown by pytest on failure
                    print(f"--- {shown.log}:\n{shown.log.read_text()[-3000:]}")
                raise
            for daemon in bed.hosts:
                assert daemon.stop() == 0, daemon.log.read_text()[-3000:]
            assert cluster.leftovers() == []
            daemons: list[Daemon] = [*bed.hosts, bed.master]
            assert_no_stalls(*(d.log for d in daemons if d.name not in stalled))
    finally:
        for i, netns in enumerate(cluster_hosts, 1):
            _remove_leftovers(Paths(workdir / f"h{i}").memory_dir, workdir / f"h{i}", netns)
        shutil.rmtree(workdir, ignore_errors=True)

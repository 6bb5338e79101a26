"""A SnowFlock cluster on one machine (DESIGN §6): each "host" is a network
namespace on an underlay bridge (itself in a namespace of its own, so the
machine's own network is untouched), running its own sfld under its own
SF_ROOTDIR; the master runs in one more namespace. Daemons enter only the
network namespace (nsenter --net), so their FUSE mounts and files are the
machine's, where tests can see them.

    with Testbed.create(workdir, hosts=3, sfld_args=[...]) as bed:
        bed.hosts[0].root, bed.hosts[0].address, bed.master_address ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sflib import run
from sflib.errors import OperationTimeout, SnowFlockError, SystemFailure
from sflib.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

BIN = PROJECT_ROOT / "bin"
MASTER_PORT, PEER_PORT, MEMSERVER_PORT = 7000, 7100, 7200
START_TIMEOUT = 120.0


@dataclass
class Daemon:
    """sfld or sfmasterd in a namespace, with its own root and log."""

    name: str
    netns: str
    root: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SF_ROOTDIR": str(self.root)}

    def start(self, *extra: str) -> None:
        """Start it and wait until it says it is ready. Raises SystemFailure."""
        r, w = os.pipe()
        argv = [*run.in_netns(self.netns), *self.argv, *extra, "--ready-fd", str(w)]
        # A test or a benchmark killed outright must not leave its daemons running.
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                pass_fds=[w],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=run.die_with_parent,  # noqa: PLW1509 (no threads fork here)
            )
        os.close(w)
        try:
            line = run.ready_line(r, START_TIMEOUT)
        except OperationTimeout as e:
            line = str(e).encode()
        finally:
            os.close(r)
        if line != b"\n":
            run.stop(self.proc, timeout=10)
            tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemFailure(f"{self.name} did not start: {' / '.join(tail)}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal it and reap it; its exit status (None if it was not running)."""
        if self.proc is None:
            return None
        status = run.stop(self.proc, sig, timeout)
        self.proc = None
        return status

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class TestHost(Daemon):
    __test__ = False  # not a test class, whatever pytest thinks of its name
    address: str = ""  # on the underlay

    @property
    def run_dir(self) -> Path:
        return self.root / "run/snowflock"


@dataclass
class Testbed:
    __test__ = False  # not a test class, whatever pytest thinks of its name
    workdir: Path
    tag: str
    subnet: str  # "10.250.N", a /24 inside our namespaces only
    master: Daemon
    hosts: list[TestHost] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    @property
    def master_address(self) -> str:
        return f"{self.subnet}.2:{MASTER_PORT}"

    @classmethod
    @contextlib.contextmanager
    def create(cls, workdir: Path, hosts: int = 3, sfld_args: Sequence[str] = (),
               subnet: str = "10.250.0", daemons: bool = True,
               master_args: Sequence[str] = ()) -> Iterator[Testbed]:  # fmt: skip
        """Make the namespaces and start the master and every sfld (daemons=False: the
        network alone); on leaving, stop them and remove everything. Raises
        SnowFlockError."""
        tag = "sf" + secrets.token_hex(3)
        secret = workdir / "secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        master_root = workdir / "master"
        master = Daemon("sfmasterd", f"{tag}-m", master_root,
                        [str(BIN / "sfmasterd"), "--listen", f"{subnet}.2:{MASTER_PORT}",
                         "--secret-file", str(secret), *master_args])  # fmt: skip
        bed = cls(workdir, tag, subnet, master)
        try:
            bed._network(hosts)
            master_root.mkdir(parents=True, exist_ok=True)
            if daemons:
                master.start()
            for i in range(1, hosts + 1):
                bed.hosts.append(bed._host(i, secret, sfld_args, daemons))
            yield bed
        finally:
            bed.destroy()

    def _host(self, i: int, secret: Path, sfld_args: Sequence[str], start: bool) -> TestHost:
        ip = f"{self.subnet}.{10 + i}"
        root = self.workdir / f"h{i}"
        root.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "sfld"), "--host-name", f"h{i}", "--master", self.master_address,
                "--peer-listen", f"{ip}:{PEER_PORT}", "--memserver-listen",
                f"{ip}:{MEMSERVER_PORT}", "--secret-file", str(secret), *sfld_args]  # fmt: skip
        host = TestHost(f"h{i}", f"{self.tag}-h{i}", root, argv, address=ip)
        if start:
            host.start()
        return host

    def _network(self, hosts: int) -> None:
        underlay = f"{self.tag}-u"
        self._netns(underlay)
        _ip(underlay, "link", "add", "br0", "type", "bridge")
        _ip(underlay, "link", "set", "br0", "up")
        self._attach("m", f"{self.subnet}.2")
        for i in range(1, hosts + 1):
            self._attach(f"h{i}", f"{self.subnet}.{10 + i}")

    def _attach(self, name: str, ip: str) -> None:
        ns, underlay = f"{self.tag}-{name}", f"{self.tag}-u"
        self._netns(ns)
        _ip(ns, "link", "set", "lo", "up")
        _ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{name}",
            "netns", underlay)  # fmt: skip
        _ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip(ns, "link", "set", "eth0", "up")
        _ip(underlay, "link", "set", f"p{name}", "master", "br0", "up")

    def _netns(self, name: str) -> None:
        run.run(["ip", "netns", "add", name])
        self.namespaces.append(name)

    def destroy(self) -> None:
        """Stop every daemon (sflds first: they stop their VMs), delete the namespaces."""
        for daemon in [*self.hosts, self.master]:
            if daemon.stop() not in (0, None):
                log.warning("%s exited uncleanly; see %s", daemon.name, daemon.log)
        for ns in reversed(self.namespaces):
            try:
                run.run(["ip", "netns", "delete", ns])
            except SnowFlockError as e:
                log.warning("cannot delete namespace %s: %s", ns, e)
        self.namespaces.clear()


def _ip(netns: str, *argv: str) -> None:
    run.run(["ip", "-n", netns, *argv])

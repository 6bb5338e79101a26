"""sfld's family networks (DESIGN §1, network identity): on this host, for each
family with a member here, the fabric (bridge, VXLAN to the family's other hosts,
isolation), the synthetic DHCP server and the router's part; for each member, its
tap and its identity.

A parent gets its family number when it starts (from the master in a cluster, so it
is unique there; else from this host alone) and is member 0; clone k is member k.
A family's pieces on a host exist while a member runs there: the first member
brings them up, the last one's end takes them down. At start, whatever a dead sfld
left (devices, tables, router namespaces) is removed first.

The network commands are awaited, so a family's changes on a host take its lock:
a member joining while the family's pieces are still being made (or removed)
waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sflib import run
from sflib.cluster.link import ClusterLink
from sflib.errors import CommandFailed, SnowFlockError, SystemFailure, UsageError
from sflib.net import dhcp, fabric, identity, router
from sflib.net.identity import Identity
from sflib.net.tap import open_tap
from sflib.vm.qemu import Nic

log = logging.getLogger(__name__)

NETWORK_KEY = "snowflock/network"  # a VM's identity on its family network (JSON)
DHCP_START_TIMEOUT = 10  # seconds
# How long a network made ahead of a ticket's clones (prepare) waits for its first
# member: a ticket is used at once (sf-ticket, then sf-clone) or not at all.
PREPARED_HOLD = 120.0  # seconds


@dataclass
class Member:
    vm: str
    me: Identity
    tap: str
    fd: int
    isolated: bool = False  # a card on no network (sflib.fork.network: nested clones)

    @property
    def nic(self) -> Nic:
        return Nic(self.tap, self.fd, self.me.mac)


@dataclass
class FamilyHere:
    """One family's pieces on this host."""

    number: int
    fabric: fabric.FamilyFabric
    router: router.FamilyRouter
    members: dict[int, Member] = field(default_factory=dict)
    dnsmasq: asyncio.subprocess.Process | None = None
    # dnsmasq dies of a SIGHUP that comes before it has read its hosts file: until
    # then a change waits (stale), and the watcher sends it.
    dhcp_ready: bool = False
    dhcp_stale: bool = False
    dhcp_watcher: asyncio.Task[None] | None = None
    held_until: float = 0.0  # made ahead of its members (prepare): kept until then


class FamilyNetworks:
    def __init__(self, settings: dict[str, Any], cluster: ClusterLink | None) -> None:
        self.cluster = cluster
        self.central = settings["router"] == "central"
        self.policy = router.RouterPolicy(settings["router"], tuple(settings["inbound_ports"]),
                                          settings["bandwidth"])  # fmt: skip
        # The underlay address: where the other hosts' VXLANs reach this one.
        self.underlay = cluster.listen[0] if cluster is not None else None
        if self.underlay is not None and _unspecified(self.underlay):
            raise UsageError(
                f"family networks need this host's own address in peer_listen, not {self.underlay}",
                hint='e.g. peer_listen = "10.1.0.5:7100", or network = "none"',
            )
        self.dir = Path(settings["state_dir"]) / "net"
        # Named after the namespace sfld runs in, if it has a name (a test host): so
        # do its router namespaces, which several such hosts on a machine share.
        self.netns = current_netns()
        self.families: dict[int, FamilyHere] = {}
        self.members: dict[str, Member] = {}  # by VM name
        self.local_numbers: dict[int, str] = {}  # alone: the numbers this host gave
        self._isolated = 0  # isolated taps made so far
        self._locks: dict[int, asyncio.Lock] = {}  # by family number
        self._expiries: set[asyncio.Task[None]] = set()  # of prepared networks

    def _lock(self, number: int) -> asyncio.Lock:
        return self._locks.setdefault(number, asyncio.Lock())

    async def recover(self) -> None:
        """Remove what a dead sfld left. Raises SystemFailure."""
        try:
            gone = sorted(set(await router.remove_leftovers(self.netns))
                          | set(await fabric.remove_leftovers(None, self.netns)))  # fmt: skip
        except SnowFlockError as e:
            raise SystemFailure(f"cannot remove old family networks: {e}") from e
        self._stop_old_dhcp()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if gone:
            log.warning("removed the networks of families %s left by a previous sfld",
                        ", ".join(map(str, gone)))  # fmt: skip

    def _stop_old_dhcp(self) -> None:
        """dnsmasq drops its credentials, and with them the signal a child gets when
        sfld dies: a dead sfld's servers may still run. Each has a record."""
        for record in self.dir.glob("dnsmasq-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(record.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if cmdline[0].endswith(b"dnsmasq") and any(
                    arg.startswith(f"--dhcp-hostsfile={self.dir}/".encode()) for arg in cmdline
                ):
                    os.kill(pid, signal.SIGKILL)
                    log.warning("stopped dnsmasq %d, left by a previous sfld", pid)

    # Family numbers ------------------------------------------------------------------

    async def allocate(self, vm: str) -> int:
        if self.cluster is not None:
            return await self.cluster.allocate_family(vm)
        number = identity.free_family(set(self.local_numbers))
        self.local_numbers[number] = vm
        return number

    async def release(self, number: int) -> None:
        if self.cluster is not None:
            await self.cluster.release_family(number)
        else:
            self.local_numbers.pop(number, None)

    # Members ---------------------------------------------------------------------------

    def open(self, vm: str, family: int, clone_id: int, isolated: bool = False) -> Member:
        """A member's tap (not yet on the bridge) and identity; isolated, a tap that
        never joins the network. Raises SystemFailure."""
        me = identity.identity(family, clone_id, self.central)
        if isolated:
            self._isolated += 1
        tap = f"sfn{self._isolated}" if isolated else fabric.tap_name(family, clone_id)
        member = Member(vm, me, tap, open_tap(tap), isolated)
        self.members[vm] = member
        return member

    async def join(self, vm: str, parent_here: bool, peers: list[str] | None = None) -> None:
        """Put vm's tap on its family's network here (making that network first if it
        is the family's first member here). Raises SystemFailure."""
        member = self.members[vm]
        if member.isolated:
            return
        async with self._lock(member.me.family):
            family = await self._family(member.me.family, parent_here)
            try:
                await self._connect(family, peers or [])
                await family.fabric.attach(member.tap)
            except CommandFailed as e:
                raise SystemFailure(f"cannot attach {member.tap}: {e}") from e
            family.members[member.me.clone_id] = member
            self._leases_changed(family)

    async def prepare(self, number: int, peers: list[str], hold: float = PREPARED_HOLD) -> None:
        """Make family number's network here, reaching peers, before its members come
        (a ticket placed clones here): they then only attach their taps. Without a
        member it goes after hold seconds. Raises SystemFailure."""
        async with self._lock(number):
            family = await self._family(number, parent_here=False)
            try:
                await self._connect(family, peers)
            except CommandFailed as e:
                raise SystemFailure(f"cannot reach the family's hosts: {e}") from e
            family.held_until = max(family.held_until, time.monotonic() + hold)
        task = asyncio.get_running_loop().create_task(self._expire(number, hold))
        self._expiries.add(task)
        task.add_done_callback(self._expiries.discard)

    async def _expire(self, number: int, after: float) -> None:
        await asyncio.sleep(after)
        async with self._lock(number):
            family = self.families.get(number)
            if family is not None and not family.members and not self._held(family):
                log.info("family %d: no clone came; removing its network here", number)
                await self._remove(family)

    @staticmethod
    def _held(family: FamilyHere) -> bool:
        return time.monotonic() < family.held_until

    async def connect(self, number: int, peers: list[str]) -> None:
        """The family's network reaches these hosts (underlay addresses) too. Raises
        CommandFailed."""
        async with self._lock(number):
            family = self.families.get(number)
            if family is not None:
                await self._connect(family, peers)

    async def _connect(self, family: FamilyHere, peers: list[str]) -> None:
        if self.underlay is None:
            return
        for peer in peers:
            await family.fabric.join(peer)

    async def leave(self, vm: str) -> None:
        """vm's tap goes; the family's network here with it if it was the last member."""
        member = self.members.pop(vm, None)
        if member is None:
            return
        os.close(member.fd)  # the tap disappears with the last holder (QEMU is gone)
        if member.isolated:
            return
        async with self._lock(member.me.family):
            family = self.families.get(member.me.family)
            if family is None:
                return
            if family.members.get(member.me.clone_id) is member:
                del family.members[member.me.clone_id]
            if family.members:
                self._leases_changed(family)
            elif not self._held(family):  # else it goes when its hold ends (_expire)
                await self._remove(family)

    def published(self, vm: str) -> dict[str, Any] | None:
        """What a VM is told of its network identity (XenStore, hooks), if it has one."""
        member = self.members.get(vm)
        return None if member is None or member.isolated else member.me.to_json()

    async def close(self) -> None:
        for task in list(self._expiries):
            task.cancel()
        for vm in list(self.members):
            await self.leave(vm)
        for number in list(self.families):
            async with self._lock(number):
                if number in self.families:
                    await self._remove(self.families[number])

    def status(self) -> list[dict[str, Any]]:
        return [{"family": f.number, "bridge": f.fabric.bridge, "peers": sorted(f.fabric.peers),
                 "router": self.policy.mode, "members": sorted(f.members)}
                for f in self.families.values()]  # fmt: skip

    # A family's pieces ----------------------------------------------------------------

    async def _family(self, number: int, parent_here: bool) -> FamilyHere:
        if number in self.families:
            return self.families[number]
        net = fabric.FamilyFabric(number, self.underlay, self.netns)
        here = router.FamilyRouter(number, self.policy, self.netns, router_here=parent_here)
        family = FamilyHere(number, net, here)
        try:
            await net.create()
            await here.create()
            family.dnsmasq = await self._dhcp(family)
        except SnowFlockError as e:
            await self._remove(family)
            raise SystemFailure(f"cannot make family {number}'s network: {e}") from e
        self.families[number] = family
        return family

    async def _dhcp(self, family: FamilyHere) -> asyncio.subprocess.Process:
        """dnsmasq for the family; a watcher notes when it is ready (off the clone's
        critical path: a clone takes its address without DHCP). Raises SystemFailure."""
        hosts, leases = self._files(family.number)
        hosts.write_text("")
        log_file = self.dir / f"dnsmasq-{family.number}.log"
        log_file.write_text("")
        gateway = identity.router_ip(family.number) if self.central else None
        mtu = fabric.VXLAN_MTU if self.underlay is not None else None
        proc = await run.spawn(dhcp.dnsmasq_argv(family.number, hosts, leases, gateway, mtu),
                               log_file=log_file)  # fmt: skip
        (self.dir / f"dnsmasq-{family.number}.pid").write_text(f"{proc.pid}\n")
        family.dhcp_watcher = asyncio.create_task(self._watch_dhcp(family, proc, log_file))
        return proc

    async def _watch_dhcp(self, family: FamilyHere, proc: asyncio.subprocess.Process,
                          log_file: Path) -> None:  # fmt: skip
        hosts, _ = self._files(family.number)
        for _ in range(DHCP_START_TIMEOUT * 50):
            if f"read {hosts}" in log_file.read_text(errors="replace"):
                family.dhcp_ready = True
                if family.dhcp_stale:
                    self._leases_changed(family)
                return
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        log.warning("family %d: dnsmasq did not start, no DHCP here: %s", family.number,
                    log_file.read_text(errors="replace")[-500:])  # fmt: skip

    def _leases_changed(self, family: FamilyHere) -> None:
        hosts, _ = self._files(family.number)
        hosts.write_text(dhcp.hosts_file(family.number, list(family.members)))
        family.dhcp_stale = not family.dhcp_ready
        if family.dhcp_ready and family.dnsmasq is not None and family.dnsmasq.returncode is None:
            family.dnsmasq.send_signal(signal.SIGHUP)  # dnsmasq reads its hosts file again

    def _files(self, number: int) -> tuple[Path, Path]:
        return self.dir / f"{number}.hosts", self.dir / f"{number}.leases"

    async def _remove(self, family: FamilyHere) -> None:
        self.families.pop(family.number, None)
        if family.dhcp_watcher is not None:
            family.dhcp_watcher.cancel()
        if family.dnsmasq is not None:
            await run.terminate_async(family.dnsmasq)
        await family.router.destroy()
        await family.fabric.destroy()
        for path in self._files(family.number):
            path.unlink(missing_ok=True)
        for name in (f"dnsmasq-{family.number}.log", f"dnsmasq-{family.number}.pid"):
            (self.dir / name).unlink(missing_ok=True)
        log.info("family %d: network here removed", family.number)


def current_netns(folder: Path = Path("/run/netns")) -> str | None:
    """The name of the network namespace this process runs in, if it has one."""
    mine = os.stat("/proc/self/ns/net")
    with contextlib.suppress(OSError):
        for path in sorted(folder.iterdir()):
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return path.name
    return None


def _unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:  # a name: VXLAN needs an address
        return True

"""The VMs one sfld runs: naming, domain IDs, files, readiness, and clean-up,
including what a previous sfld left behind when it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sflib.errors import NotFoundError, OperationTimeout, UsageError, WrongStateError
from sflib.fork.images import MemoryImage
from sflib.guest.ready import READY_KEY
from sflib.net.service import NETWORK_KEY, FamilyNetworks
from sflib.vm.accel import Accel
from sflib.vm.machine import Machine
from sflib.vm.qemu import VMFiles, VMSpec
from sflib.xenstore.server import XenStoreServer
from sflib.xenstore.wire import XenStoreError

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_DOMID = 0x7FEF  # Xen's DOMID_FIRST_RESERVED - 1


class VMState(StrEnum):
    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(frozen=True)
class VMRequest:
    name: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    image: str | None = None
    append: str = ""

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> VMRequest:
        unknown = set(args) - {"name", "memory_mib", "vcpus", "image", "append"}
        if unknown:
            raise UsageError(f"unknown argument(s): {', '.join(sorted(unknown))}")
        return cls(**args)


@dataclass
class VM:
    machine: Machine
    image: Path
    state: VMState = VMState.BOOTING
    started: float = field(default_factory=time.time)
    boot_to_ready: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    supervisor: asyncio.Task[None] | None = None
    generation: int = 0  # how many QEMU processes this VM has had (see fork)
    family: str | None = None  # a clone's parent VM
    clone_id: int | None = None
    network: int | None = None  # the family network this VM (a parent) holds

    def info(self) -> dict[str, Any]:
        spec = self.machine.spec
        return {
            "name": spec.name,
            "domid": spec.domid,
            "state": str(self.state),
            "accel": str(spec.accel),
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
            "pid": self.machine.pid,
            "image": str(self.image),
            "uptime_s": round(time.time() - self.started, 3),
            "boot_to_ready_s": self.boot_to_ready,
            "family": self.family,
            "clone_id": self.clone_id,
            "mac": spec.nic.mac if spec.nic else None,
            "console_log": str(self.machine.files.console_log),
        }


def next_domid(used: set[int]) -> int:
    """The lowest free domain ID (0 is the host)."""
    for domid in range(1, MAX_DOMID + 1):
        if domid not in used:
            return domid
    raise WrongStateError("no free domain ID")


def minimum_memory_mib(image: Path) -> int:
    """The least RAM that boots image: the kernel unpacks the initramfs (the whole root
    file system) into RAM while the compressed archive is still there, and then needs
    room to run. Below it the guest boots with files missing."""
    try:
        rootfs = int(json.loads((image / "manifest.json").read_text())["rootfs_size"])
    except (OSError, ValueError, KeyError):
        rootfs = 0
    initrd = (image / "initrd.img").stat().st_size
    return (rootfs + 2 * initrd >> 20) + 128


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(f"invalid VM name {name!r}", hint="use [a-z0-9_-], at most 32")
    return name


class VMTable:
    def __init__(self, settings: dict[str, Any], bus: XenStoreServer, accel: Accel) -> None:
        self.settings = settings
        self.bus = bus
        self.accel = accel
        self.vms: dict[str, VM] = {}
        self.state_dir = Path(settings["state_dir"]) / "vms"
        self.run_dir = Path(settings["run_dir"])
        self.memory_dir = Path(settings["memory_dir"])
        self.on_end: list[Callable[[VM], Awaitable[None]]] = []  # e.g. the fork engine
        self.on_ready: list[Callable[[VM], None]] = []  # a booted VM is ready
        self.images: dict[str, MemoryImage] = {}  # the frozen image a VM maps, if any
        self.network: FamilyNetworks | None = None  # set when VMs get cards
        self._retiring: set[asyncio.Task[None]] = set()

    def prepare(self) -> None:
        for d in (self.state_dir, self.run_dir, self.memory_dir):
            d.mkdir(parents=True, exist_ok=True)

    # Planning (no side effects) ---------------------------------------------------

    def plan(self, req: VMRequest) -> tuple[VMSpec, VMFiles, Path]:
        """What a request would start. Raises UsageError, WrongStateError."""
        if len(self.vms) >= self.settings["max_vms"]:
            raise WrongStateError(f"this host already runs {len(self.vms)} VMs (max_vms)")
        domid = next_domid({vm.machine.spec.domid for vm in self.vms.values()})
        name = check_name(req.name or f"vm{domid}")
        if name in self.vms:
            raise WrongStateError(f"a VM named {name} is already running")
        image = Path(req.image or self.settings["image_dir"])
        kernel, initrd = image / "vmlinuz", image / "initrd.img"
        if not kernel.is_file() or not initrd.is_file():
            raise UsageError(f"no guest image in {image}", hint="build one with sf-image build")
        spec = VMSpec(
            name=name,
            domid=domid,
            memory_mib=req.memory_mib or self.settings["memory"],
            vcpus=req.vcpus or self.settings["vcpus"],
            accel=self.accel,
            kernel=kernel,
            initrd=initrd,
            append=req.append,
        )
        needed = minimum_memory_mib(image)
        if spec.memory_mib < needed:
            raise UsageError(f"{spec.memory_mib} MiB is too little for the image in {image}",
                             hint=f"give it at least {needed} MiB")  # fmt: skip
        return spec, self.files(name), image

    def files(self, name: str, generation: int = 0) -> VMFiles:
        """A VM's files; each QEMU process of it has sockets of its own."""
        vm_dir = self.state_dir / name
        stem = name if generation == 0 else f"{name}.g{generation}"
        return VMFiles(
            memory=self.memory_dir / f"{name}.mem",
            qmp_socket=self.run_dir / f"{stem}.qmp",
            xenbus_socket=self.run_dir / f"{stem}.xenbus",
            console_log=vm_dir / "console.log",
            tap_hold=self.run_dir / f"{stem}.taphold",
            extra={"qemu_log": vm_dir / "qemu.log", "record": vm_dir / "vm.json"},
        )

    # Running ------------------------------------------------------------------

    async def run(self, req: VMRequest) -> VM:
        spec, files, image = self.plan(req)
        files.console_log.parent.mkdir(parents=True, exist_ok=True)
        machine = Machine(self.settings["qemu"], spec, files, self.bus, files.extra["qemu_log"])
        vm = VM(machine, image)
        self.vms[spec.name] = vm
        self.bus.local.make_domain(spec.domid)
        ready_path = f"/local/domain/{spec.domid}/{READY_KEY.decode()}"
        self.bus.local.watch(ready_path, spec.name.encode(), lambda _p, _t: self._check_ready(vm))
        try:
            await self._add_card(vm)
            await machine.start()
            if self.network is not None:
                await self.network.join(spec.name, parent_here=True)
                self.published_network(vm)
        except BaseException:
            await self._forget(vm)
            raise
        self.register(vm)
        log.info(
            "VM %s (domain %d) started: %s, %d MiB, %d vCPU",
            spec.name,
            spec.domid,
            spec.accel,
            spec.memory_mib,
            spec.vcpus,
        )
        return vm

    async def _add_card(self, vm: VM) -> None:
        """A new VM's card: a family network of its own, where it is member 0."""
        if self.network is None:
            return
        name = vm.machine.spec.name
        vm.network = await self.network.allocate(name)
        member = self.network.open(name, vm.network, 0)
        vm.machine.spec = dataclasses.replace(vm.machine.spec, nic=member.nic)

    def published_network(self, vm: VM) -> dict[str, Any] | None:
        """Write vm's identity on its family network into its XenStore domain (a clone
        finds its parent's there); returns it, or None if vm has no card."""
        info = self.network.published(vm.machine.spec.name) if self.network else None
        if info is not None:
            key = f"/local/domain/{vm.machine.spec.domid}/{NETWORK_KEY}"
            self.bus.local.write(key, json.dumps(info).encode())
        return info

    def allocate_domid(self) -> int:
        return next_domid({vm.machine.spec.domid for vm in self.vms.values()})

    def reserve(self, vm: VM) -> None:
        """Hold a VM's name and domain ID while its QEMU starts."""
        if vm.machine.spec.name in self.vms:
            raise WrongStateError(f"a VM named {vm.machine.spec.name} is already running")
        self.vms[vm.machine.spec.name] = vm

    def unreserve(self, vm: VM) -> None:
        if self.vms.get(vm.machine.spec.name) is vm:
            del self.vms[vm.machine.spec.name]

    def release_image(self, name: str) -> None:
        image = self.images.pop(name, None)
        if image is not None:
            image.release(name)
            if image.users:  # the zero pages it filled serve nobody now
                image.trim()

    def retire(self, machine: Machine) -> None:
        """Stop a VM's former QEMU (it went on in a new one) in the background."""
        task = asyncio.create_task(machine.stop(), name=f"retire-{machine.spec.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def register(self, vm: VM) -> None:
        """Watch over a VM whose QEMU runs: record it, clean up when it ends."""
        self.vms[vm.machine.spec.name] = vm
        self.record(vm)
        vm.supervisor = asyncio.create_task(self._supervise(vm), name=f"vm-{vm.machine.spec.name}")

    def _check_ready(self, vm: VM) -> None:
        path = f"/local/domain/{vm.machine.spec.domid}/{READY_KEY.decode()}"
        with contextlib.suppress(XenStoreError):
            self.bus.local.read(path)
            if vm.state == VMState.BOOTING:
                vm.state = VMState.READY
                vm.boot_to_ready = round(time.time() - vm.started, 3)
                vm.ready.set()
                log.info("VM %s ready after %.2f s", vm.machine.spec.name, vm.boot_to_ready)
                for callback in self.on_ready:
                    callback(vm)

    async def _supervise(self, vm: VM) -> None:
        """Stop a VM that is not ready in time; clean up whenever QEMU exits."""
        machine = vm.machine
        wait = asyncio.ensure_future(machine.wait())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(vm.ready.wait(), self.settings["ready_timeout"])
        if not vm.ready.is_set() and vm.machine.running:
            log.warning(
                "VM %s not ready in %g s: stopping it",
                vm.machine.spec.name,
                self.settings["ready_timeout"],
            )
            await vm.machine.stop()
        status = await wait
        while vm.machine is not machine:  # the VM continues in a new QEMU (a fork)
            machine = vm.machine
            status = await machine.wait()
        if vm.state != VMState.STOPPING:
            log.warning("VM %s exited with status %d", vm.machine.spec.name, status)
        await self._forget(vm)

    async def wait_ready(self, name: str, timeout: float) -> VM:
        vm = self.get(name)
        ready = asyncio.ensure_future(vm.ready.wait())
        ended = asyncio.ensure_future(vm.ended.wait())
        done, pending = await asyncio.wait(
            {ready, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if vm.ready.is_set():
            return vm
        if ended in done:
            raise WrongStateError(
                f"VM {name} stopped before it was ready: {vm.machine.qemu_error()}"
            )
        raise OperationTimeout(f"VM {name} not ready within {timeout:g} s")

    def get(self, name: str) -> VM:
        if name not in self.vms:
            raise NotFoundError(f"no VM named {name}")
        return self.vms[name]

    async def stop(self, name: str) -> VM:
        vm = self.get(name)
        vm.state = VMState.STOPPING
        await vm.machine.stop()
        await vm.ended.wait()
        log.info("VM %s stopped", name)
        return vm

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(n) for n in list(self.vms)), *self._retiring,
                             return_exceptions=True)  # fmt: skip

    async def _forget(self, vm: VM) -> None:
        spec = vm.machine.spec
        self.release_image(spec.name)  # first: the image's users are the VMs that run
        for callback in self.on_end:
            await callback(vm)
        if self.network is not None:
            await self.network.leave(spec.name)
            if vm.network is not None:
                await self.network.release(vm.network)
                vm.network = None
        if self.vms.get(spec.name) is vm:
            del self.vms[spec.name]
        await vm.machine.stop()
        with contextlib.suppress(XenStoreError):
            self.bus.local.unwatch(
                f"/local/domain/{spec.domid}/{READY_KEY.decode()}", spec.name.encode()
            )
        self.bus.release_domain(spec.domid)
        shutil.rmtree(vm.machine.files.console_log.parent, ignore_errors=True)
        vm.ended.set()

    def record(self, vm: VM) -> None:
        """Write what a later sfld needs to clean up after vm (its QEMU's pid, its
        files), again whenever it changes."""
        record = vm.machine.files.extra["record"]
        files = vm.machine.files
        data = {
            "pid": vm.machine.pid,
            "name": vm.machine.spec.name,
            "files": [str(files.memory), str(files.qmp_socket), str(files.xenbus_socket)],
        }
        record.write_text(json.dumps(data))

    # What a previous sfld left ---------------------------------------------------

    def recover(self) -> list[str]:
        """Stop the QEMUs and remove the files of VMs a dead sfld left behind."""
        cleaned = []
        for record in sorted(self.state_dir.glob("*/vm.json")):
            cleaned.append(record.parent.name)
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(record.read_text())
                _kill_leftover(int(data["pid"]), data["name"])
                for path in data["files"]:
                    Path(path).unlink(missing_ok=True)
            shutil.rmtree(record.parent, ignore_errors=True)
        for leftover in self.state_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        shutil.rmtree(self.state_dir.parent / "checkpoints", ignore_errors=True)
        for pattern, folder in (
            ("*.mem", self.memory_dir),
            ("*.mem.free", self.memory_dir),
            ("*.qmp", self.run_dir),
            ("*.xenbus", self.run_dir),
            ("*.taphold", self.run_dir),
        ):
            for path in folder.glob(pattern):
                path.unlink(missing_ok=True)
        for name in cleaned:
            log.warning("cleaned up VM %s left by a previous sfld", name)
        return cleaned


def _kill_leftover(pid: int, name: str) -> None:
    """SIGKILL pid if it still is the QEMU of VM name (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if b"qemu" in os.path.basename(cmdline[0]) and f"{name},debug-threads=on".encode() in cmdline:
        os.kill(pid, signal.SIGKILL)

"""The whole of sfld: the host's XenStore, its VMs and the control socket.

Runs in the foreground until SIGTERM or SIGINT, then stops every VM and removes
its sockets. At start it first cleans up what a previous sfld left behind. No work
holds its loop up (sflib.looplag watches it): what blocks runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
from pathlib import Path
from typing import Any

from sflib import __version__, looplag
from sflib.cluster.link import ClusterLink
from sflib.cluster.wire import read_secret
from sflib.errors import SystemFailure, UsageError, WrongStateError
from sflib.fork.checkpoint import describe
from sflib.fork.engine import ForkEngine
from sflib.memory.service import MemoryService, TapSettings
from sflib.net.service import FamilyNetworks
from sflib.sfld import control
from sflib.sfld.vms import VMRequest, VMTable
from sflib.vm.accel import Accel, AccelChoice, choose
from sflib.vm.qemu import Nic, qemu_argv, show
from sflib.xenstore.server import XenStoreServer

log = logging.getLogger(__name__)

TAP_FD_SHOWN = 3  # --show-command: QEMU gets the tap as an inherited descriptor


class Daemon:
    def __init__(self, settings: dict[str, Any], kvm_probe: Path) -> None:
        self.settings = settings
        self.kvm_probe = kvm_probe
        self.run_dir = Path(settings["run_dir"])
        self.bus = XenStoreServer()
        self.accel: AccelChoice | None = None
        self.vms: VMTable | None = None
        self.stopping = asyncio.Event()

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "sfld.sock"

    @property
    def xenstored_socket(self) -> Path:
        return self.run_dir / "xenstored.sock"

    async def run(self, on_ready: Any = None) -> None:
        async with looplag.watching(self.settings["loop_stall_warning"]):
            await self._run(on_ready)

    async def _run(self, on_ready: Any) -> None:
        # The KVM probe runs QEMU for up to seconds, and the leftovers' cleanup
        # (QEMUs, memtap mounts) is synchronous: both in a thread.
        self.accel = await asyncio.to_thread(choose, Accel(self.settings["accel"]),
                                             self.settings["qemu"], self.kvm_probe)  # fmt: skip
        log.info("accelerator: %s (%s)", self.accel.accel, self.accel.reason)
        self.vms = VMTable(self.settings, self.bus, self.accel.accel)
        try:
            self.vms.prepare()
        except OSError as e:
            raise SystemFailure(f"cannot create sfld's folders: {e}") from e
        await asyncio.to_thread(self.vms.recover)
        self.cluster = self._cluster_link()
        if self.settings["network"] == "family":
            self.vms.network = FamilyNetworks(self.settings, self.cluster)
            await self.vms.network.recover()
        self.memory = self._memory_service()
        await asyncio.to_thread(self.memory.recover)
        self.fork = ForkEngine(self.vms, self.settings["max_clones"],
                               Path(self.settings["state_dir"]), self.memory,
                               self.settings["clone_memory"] == "memtap", self.cluster)  # fmt: skip
        await self._listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("ready: control %s, xenstore %s", self.control_socket, self.xenstored_socket)
        if on_ready:
            on_ready()
        await self.stopping.wait()
        await self._shutdown()

    def _cluster_link(self) -> ClusterLink | None:
        s = self.settings
        if not s["master"]:
            return None
        secret = read_secret(Path(s["secret_file"]))
        return ClusterLink(s["host_name"], s["master"], s["peer_listen"], secret, s["max_clones"])

    def _memory_service(self) -> MemoryService:
        s = self.settings
        # A cluster's secret must be the one every host has: made up here, it would not be.
        secret = Path(s["secret_file"]) if s["master"] else ensure_secret(Path(s["secret_file"]))
        taps = TapSettings(secret, s["memtap_prefetch"], s["memtap_timeout"])
        return MemoryService(Path(s["memory_dir"]), Path(s["state_dir"]) / "memory",
                             s["memserver_listen"], taps)  # fmt: skip

    async def _listen(self) -> None:
        try:
            await self.bus.listen_unix(self.xenstored_socket)
            self.control = await control.serve(self.control_socket, self.dispatch)
            if self.cluster is not None:
                await self.cluster.start(self.fork.peer_dispatch)
        except OSError as e:
            raise SystemFailure(f"cannot listen in {self.run_dir}: {e.strerror}") from e

    async def _shutdown(self) -> None:
        log.info("shutting down")
        await control.close_server(self.control, self.control_socket)
        assert self.vms is not None
        await self.vms.stop_all()
        if self.vms.network is not None:
            await self.vms.network.close()
        if self.fork.hosted is not None:
            await self.fork.hosted.drain()
        if self.cluster is not None:
            await self.cluster.close()
        await self.memory.close()
        await self.bus.close()
        self.xenstored_socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept if something is still in it
            self.vms.memory_dir.rmdir()
        log.info("stopped")

    def _cluster_status(self) -> dict[str, Any]:
        link = self.cluster
        if link is None:
            return {"host": None, "master": None}
        return {"host": link.host, "address": link.address, "master": link.master.address,
                "registered": link.registered, "dead_hosts": sorted(link.dead)}  # fmt: skip

    # Control requests ---------------------------------------------------------

    async def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        assert self.vms is not None and self.accel is not None
        vms = self.vms
        if op == "status":
            return {"version": __version__, "accel": str(self.accel.accel),
                    "accel_reason": self.accel.reason, "vms": len(vms.vms),
                    "xenstored_socket": str(self.xenstored_socket)}  # fmt: skip
        if op == "vm.list":
            return [vm.info() for vm in vms.vms.values()]
        if op == "vm.info":
            return vms.get(_name(args)).info()
        if op == "vm.command":
            spec, files, _ = vms.plan(VMRequest.from_args(args))
            if vms.network is not None:  # the card it would get; the fd is sfld's to open
                nic = Nic("sftF-0", TAP_FD_SHOWN, "02:53:46:FF:F0:00")
                spec = dataclasses.replace(spec, nic=nic)
            return show(qemu_argv(self.settings["qemu"], spec, files))
        if op == "vm.run":
            return (await vms.run(VMRequest.from_args(args))).info()
        if op == "vm.wait_ready":
            return (await vms.wait_ready(_name(args), float(args.get("timeout", 300)))).info()
        if op == "vm.stop":
            return (await vms.stop(_name(args))).info()
        if op == "checkpoint.list":
            return self.fork.list_checkpoints()
        if op == "checkpoint.describe":
            return describe(self.fork.checkpoint_dir, str(args.get("checkpoint")))
        if op == "ticket.list":
            return self.fork.list_tickets()
        if op == "network.status":
            return {"network": self.settings["network"], "router": self.settings["router"],
                    "families": vms.network.status() if vms.network else []}  # fmt: skip
        if op == "memory.stats":
            return await self.memory.stats()
        if op == "cluster.status":
            return self._cluster_status()
        if op in _MASTER_CALLS:
            if self.cluster is None:
                raise WrongStateError("this sfld is not part of a cluster", hint="set master")
            return await self.cluster.master.call(_MASTER_CALLS[op])
        raise UsageError(f"unknown request {op!r}")


# What sf-cluster asks the master through this sfld (which holds the secret).
_MASTER_CALLS = {"cluster.hosts": "host.list", "cluster.tickets": "ticket.list",
                 "cluster.master": "status"}  # fmt: skip


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str):
        raise UsageError("a VM name is required")
    return name


def ensure_secret(path: Path) -> Path:
    """The shared secret file, made (random, mode 0600) if there is none yet.

    Raises SystemFailure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            log.info("created the shared secret %s: copy it to every host", path)
    except OSError as e:
        raise SystemFailure(f"cannot create the shared secret {path}: {e.strerror}") from e
    return path

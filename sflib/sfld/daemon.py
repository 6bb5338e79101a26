"""The whole of sfld: the host's XenStore, its VMs and the control socket.

Runs in the foreground until SIGTERM or SIGINT, then stops every VM and removes
its sockets. At start it first cleans up what a previous sfld left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

from sflib import __version__
from sflib.errors import SystemFailure, UsageError
from sflib.fork.checkpoint import describe
from sflib.fork.engine import ForkEngine
from sflib.sfld import control
from sflib.sfld.vms import VMRequest, VMTable
from sflib.vm.accel import Accel, AccelChoice, choose
from sflib.vm.qemu import qemu_argv, show
from sflib.xenstore.server import XenStoreServer

log = logging.getLogger(__name__)


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
        self.accel = choose(Accel(self.settings["accel"]), self.settings["qemu"], self.kvm_probe)
        log.info("accelerator: %s (%s)", self.accel.accel, self.accel.reason)
        self.vms = VMTable(self.settings, self.bus, self.accel.accel)
        try:
            self.vms.prepare()
        except OSError as e:
            raise SystemFailure(f"cannot create sfld's folders: {e}") from e
        self.vms.recover()
        self.fork = ForkEngine(self.vms, self.settings["max_clones"],
                               Path(self.settings["state_dir"]))  # fmt: skip
        await self._listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("ready: control %s, xenstore %s", self.control_socket, self.xenstored_socket)
        if on_ready:
            on_ready()
        await self.stopping.wait()
        await self._shutdown()

    async def _listen(self) -> None:
        try:
            await self.bus.listen_unix(self.xenstored_socket)
            self.control = await control.serve(self.control_socket, self.dispatch)
        except OSError as e:
            raise SystemFailure(f"cannot listen in {self.run_dir}: {e.strerror}") from e

    async def _shutdown(self) -> None:
        log.info("shutting down")
        await control.close_server(self.control, self.control_socket)
        assert self.vms is not None
        await self.vms.stop_all()
        await self.bus.close()
        self.xenstored_socket.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # kept if something is still in it
            self.vms.memory_dir.rmdir()
        log.info("stopped")

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
        raise UsageError(f"unknown request {op!r}")


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str):
        raise UsageError("a VM name is required")
    return name

"""A VM's next QEMU, started before its next fork (DESIGN §2).

A fork's parent goes on in a new QEMU that maps the frozen image. Starting that
QEMU (the process, its QMP and XenStore channels, the incoming migration set up)
takes 45-180 ms under TCG, and sf-clone waited for it. A standby is that QEMU
started early, while the guest runs: once a VM is ready, and again after each of
its forks (once the fork's clones are started). It waits, paused, for state, and
maps privately the file the next fork freezes: the VM's own RAM file before its
first fork, and after it the image the VM maps, which the next fork brings up to
date in place. A fork that must copy the image instead (clones or checkpoints
still map it) cannot use it: the standby is stopped and the fork starts its next
QEMU as before.

A standby shares the VM's tap with the QEMU that runs it, and holds it
(sflib.net.tap.Hold) until it loads the VM's state: it reads no frame (one it read
would never reach the guest) and leaves the tap's header size and offloads as the
running QEMU set them.

A standby costs a QEMU process that runs no guest code, and its two sockets; it
stops with its VM and dies with sfld (run.spawn's parent-death signal). Clones get
one only after their own first fork.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from sflib.fork import images
from sflib.sfld.vms import VM, VMTable
from sflib.vm.machine import Machine

log = logging.getLogger(__name__)


async def start_next(vms: VMTable, vm: VM, memory: Path) -> Machine:
    """vm's next QEMU, started and paused, waiting for state, mapping memory
    privately; its XenStore channel is held until it takes over. Raises
    SnowFlockError (and leaves nothing)."""
    old = vm.machine
    files = dataclasses.replace(vms.files(old.spec.name, vm.generation + 1), memory=memory,
                                owns_memory=False, extra={})  # fmt: skip
    spec = dataclasses.replace(old.spec, incoming="defer", share_memory=False)  # same tap
    new = Machine(old.qemu, spec, files, vms.bus, old.qemu_log)
    new.env = images.tracking_environment(memory)  # its next fork copies ahead
    new.hold_bus = new.hold_tap = True
    try:
        await new.start()
        await new.wait_bus()
        await new.expect_state()  # one QMP round trip less in the pause
    except BaseException:
        await new.stop()
        raise
    return new


class Standbys:
    """The standby of each VM that has one (setting standby)."""

    def __init__(self, vms: VMTable, enabled: bool) -> None:
        self.vms = vms
        self.enabled = enabled
        self._next: dict[str, asyncio.Task[Machine]] = {}

    def prepare(self, vm: VM) -> None:
        """Start vm's next QEMU in the background, unless it has one."""
        name = vm.machine.spec.name
        if not self.enabled or name in self._next or not vm.machine.running:
            return
        image = self.vms.images.get(name)
        if image is not None and not image.owned:  # a clone through memtap: forks copy
            return
        memory = vm.machine.files.memory
        self._next[name] = asyncio.create_task(start_next(self.vms, vm, memory),
                                               name=f"standby-{name}")  # fmt: skip

    async def take(self, vm: VM, memory: Path) -> Machine | None:
        """vm's standby if it runs and maps memory: it is then the caller's. Else
        None, and the standby is stopped. Never raises."""
        name = vm.machine.spec.name
        task = self._next.pop(name, None)
        if task is None:
            return None
        try:
            machine = await task  # still starting: no slower than starting another
        except Exception as e:  # noqa: BLE001 - the fork starts its own QEMU instead
            log.warning("%s: its standby QEMU did not start: %s", name, e)
            return None
        if machine.running and machine.files.memory == memory:
            log.info("%s: goes on in its standby QEMU", name)
            return machine
        log.info("%s: standby QEMU not used (it maps %s, the fork needs %s)", name,
                 machine.files.memory, memory)  # fmt: skip
        await machine.stop()
        return None

    async def drop(self, name: str) -> None:
        """Stop VM name's standby, if any. Never raises."""
        task = self._next.pop(name, None)
        if task is None:
            return
        task.cancel()  # start_next stops what it started
        try:
            machine = await task
        except asyncio.CancelledError:
            if (me := asyncio.current_task()) is not None and me.cancelling():
                raise  # the caller is cancelled, not only the standby
            return  # stopped while it started
        except Exception as e:  # noqa: BLE001 - it did not start: nothing to stop
            log.debug("%s: its standby QEMU had failed to start: %s", name, e)
            return
        await machine.stop()  # it had started already: cancelling came too late

    async def drop_all(self) -> None:
        await asyncio.gather(*(self.drop(name) for name in list(self._next)))

"""A running VM as a managed object: its QEMU process, QMP, XenStore channel, files.

start() creates the sockets QEMU connects to before starting it (no start-up race),
waits for QMP, and on any failure cleans up. stop() asks politely (QMP quit), then
by force, and always removes the runtime files and the memory file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError

from sflib import run
from sflib.errors import OperationTimeout, SystemFailure
from sflib.net import tap
from sflib.vm.qemu import NIC_ID, VMFiles, VMSpec, qemu_argv
from sflib.xenstore.server import Connection, XenStoreServer
from sflib.xenstore.snapshot import DomainSnapshot

log = logging.getLogger(__name__)

QMP_TIMEOUT = 30.0
INCOMING_FD = "sf-incoming"  # the name QEMU knows the device state's descriptor by


def _no_event(_event: object) -> bool:
    return False


class Machine:
    def __init__(
        self, qemu: str, spec: VMSpec, files: VMFiles, bus: XenStoreServer, qemu_log: Path
    ) -> None:
        self.qemu = qemu
        self.spec = spec
        self.files = files
        self.bus = bus
        self.qemu_log = qemu_log
        self.log = log.getChild(spec.name)
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(spec.name)
        # Its default listener would keep every event for ever (it cannot be
        # removed): it takes none. Listeners here last one command (load_state).
        self.qmp.events.event_filter = _no_event
        self.channel: Connection | None = None  # set beforehand to continue a session
        self.hold_bus = False  # set beforehand: keep the channel for take_over()
        # Set beforehand for a QEMU started beside its VM's running one: it leaves
        # their tap alone until load_state (sflib.net.tap.Hold).
        self.hold_tap = False
        self._tap: tap.Hold | None = None
        self._held: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.restore_from: DomainSnapshot | None = None  # set beforehand for a clone
        self.env: dict[str, str] | None = None  # QEMU's environment, if not ours
        self.bus_connected = asyncio.Event()
        self._xenbus_server: asyncio.Server | None = None
        self._stop_lock = asyncio.Lock()
        self._stopped = False
        self._ignoring_shared: bool | None = None  # x-ignore-shared as last set
        self._load_from: Path | None = None  # prepare_load's file, until loaded

    @property
    def argv(self) -> list[str]:
        return qemu_argv(self.qemu, self.spec, self.files)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Start QEMU and connect QMP. Raises SystemFailure or OperationTimeout."""
        try:
            await self._listen()
            fds = [self.spec.nic.fd] if self.spec.nic else []
            self.proc = await run.spawn(self.argv, log_file=self.qemu_log,
                                        env=self._environment(), pass_fds=fds)  # fmt: skip
            self.log.info("started QEMU, pid %d", self.proc.pid)
            await self._accept_qmp()
        except BaseException:
            await self.stop()
            raise

    def _environment(self) -> dict[str, str] | None:
        """QEMU's: self.env, and with a card the tap's hold. Raises SystemFailure."""
        if self.spec.nic is None or self.files.tap_hold is None:
            return self.env
        self._tap = tap.Hold(self.files.tap_hold, self.spec.nic.fd)
        self._tap.create(self.hold_tap)
        return self._tap.environment(self.env)

    async def _listen(self) -> None:
        for sock in (self.files.qmp_socket, self.files.xenbus_socket):
            sock.parent.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)
        self._xenbus_server = await asyncio.start_unix_server(
            self._on_xenbus, path=str(self.files.xenbus_socket)
        )
        await self.qmp.start_server(str(self.files.qmp_socket))

    async def _on_xenbus(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.hold_bus:  # started ahead of a pause: its VM's QEMU still runs
            self._held = (reader, writer)
            self.bus_connected.set()
            return
        if self.channel is None and self.restore_from is not None:
            # A clone: its domain starts as the checkpointed domain was.
            snap = self.restore_from
            self.channel = self.bus.restore_domain(snap, self.spec.domid, reader, writer)
            self.bus_connected.set()
            return
        # A reconnecting QEMU, or a new QEMU continuing this VM, takes over the
        # domain's session: a watch the guest placed before still fires.
        self.channel = self.bus.attach(self.spec.domid, reader, writer, resume=self.channel)
        self.bus_connected.set()

    def take_over(self, session: Connection) -> None:
        """The held channel takes over session (the VM's, from its paused QEMU): a
        watch the guest placed before still fires. After wait_bus()."""
        assert self._held is not None, "take_over() before the channel connected"
        reader, writer = self._held
        self.hold_bus, self._held = False, None
        self.channel = self.bus.attach(self.spec.domid, reader, writer, resume=session)

    async def wait_bus(self, timeout: float = 10.0) -> None:
        """Until QEMU's XenStore channel is attached. Raises OperationTimeout."""
        try:
            await asyncio.wait_for(self.bus_connected.wait(), timeout)
        except TimeoutError:
            raise OperationTimeout(
                f"QEMU did not connect its XenStore port in {timeout:g} s"
            ) from None

    async def _accept_qmp(self) -> None:
        """Wait for QEMU's QMP connection; if QEMU dies first, raise what it said."""
        assert self.proc is not None
        accept = asyncio.ensure_future(self.qmp.accept())
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait(
            {accept, exited}, timeout=QMP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        exited.cancel()
        if accept in done and accept.exception() is None:
            return
        accept.cancel()
        if not done:
            raise OperationTimeout(f"QEMU did not connect to QMP within {QMP_TIMEOUT:g} s")
        # QEMU exited, or connected and died before its greeting: its status and last
        # words say why (a bad kernel, too little memory, a missing file).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5.0)
        status = self.proc.returncode
        if status is None:
            raise SystemFailure(f"QMP handshake with QEMU failed: {accept.exception()}")
        raise SystemFailure(f"QEMU exited with status {status}: {self.qemu_error()}")

    def qemu_error(self) -> str:
        """The last line QEMU wrote to its log, for error messages."""
        try:
            lines = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no message"

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command. Raises SystemFailure with QEMU's own message."""
        try:
            return await self.qmp.execute(command, arguments)
        except QMPError as e:
            raise SystemFailure(f"QMP {command} failed: {e}") from e

    # Saving and loading the device state (the descriptor's core) ---------------

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        await self.execute("cont")

    def set_tap_held(self, held: bool) -> None:
        """Whether QEMU leaves the VM's tap alone, from its main loop's next turn
        (after the next command, at the latest). A stopped QEMU would read one
        frame more and keep it for a guest that may never run in it again. Raises
        SystemFailure."""
        if self._tap is not None:
            self._tap.set(held)

    async def set_link(self, up: bool) -> None:
        """The network card's link: down, the card neither sends nor receives."""
        await self.execute("set_link", {"name": NIC_ID, "up": up})

    async def save_devices(self, path: Path) -> None:
        """Write the state of every device but RAM to path (the VM must be paused),
        whether RAM is shared or private: a migration would carry private RAM
        along. Raises SystemFailure."""
        await self.execute("xen-save-devices-state", {"filename": str(path), "live": False})

    async def save_state(self, path: Path) -> None:
        """Write the device state with all of RAM to path (the VM must be paused),
        as an eager snapshot (virsh save) does. Raises SystemFailure if QEMU's
        migration fails."""
        await self._ignore_shared(False)
        with self.qmp.listener("MIGRATION") as events:
            await self.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
            await self._migration_done(events)

    async def prepare_load(self, path: Path) -> None:
        """Pass QEMU (started with incoming="defer") a descriptor of path, from
        which load_state(path) loads. path may be empty yet: a save_devices into it
        truncates and rewrites the same file, so the descriptor reads what it wrote,
        and the pause has a QMP round trip less. Raises SystemFailure."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SystemFailure(f"cannot open device state {path}: {e.strerror}") from e
        try:
            try:
                self.qmp.send_fd_scm(fd)  # QEMU takes it with the next command
            except (QMPError, OSError) as e:
                raise SystemFailure(f"cannot pass the device state to QEMU: {e}") from e
            await self.execute("getfd", {"fdname": INCOMING_FD})
        finally:
            os.close(fd)  # QEMU has its own copy now
        self._load_from = path

    async def load_state(self, path: Path, with_ram: bool = False) -> None:
        """Load a device state (save_devices, or save_state with_ram) into a VM
        started with incoming="defer"; it stays paused. QEMU reads the file through
        a descriptor passed to it (prepare_load, unless that was done for path
        already): no shell and cat forked from QEMU in a pause. Raises
        SystemFailure."""
        await self.expect_state(with_ram)
        if self._load_from != path:
            await self.prepare_load(path)
        self._load_from = None
        self.set_tap_held(False)  # the VM's other QEMU is stopped: this one reads
        # QEMU loads the state in its main loop, and says with an event when it
        # has: polling would add a sleep and a round trip to every pause.
        with self.qmp.listener("MIGRATION") as events:
            await self.execute("migrate-incoming", {"uri": f"fd:{INCOMING_FD}"})
            await self._migration_done(events)

    async def expect_state(self, with_ram: bool = False) -> None:
        """Tell QEMU what the state it will load holds (RAM or not); load_state
        does it too, so calling it early, before a pause, saves it a round trip."""
        await self._ignore_shared(not with_ram)

    async def _ignore_shared(self, ignore: bool) -> None:
        # RAM lives in a shared file: the state stream leaves it out (DESIGN §2).
        # "events": QEMU says when a migration's state changes (_migration_done).
        if self._ignoring_shared is ignore:
            return
        caps = [{"capability": "x-ignore-shared", "state": ignore},
                {"capability": "events", "state": True}]  # fmt: skip
        await self.execute("migrate-set-capabilities", {"capabilities": caps})
        self._ignoring_shared = ignore

    async def _migration_done(self, events: EventListener, timeout: float = 60.0) -> None:
        """Until QEMU's MIGRATION event says the migration completed. Raises
        SystemFailure if it failed (an incoming QEMU exits then), OperationTimeout
        if it has not ended in time."""
        assert self.proc is not None
        ended = asyncio.ensure_future(self._migration_ended(events))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({ended, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            ended.cancel()
            exited.cancel()
        if ended in done:
            status = ended.result()
            if status == "completed":
                return
            raise SystemFailure(f"migration {status}: {await self._migration_error()}")
        if exited in done:
            raise SystemFailure(f"QEMU exited with status {self.proc.returncode} while "
                                f"migrating: {self.qemu_error()}")  # fmt: skip
        raise OperationTimeout(f"migration not done in {timeout:g} s")

    async def _migration_error(self) -> str:
        """Why a migration failed, in QEMU's words: query-migrate's, or, since an
        incoming QEMU exits as it fails, its log's last line."""
        assert self.proc is not None
        with contextlib.suppress(SystemFailure):  # gone already: its log says why
            desc = (await self.execute("query-migrate")).get("error-desc")
            if desc:
                return str(desc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5.0)
        return self.qemu_error()

    @staticmethod
    async def _migration_ended(events: EventListener) -> str:
        status = ""
        while status not in ("completed", "failed", "cancelled"):
            data = (await events.get())["data"]  # QEMU's MIGRATION always has one
            status = str(data.get("status", "")) if isinstance(data, dict) else ""
        return status

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove every file.

        Safe to call again, also while a first call is under way.
        """
        async with self._stop_lock:
            if not self._stopped:
                await self._stop(grace)
                self._stopped = True

    async def _stop(self, grace: float) -> None:
        if self.running:
            with contextlib.suppress(QMPError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
            assert self.proc is not None
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.log.warning("QEMU ignored quit; terminating it")
                await run.terminate_async(self.proc)
        await self._close_channels()
        self._remove_files()

    async def _close_channels(self) -> None:
        # disconnect() re-raises the EOF of a QEMU that already quit: expected here.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.qmp.disconnect()
        if self._xenbus_server is not None:
            self._xenbus_server.close()
            await self._xenbus_server.wait_closed()
        if self.channel is not None:
            self.channel.close()

    def _remove_files(self) -> None:
        if self._tap is not None:
            self._tap.remove()
        for path in (
            self.files.qmp_socket,
            self.files.xenbus_socket,
            *self.files.extra.values(),
        ):
            path.unlink(missing_ok=True)
        if self.files.owns_memory:
            self.files.memory.unlink(missing_ok=True)

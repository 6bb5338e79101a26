"""QEMU's command line for a SnowFlock VM, from small pure functions.

The guest's RAM is a file on tmpfs (DESIGN §2 step 1): shared with the file while
the VM runs, so a checkpoint can freeze it; a clone maps a frozen file privately
(share=off), copy-on-write. QEMU is the client of two Unix sockets that sfld
listens on before starting it: QMP, and the XenStore channel (a virtio-serial
port). A guest write made before the host end is connected would be lost, so
QEMU never listens there; reconnect=1 lets a restarted sfld take the sockets over.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from sflib.guest.bus import XENBUS_PORT
from sflib.vm.accel import Accel

NIC_ID = "nic0"  # the card's QMP name (set_link)
VMGENID_ID = "vmgenid0"


@dataclass(frozen=True)
class Nic:
    """A VM's network card on its family's network (sflib.net): a tap sfld opened,
    passed down as fd, and the card's MAC."""

    tap: str
    fd: int
    mac: str


@dataclass(frozen=True)
class VMSpec:
    name: str
    domid: int
    memory_mib: int
    vcpus: int
    accel: Accel
    kernel: Path
    initrd: Path
    append: str = ""  # extra kernel command line
    incoming: str | None = None  # "defer" for a VM restored from a descriptor
    share_memory: bool = True  # False: a private copy-on-write mapping (a clone)
    nic: Nic | None = None


@dataclass(frozen=True)
class VMFiles:
    """Where one VM's runtime files live."""

    memory: Path
    qmp_socket: Path
    xenbus_socket: Path
    console_log: Path
    extra: dict[str, Path] = field(default_factory=dict)
    owns_memory: bool = True  # False: a checkpoint's frozen file, shared with others
    tap_hold: Path | None = None  # the flag its QEMU reads (sflib.net.tap.Hold)


# init_on_free=1: the guest kernel zeroes pages as they are freed, not as they are
# allocated (Debian's kernel zeroes every allocation: INIT_ON_ALLOC_DEFAULT_ON), so
# the free pages sf-clone takes for the avoidance heuristic (sflib.guest.freepages)
# are zero already and taking them writes nothing: no fault on the host for pages
# that are holes in a forked parent's image. The price: the guest zeroes its RAM
# once as it boots, so the host backs all of a running VM's RAM (the images of its
# forks stay sparse: zero pages are punched out of them).
GUEST_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "init_on_free=1")
# Under TCG, QEMU runs a rep stosb or rep movsb one byte an iteration; without ERMS
# the guest kernel clears and copies pages 8 bytes at a time (3x faster, measured).
TCG_CPU = "max,-erms"


def kernel_cmdline(spec: VMSpec) -> str:
    # The same for a VM and its clones: restoring needs the same machine.
    return " ".join(filter(None, [*GUEST_KERNEL_ARGS, spec.append]))


def machine_args(spec: VMSpec, files: VMFiles) -> list[str]:
    size = f"{spec.memory_mib}M"
    share = "on" if spec.share_memory else "off"
    cpu = "host" if spec.accel == Accel.KVM else TCG_CPU
    return [
        "-name", f"{spec.name},debug-threads=on",
        # No configuration section and no description in the device state: it is
        # saved with xen-save-devices-state (sflib.vm.machine), which writes neither.
        # No SATA controller, SMBus, VMware port or TPR-patching ROM (vapic, for
        # old Windows): SnowFlock's guests use none, and each is a device whose
        # state every pause and every clone's start loads (together 2-3 ms of a
        # 6 ms load, measured with QEMU's trace events).
        "-machine", "q35,memory-backend=ram,suppress-vmdesc=on,sata=off,smbus=off,vmport=off",
        "-global", "apic-common.vapic=off",
        "-global", "migration.send-configuration=off",
        "-accel", str(spec.accel),
        "-cpu", cpu,
        "-smp", str(spec.vcpus),
        "-m", size,
        "-object", f"memory-backend-file,id=ram,size={size},mem-path={files.memory},share={share}",
        "-nodefaults", "-no-user-config", "-display", "none",
    ]  # fmt: skip


def device_args(spec: VMSpec, files: VMFiles) -> list[str]:
    # virtio-serial with 2 ports, not 31: QEMU adds an ioeventfd per virtqueue (2 per
    # port, and 2 for control) when a VM starts running, each a memory transaction,
    # and 64 of them made every "cont" take 8-10 ms, in each pause and clone start.
    # Port 0 is kept for a console, so the XenStore port is port 1.
    return [
        "-chardev", f"file,id=console,path={files.console_log},append=on",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={files.qmp_socket},reconnect=1",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vser,max_ports=2",
        "-chardev", f"socket,id=xenbus,path={files.xenbus_socket},reconnect=1",
        "-device", f"virtserialport,bus=vser.0,chardev=xenbus,name={XENBUS_PORT}",
        # From boot, since a clone has its parent's devices: every QEMU of a VM gets
        # a new generation ID, so each clone's kernel (and the parent's, in its new
        # QEMU after a fork) reseeds its RNG as it wakes (DESIGN §2 step 6).
        "-device", f"vmgenid,id={VMGENID_ID},guid=auto",
        *nic_args(spec.nic),
    ]  # fmt: skip


def nic_args(nic: Nic | None) -> list[str]:
    # A clone's card must be the parent's device (same bus address, same features):
    # only the MAC differs, and the parent's state, loaded over it, brings the
    # parent's back until the clone's hook sets its own.
    if nic is None:
        return []
    return ["-netdev", f"tap,id=net0,fd={nic.fd},vhost=off",
            "-device", f"virtio-net-pci,id={NIC_ID},netdev=net0,mac={nic.mac}"]  # fmt: skip


def boot_args(spec: VMSpec) -> list[str]:
    args = ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
            "-append", kernel_cmdline(spec)]  # fmt: skip
    if spec.incoming:  # start paused: the caller loads the state, then continues
        args += ["-S", "-incoming", spec.incoming]
    return args


def qemu_argv(qemu: str, spec: VMSpec, files: VMFiles) -> list[str]:
    return [qemu, *machine_args(spec, files), *device_args(spec, files), *boot_args(spec)]


def show(argv: list[str]) -> str:
    """The command line as a shell would take it (for --show-command)."""
    return shlex.join(argv)

"""Boot the guest image under QEMU (TCG) and use XenStore from inside it over virtio-serial.

The host end of the port is an in-process XenStoreServer; QEMU gets the other end of
a socketpair, already connected, so no guest write can be lost before the host listens.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sflib.image import build as image
from sflib.image.initramfs import CpioWriter, default_compression
from sflib.paths import BUILD_DIR
from sflib.run import terminate_async
from sflib.xenstore.server import XenStoreServer

pytestmark = pytest.mark.vm

QEMU = "qemu-system-x86_64"
XENBUS_PORT = "org.snowflock.xenbus"
DOMID, OTHER = 5, 6
BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core machine

GUEST_TEST = f"""
import errno
from pyxs import Client, PyXSError

def check():
    with Client() as c:  # through sf-guestd, at Xen's xenstored socket
        c.write(b"data/x", b"hello")
        got = c.read(b"data/x")
        if got != b"hello":
            return "read back %r" % got
        try:
            c.write(b"/local/domain/{OTHER}/x", b"evil")
        except PyXSError as e:
            if e.args[0] != errno.EACCES:
                return "writing domain {OTHER}: %r, not EACCES" % (e,)
        else:
            return "writing domain {OTHER}'s node was allowed"
    return None

try:
    reason = check()
except Exception as e:
    reason = "%s: %s" % (type(e).__name__, e)
print("SF-TEST PASS" if reason is None else "SF-TEST FAIL: " + reason, flush=True)
"""


@dataclass
class Console:
    lines: list[str]
    ready_after: float | None = None  # seconds from QEMU start to the ready marker


def initrd_with(base: Path, tmp_path: Path, files: dict[str, str]) -> Path:
    """base with an uncompressed cpio of files in front (the kernel unpacks both)."""
    extra = io.BytesIO()
    writer = CpioWriter(extra)
    for name, text in files.items():
        writer.add_file(name, text.encode(), 0o755)
    writer.close()
    out = tmp_path / "initrd.img"
    with out.open("wb") as f:
        f.write(extra.getvalue())
        with base.open("rb") as b:
            shutil.copyfileobj(b, f)
    return out


def qemu_argv(
    kernel: Path, initrd: Path, command: str, fd: int | None = None, memory: int = 256
) -> list[str]:
    """Boot the guest running command; with fd, a connected socket as the XenStore port."""
    append = f'console=ttyS0 panic=-1 sf.run="{command}"'
    argv = [
        QEMU,
        "-accel", "tcg",
        "-machine", "q35",
        "-m", str(memory),
        "-nographic",
        "-no-reboot",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
    ]  # fmt: skip
    if fd is not None:
        argv += [
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=xb,fd={fd}",
            "-device", f"virtserialport,chardev=xb,name={XENBUS_PORT}",
        ]  # fmt: skip
    return argv


@asynccontextmanager
async def qemu(argv: list[str], fd: int | None) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=() if fd is None else (fd,),
    )
    try:
        yield proc
    finally:
        await terminate_async(proc)  # never leave a QEMU behind


async def read_console(proc: asyncio.subprocess.Process, log: Path) -> Console:
    """Console lines until the guest's verdict or QEMU's exit (logged as they come)."""
    start = time.monotonic()
    console = Console([])
    assert proc.stdout is not None
    with log.open("w") as f:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return console
            line = raw.decode(errors="replace").rstrip("\r\n")
            f.write(line + "\n")
            console.lines.append(line)
            if line.startswith("snowflock-guest: ready") and console.ready_after is None:
                console.ready_after = time.monotonic() - start
            if line.startswith("SF-TEST"):
                return console


async def test_guest_uses_xenstore_over_virtio_serial(
    guest_image: image.Result, tmp_path: Path
) -> None:
    server = XenStoreServer()
    server.local.make_domain(DOMID)
    server.local.make_domain(OTHER)
    host, guest = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host)
    server.attach(DOMID, reader, writer)
    initrd = initrd_with(guest_image.initrd, tmp_path, {"sf-test.py": GUEST_TEST})
    argv = qemu_argv(guest_image.kernel, initrd, "python3 /sf-test.py", guest.fileno())
    log = tmp_path / "console.log"
    try:
        async with qemu(argv, guest.fileno()) as proc:
            guest.close()  # QEMU holds its own copy now
            console = await asyncio.wait_for(read_console(proc, log), BOOT_TIMEOUT)
            await asyncio.wait_for(proc.wait(), 60)  # the guest powers off
        written = server.local.read(f"/local/domain/{DOMID}/data/x")
    finally:
        await server.close()
    verdict = [line for line in console.lines if line.startswith("SF-TEST")]
    assert console.ready_after is not None, f"no ready marker; console in {log}"
    assert verdict == ["SF-TEST PASS"], f"{verdict}; console in {log}"
    assert proc.returncode == 0
    assert written == b"hello"  # the relative path resolved under the guest's domain
    print(f"boot to ready: {console.ready_after:.1f} s")  # shown with pytest -s


def test_manifest_records_modules(guest_image: image.Result) -> None:
    manifest = image.read_manifest(guest_image.out)
    assert manifest["modules"], "no kernel modules recorded"
    assert os.path.getsize(guest_image.initrd) > 1 << 20


POVRAY_SCENE = (
    "camera{location<0,0,-3> look_at 0} light_source{<2,4,-3> color rgb 1}"
    " sphere{0,1 pigment{color rgb<1,0,0>}}"
)
POVRAY_TEST = f"""#!/bin/sh
cd /tmp
echo '{POVRAY_SCENE}' >s.pov
if povray +Is.pov +Os.png +W64 +H48 -D >povray.log 2>&1 && grep -q PNG s.png; then
    echo "SF-TEST PASS"
else
    tail -5 povray.log
    echo "SF-TEST FAIL: povray did not render s.png"
fi
"""


@pytest.fixture(scope="module")
def povray_image() -> image.Result:
    """An image with povray (the render farm's workload), in build/image-povray/."""
    opts = image.Options(
        out=BUILD_DIR / "image-povray",
        cache=image.default_cache(),
        hooks=image.default_hooks(),
        compression=default_compression(),
        include=("povray",),
    )
    return image.build(opts)


async def test_included_povray_renders_in_the_guest(
    povray_image: image.Result, tmp_path: Path
) -> None:
    initrd = initrd_with(povray_image.initrd, tmp_path, {"sf-povray.sh": POVRAY_TEST})
    argv = qemu_argv(povray_image.kernel, initrd, "/sf-povray.sh", memory=512)
    log = tmp_path / "console.log"
    async with qemu(argv, None) as proc:
        console = await asyncio.wait_for(read_console(proc, log), BOOT_TIMEOUT)
    verdict = [line for line in console.lines if line.startswith("SF-TEST")]
    assert verdict == ["SF-TEST PASS"], f"{verdict}; console in {log}"

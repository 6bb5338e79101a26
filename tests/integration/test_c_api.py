"""The C and C++ APIs (c/snowflock.h, c/snowflock.hpp) in a real guest: build/sf-ctest
clones the VM and joins, clones from a checkpoint and joins, clones and kills (see
c/sf-ctest.c); build/sf-cxxtest clones with a snowflock::Ticket, its clones report
their IDs, the parent joins (c/sf-cxxtest.cpp); build/sf-cdrive, linked to
libsnowflock.so, runs against the image's own copy of the library.

The image holds no test programs, so the test boots the image's kernel with its initrd
behind an uncompressed cpio holding them and /usr/bin/sf-c-suite, which runs them in
turn (the kernel unpacks both). sf-ctest prints its verdict on the console: "C-TEST
PASS" or "C-TEST FAIL: why"; sf-cxxtest "CXX-TEST PASS" or "CXX-TEST FAIL: why".
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sflib.image import build as image
from sflib.image.initramfs import CpioWriter
from tests.integration.conftest import ROOT, Host

pytestmark = pytest.mark.vm

PROGRAMS = ("sf-ctest", "sf-cxxtest", "sf-cdrive")  # in build/
VERDICT_TIMEOUT = 300.0  # boot, four forks under TCG
LIB = "/usr/lib/x86_64-linux-gnu"
SHIPPED = (f"{LIB}/libsnowflock.so.0", f"{LIB}/libsnowflock.so", f"{LIB}/libsnowflock.a",
           "/usr/include/snowflock.h", "/usr/include/snowflock.hpp")  # fmt: skip
# Which way the library reaches sfld (through sf-guestd if it serves), each program in
# turn, then what the image ships. sf-cdrive is dynamically linked: it
# runs only with the image's libsnowflock.so.0 (it prints "ERR 3 0": no such ticket).
SUITE = f"""#!/bin/sh
[ -S /run/xenstored/socket ] && echo C-TRANSPORT agent || echo C-TRANSPORT port
sf-ctest
sf-cxxtest
echo C-DRIVE $(sf-cdrive join t999-nosuch)
echo C-BENCH $(sf-cdrive bench 10 t999-nosuch 2>/dev/null)
for f in {" ".join(SHIPPED)}; do [ -e $f ] && echo C-SHIPPED $f; done
echo C-SUITE DONE
"""


@pytest.fixture(scope="module")
def test_programs() -> dict[str, Path]:
    """The test programs, (re)built from c/ by make: sf-ctest and sf-cxxtest static, so
    they run in the guest whatever its libraries; sf-cdrive against libsnowflock.so."""
    targets = [f"build/{name}" for name in PROGRAMS]
    out = subprocess.run(["make", "-C", str(ROOT), *targets], capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"make {' '.join(targets)} failed:\n{out.stdout}{out.stderr}"
    return {name: ROOT / "build" / name for name in PROGRAMS}


@pytest.fixture
def ctest_image(guest_image: image.Result, test_programs: dict[str, Path],
                tmp_path: Path) -> Path:  # fmt: skip
    """An image folder: the guest image with the test programs added to its initrd."""
    folder = tmp_path / "image"
    folder.mkdir()
    extra = io.BytesIO()
    writer = CpioWriter(extra)
    for name in ("usr", "usr/bin"):  # this archive is unpacked first: make its dirs
        writer.add_dir(name)
    for name, path in test_programs.items():
        writer.add_file(f"usr/bin/{name}", path.read_bytes(), 0o755)
    writer.add_file("usr/bin/sf-c-suite", SUITE.encode(), 0o755)
    writer.close()
    with (folder / "initrd.img").open("wb") as f:
        f.write(extra.getvalue())
        with Path(guest_image.initrd).open("rb") as base:
            shutil.copyfileobj(base, f)
    shutil.copy(guest_image.kernel, folder / "vmlinuz")
    shutil.copy(guest_image.out / "manifest.json", folder / "manifest.json")
    return folder


def console_until(host: Host, name: str, marker: str, timeout: float) -> str:
    """The VM's console once it shows marker (or whatever it shows at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = host.tool("sf-vm", "logs", name).stdout
        if marker in text or time.monotonic() > deadline:
            return text
        time.sleep(2)


def lines(console: str, tag: str) -> list[list[str]]:
    """The words after tag on each console line that starts with it."""
    return [line.split()[1:] for line in console.splitlines() if line.split()[:1] == [tag]]


def test_c_and_cxx_programs_clone_checkpoint_join_and_kill(host: Host, ctest_image: Path) -> None:
    host.vm_json("run", "--name", "ctest", "--image", str(ctest_image),
                 "--append", 'sf.run="sf-c-suite; sleep 100000"', "--wait-ready")  # fmt: skip
    console = console_until(host, "ctest", "C-SUITE DONE", VERDICT_TIMEOUT)
    report = f"console:\n{console}\nsfld log:\n{host.log.read_text()[-6000:]}"
    assert [line.strip() for line in console.splitlines() if line.startswith("C-TEST")] == [
        "C-TEST PASS"
    ], report
    assert lines(console, "C-JOIN") == [["1", "exited", "11"], ["2", "exited", "12"]], report
    assert lines(console, "C-CKPT-JOIN") == [["1", "exited", "21"], ["2", "exited", "22"]]
    assert lines(console, "C-KILLED") == [["1"]]
    assert [line.strip() for line in console.splitlines() if line.startswith("CXX-TEST")] == [
        "CXX-TEST PASS"
    ], report
    # Each clone reports its ID as its exit status (ID + 30): its console is its own VM's.
    assert lines(console, "CXX-JOIN") == [["1", "exited", "31"], ["2", "exited", "32"]]
    assert lines(console, "C-DRIVE") == [["ERR", "3", "0"]], report
    assert lines(console, "C-BENCH")[0][0] == "MEAN-MS", report  # a round trip from C
    assert [line[0] for line in lines(console, "C-SHIPPED")] == list(SHIPPED), report
    assert [vm["name"] for vm in host.vm_json("ls")] == ["ctest"]  # the clones are gone
    host.tool("sf-vm", "stop", "ctest")
    assert host.leftovers() == []
    print("\n".join(line for line in console.splitlines() if "C-" in line or "CXX-" in line))

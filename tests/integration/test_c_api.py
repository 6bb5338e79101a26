"""The C API (c/snowflock.h) in a real guest: build/sf-ctest clones the VM and joins,
clones from a checkpoint and joins, clones and kills (see c/sf-ctest.c).

The image holds no C programs, so the test boots the image's kernel with its initrd
behind an uncompressed cpio holding /usr/bin/sf-ctest (the kernel unpacks both).
sf-ctest prints its verdict on the console: "C-TEST PASS" or "C-TEST FAIL: why".
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

CTEST = ROOT / "build/sf-ctest"
VERDICT_TIMEOUT = 240.0  # boot, a dozen runs of Python tools, three forks under TCG


@pytest.fixture(scope="module")
def ctest_binary() -> Path:
    """build/sf-ctest, (re)built from c/ by make: a static binary, so it runs in the guest."""
    out = subprocess.run(["make", "-C", str(ROOT), "build/sf-ctest"], capture_output=True,
                         text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, f"make build/sf-ctest failed:\n{out.stdout}{out.stderr}"
    return CTEST


@pytest.fixture
def ctest_image(guest_image: image.Result, ctest_binary: Path, tmp_path: Path) -> Path:
    """An image folder: the guest image with /usr/bin/sf-ctest added to its initrd."""
    folder = tmp_path / "image"
    folder.mkdir()
    extra = io.BytesIO()
    writer = CpioWriter(extra)
    for name in ("usr", "usr/bin"):  # this archive is unpacked first: make its dirs
        writer.add_dir(name)
    writer.add_file("usr/bin/sf-ctest", ctest_binary.read_bytes(), 0o755)
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


def test_c_program_clones_checkpoints_joins_and_kills(host: Host, ctest_image: Path) -> None:
    host.vm_json("run", "--name", "ctest", "--image", str(ctest_image),
                 "--append", 'sf.run="sf-ctest; sleep 100000"', "--wait-ready")  # fmt: skip
    console = console_until(host, "ctest", "C-TEST", VERDICT_TIMEOUT)
    report = f"console:\n{console}\nsfld log:\n{host.log.read_text()[-6000:]}"
    assert [line.strip() for line in console.splitlines() if line.startswith("C-TEST")] == [
        "C-TEST PASS"
    ], report
    assert lines(console, "C-JOIN") == [["1", "exited", "11"], ["2", "exited", "12"]], report
    assert lines(console, "C-CKPT-JOIN") == [["1", "exited", "21"], ["2", "exited", "22"]]
    assert lines(console, "C-KILLED") == [["1"]]
    assert [vm["name"] for vm in host.vm_json("ls")] == ["ctest"]  # the clones are gone
    host.tool("sf-vm", "stop", "ctest")
    assert host.leftovers() == []
    print("\n".join(line for line in console.splitlines() if "C-" in line))  # pytest -s

"""The Java API (java/, snowflock.3java) in a real guest: the image with a JVM
(sf-image build --jvm, build/image-jvm), and build/snowflock-test.jar's ForkTest in it:
a ticket for 2, a fork, each clone prints its ID and exits with 40 + ID, the parent
joins and checks their statuses; then a join of an unknown ticket (NOT_FOUND), an exit
in the parent (WRONG_STATE) and ten timed round trips; and a call on the port that the
agent holds (UNREACHABLE).

The test jar and /usr/bin/sf-java-suite, which also times the JVM's start, go into
the image as an overlay (sflib.image.overlay). The guest prints "JAVA-TEST PASS" or
"JAVA-TEST FAIL: why" on its console.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib.image import build as image
from sflib.image import jvm
from sflib.image.initramfs import default_compression
from sflib.image.overlay import overlay
from tests.integration.conftest import ROOT, Host, running_host
from tests.integration.test_c_api import console_until, lines

pytestmark = pytest.mark.vm

MEMORY_MIB = 512
VERDICT_TIMEOUT = 600.0  # boot, four JVMs and a fork under TCG
TEST_JAR = "usr/share/java/snowflock-test.jar"
CLASSPATH = f"/{jvm.GUEST_JAR}:/{TEST_JAR}"
SHIPPED = ("/usr/bin/java", f"/{jvm.GUEST_JAR}", f"/{jvm.GUEST_HOME}/lib/server/classes.jsa")
# The JVM's start, three times (a class of the test jar that prints one line), timed by
# the guest's Python; whether the class-data sharing archive maps; then the test.
SUITE = f"""#!/bin/sh
echo JAVA-MEM $(grep MemAvailable /proc/meminfo)
echo JAVA-VERSION $(java -version 2>&1 | head -n 1)
java -Xshare:on -version >/dev/null 2>&1 && echo JAVA-CDS on || echo JAVA-CDS off
python3 -c '
import subprocess, time
for _ in range(3):
    t = time.perf_counter()
    subprocess.run(["java", "-cp", "{CLASSPATH}", "org.snowflock.test.Drive", "start"],
                   check=True, capture_output=True)
    print("JAVA-START-MS %.0f" % ((time.perf_counter() - t) * 1000), flush=True)
'
java -cp {CLASSPATH} org.snowflock.test.ForkTest 10
echo JAVA-PORT $(SF_XENBUS=/dev/virtio-ports/org.snowflock.xenbus \
    java -cp {CLASSPATH} org.snowflock.test.Drive ticket 1 2>/dev/null)
for f in {" ".join(SHIPPED)}; do [ -e $f ] && echo JAVA-SHIPPED $f; done
echo JAVA-SUITE DONE
"""


@pytest.fixture(scope="module")
def jvm_image() -> image.Result:
    """The image with a JVM, built into build/image-jvm (once while its inputs hold),
    after make java built the jars it ships and the test uses."""
    out = subprocess.run(["make", "-C", str(ROOT), "java", "build/libsnowflock.so",
                          "build/libsnowflock.a"], capture_output=True, text=True, timeout=600,
                         check=False)  # fmt: skip
    assert out.returncode == 0, f"make java failed:\n{out.stdout}{out.stderr}"
    opts = image.Options(out=image.default_out(with_jvm=True), cache=image.default_cache(),
                         hooks=image.default_hooks(), compression=default_compression(),
                         jvm=True)  # fmt: skip
    return image.build(opts)


@pytest.fixture
def java_host(jvm_image: image.Result, tmp_path: Path) -> Iterator[tuple[Host, Path]]:
    """A host serving the JVM image, and an image folder with the test jar added."""
    folder = overlay(jvm_image.out, tmp_path / "image", {
        f"/{TEST_JAR}": ((ROOT / "build/snowflock-test.jar").read_bytes(), 0o644),
        "/usr/bin/sf-java-suite": (SUITE.encode(), 0o755),
    })  # fmt: skip
    with running_host(jvm_image) as host:
        yield host, folder


@pytest.mark.timeout(1200)
def test_java_program_clones_and_joins(java_host: tuple[Host, Path]) -> None:
    host, folder = java_host
    host.vm_json("run", "--name", "jtest", "--image", str(folder), "--memory", str(MEMORY_MIB),
                 "--append", 'sf.run="sf-java-suite; sleep 100000"', "--wait-ready")  # fmt: skip
    console = console_until(host, "jtest", "JAVA-SUITE DONE", VERDICT_TIMEOUT)
    report = f"console:\n{console}\nsfld log:\n{host.log.read_text()[-6000:]}"
    assert [line.strip() for line in console.splitlines() if line.startswith("JAVA-TEST")] == [
        "JAVA-TEST PASS"
    ], report
    assert lines(console, "JAVA-TICKET") == [["2", "2"]], report
    # Each clone reported its ID as its exit status (40 + ID): its console is its own VM's.
    assert lines(console, "JAVA-JOIN") == [["1", "exited", "41"], ["2", "exited", "42"]], report
    assert lines(console, "JAVA-NOTFOUND") == [["3", "NotFoundError"]], report
    assert lines(console, "JAVA-WRONGSTATE") == [["4", "WrongStateError"]], report
    assert lines(console, "JAVA-BENCH")[0][0] == "MEAN-MS", report
    # The agent holds the port, which admits one opener: the binding says unreachable.
    assert lines(console, "JAVA-PORT") == [["ERR", "5", "-"]], report
    assert len(lines(console, "JAVA-START-MS")) == 3, report
    assert lines(console, "JAVA-CDS") == [["on"]], report
    assert [line[0] for line in lines(console, "JAVA-SHIPPED")] == list(SHIPPED), report
    assert [vm["name"] for vm in host.vm_json("ls")] == ["jtest"]  # the clones are gone
    host.tool("sf-vm", "stop", "jtest")
    assert host.leftovers() == []
    print("\n".join(line for line in console.splitlines() if line.startswith("JAVA-")))

"""sf-testcluster, as an admin runs it: a master and two hosts in network
namespaces, found by sf-cluster, gone without a trace after SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sflib.image import build as image

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture
def work() -> Iterator[Path]:
    """The cluster's folder, removed after the test whether it passed or not."""
    path = Path(tempfile.mkdtemp(prefix="sfc-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def test_a_cluster_comes_up_is_seen_and_goes_away(guest_image: image.Result, work: Path) -> None:
    before = netns()
    r, w = os.pipe()
    proc = subprocess.Popen([str(ROOT / "bin/sf-testcluster"), "run", "--hosts", "2", "--dir",
                             str(work), "--accel", "tcg", "--image-dir", str(guest_image.out),
                             "--json", "--ready-fd", str(w)], pass_fds=[w],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            assert ready.readline() == b"\n", proc.stderr.read().decode()  # type: ignore[union-attr]
        described = json.loads(_read_json(proc))
        assert [h["host"] for h in described["hosts"]] == ["h1", "h2"]
        env = {**os.environ, "SF_ROOTDIR": described["hosts"][0]["root"]}
        hosts = json.loads(subprocess.run([str(ROOT / "bin/sf-cluster"), "hosts", "--json"],
                                          env=env, capture_output=True, text=True, timeout=60,
                                          check=True).stdout)  # fmt: skip
        assert sorted((h["host"], h["alive"]) for h in hosts) == [("h1", True), ("h2", True)]
        assert len(netns() - before) == 4  # underlay, master, two hosts
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
    assert status == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
    assert netns() == before
    leftover = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, check=False)
    assert leftover.returncode == 1, leftover.stdout  # no daemon of it runs


def _read_json(proc: subprocess.Popen[bytes]) -> str:
    """The JSON description sf-testcluster printed before it became ready."""
    assert proc.stdout is not None
    text = b""
    while not text.rstrip().endswith(b"}") or text.count(b"{") != text.count(b"}"):
        line = proc.stdout.readline()
        assert line, "sf-testcluster printed no description"
        text += line
    return text.decode()

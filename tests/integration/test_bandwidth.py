"""sfld --bandwidth, with real packets (issue 16): a real VM behind its family's
router sends to and receives from a server outside its host, once on an sfld
without a limit (the baseline, in the same test), then on sflds with --bandwidth
(either router); the limited transfers take as long as the limit says, each way."""

from __future__ import annotations

import contextlib
import re
import select
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sflib import run
from sflib.image import build as image
from tests.integration.conftest import GO, Host, boot, console, running_host

pytestmark = [pytest.mark.vm, pytest.mark.slow]

RATE_MBIT = 4
BYTES_PER_S = RATE_MBIT * 1_000_000 // 8
SIZE = 3_000_000  # bytes: 6 s at RATE_MBIT
# The outside: a namespace beside the host's, on a veth (the host NATs the family to it).
HOST_IP, OUTSIDE_IP = "198.51.100.1", "198.51.100.2"
SINK, SOURCE = 9000, 9001  # the outside's ports: it receives, it sends
READY_WAIT = 60.0

# In the outside: SINK answers "BYTES SECONDS" once its client has shut its side
# (timed from the connection on), SOURCE sends argv[1] bytes and closes.
SERVER = r"""
import socket, sys, threading, time
size = int(sys.argv[1])
def sink(conn):
    with conn:
        start, got = time.monotonic(), 0
        while data := conn.recv(1 << 16):
            got += len(data)
        conn.sendall(f"{got} {time.monotonic() - start:.3f}\n".encode())
def source(conn):
    with conn:
        conn.sendall(bytes(size))
def serve(listener, job):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=job, args=(conn,), daemon=True).start()
pairs = [(socket.create_server(("0.0.0.0", p)), job) for p, job in ((9000, sink), (9001, source))]
for listener, job in pairs:
    threading.Thread(target=serve, args=(listener, job), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# In the guest, once the host says go: UP (what the outside received, how long it
# took it) and DOWN (bytes received, seconds), timed where the bytes arrive.
GUEST = (
    GO
    + f"""
python3 -c '
import socket, time
o, n = "{OUTSIDE_IP}", {SIZE}
with socket.create_connection((o, {SINK}), timeout=60) as s:
    s.sendall(bytes(n)); s.shutdown(socket.SHUT_WR)
    print("UP", s.makefile().readline().strip(), flush=True)
with socket.create_connection((o, {SOURCE}), timeout=60) as s:
    t, got = time.monotonic(), 0
    while b := s.recv(65536):
        got += len(b)
    print("DOWN", got, "%.3f" % (time.monotonic() - t), flush=True)
'
echo SF-DONE
"""
)


@contextlib.contextmanager
def outside(host: Host) -> Iterator[None]:
    """A namespace on a veth from the host's, serving SINK and SOURCE."""
    assert host.netns is not None
    ns = f"{host.netns}o"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    server = None
    try:
        for cmd in (["-n", host.netns, "link", "add", "sfout", "type", "veth", "peer", "name",
                     "eth0", "netns", ns],
                    ["-n", host.netns, "addr", "add", f"{HOST_IP}/24", "dev", "sfout"],
                    ["-n", host.netns, "link", "set", "sfout", "up"],
                    ["-n", ns, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0"],
                    ["-n", ns, "link", "set", "eth0", "up"],
                    ["-n", ns, "link", "set", "lo", "up"]):  # fmt: skip
            subprocess.run(["ip", *cmd], check=True, capture_output=True, timeout=30)
        server = subprocess.Popen([*run.in_netns(ns), sys.executable, "-c", SERVER, str(SIZE)],
                                  stdout=subprocess.PIPE)  # fmt: skip
        assert server.stdout is not None
        readable, _, _ = select.select([server.stdout], [], [], READY_WAIT)
        assert readable and server.stdout.readline() == b"ready\n", "no server outside"
        yield
    finally:
        if server is not None:
            run.stop(server, timeout=10)
        subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=30)


def transfer_seconds(guest_image: image.Result, *sfld_args: str) -> tuple[float, float]:
    """How long a guest on an sfld with sfld_args takes to send SIZE bytes to the
    outside, and to receive as many from it."""
    with running_host(guest_image, *sfld_args) as h, outside(h):
        info = boot(h, "mover", GUEST)
        h.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go", "1")
        out = console(h, "mover")
        h.tool("sf-vm", "stop", "mover")
    up = re.search(r"^UP (\d+) ([\d.]+)$", out, re.M)
    down = re.search(r"^DOWN (\d+) ([\d.]+)$", out, re.M)
    assert up and down, out[-3000:]
    assert int(up.group(1)) == int(down.group(1)) == SIZE, out[-3000:]
    return float(up.group(2)), float(down.group(2))


def test_bandwidth_limits_a_family_each_way_to_the_outside(guest_image: image.Result) -> None:
    """Both ways the router can run (distributed: the host's nftables and tc; central:
    a router namespace's tc), against one baseline without a limit."""
    free_up, free_down = transfer_seconds(guest_image)
    print(f"unlimited: up {free_up} s, down {free_down} s")
    # The baseline shows the guest can go well past the limit, so a limit is seen.
    assert SIZE / max(free_up, free_down) > 3 * BYTES_PER_S, (free_up, free_down)
    limit_s = SIZE / BYTES_PER_S
    for mode in ("distributed", "central"):
        up, down = transfer_seconds(guest_image, "--router", mode, "--bandwidth", str(RATE_MBIT))
        print(f"{mode}, {RATE_MBIT} Mbit/s: up {up} s, down {down} s")
        # Distributed, the way out is policed by nftables, whose bucket holds a second's
        # worth and a burst to begin with; the rest is shaped by tc. Margins for a
        # loaded machine.
        least_up = (SIZE - 1.2 * BYTES_PER_S) / BYTES_PER_S if mode == "distributed" else limit_s
        assert up > 0.7 * least_up and down > 0.7 * limit_s, (mode, up, down)
        # It limits, it does not starve: within four times the limit's time.
        assert up < 4 * limit_s and down < 4 * limit_s, (mode, up, down)

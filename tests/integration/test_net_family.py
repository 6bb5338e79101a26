"""Family networks on real VMs (issue 6): every VM has a card on its family's private
network; a clone wakes with its link down and its parent's identity, takes its own
in hooks.d/clone-post.d/10-network, and only then talks. Across hosts, families
are apart, and the router admits from the outside only what the policy says."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator

import pytest

from sflib.image import build as image
from sflib.net import fabric, router
from sflib.net.identity import identity, mac
from tests.integration.conftest import (
    GO,
    Host,
    boot,
    console,
    processes,
    running_host,
)
from tests.integration.test_cluster import wait_for

pytestmark = pytest.mark.vm

ADDRESS = "ip -4 -o addr show dev eth0 | awk '{print $4}'"

# The parent reports its address, makes two clones, and waits for their reports;
# each clone reports its address and MAC, pings its parent and its sibling, renews
# its DHCP lease, and waits for "go" before it exits.
FAMILY = (
    f"""
me=$({ADDRESS}); echo "ADDR $me"
base=${{me%.*}}
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  until [ "$(sf-share ls "$t" | grep -c report)" = 2 ]; do sleep 1; done
  for k in 1 2; do echo "REPORT $k $(sf-share get "$t" $k report)"; done
  for k in 1 2; do
    ping -c 1 -W 3 "$base.$((2 + k))" >/dev/null && echo "PING $k ok" || echo "PING $k no"
  done
  ip neigh | sed 's/^/NEIGH /'
  echo SF-DONE
  sf-join "$t" >/dev/null
else
  other=$((3 - id))
  p=no; ping -c 1 -W 3 "$base.2" >/dev/null && p=ok
  s=no; ping -c 1 -W 3 "$base.$((2 + other))" >/dev/null && s=ok
  was=$({ADDRESS})
  lease=$(udhcpc -i eth0 -n -q -t 4 -T 1 2>&1 | sed -n 's/.*lease of \\([0-9.]*\\) obtained.*/\\1/p')
  echo "$was $(cat /sys/class/net/eth0/address) parent=$p sibling=$s lease=$lease" \\
    "now=$({ADDRESS})" | sf-share put report
  """
    + GO
    + """
  sf-exit 0
fi
"""
)


@pytest.fixture
def host(guest_image: image.Result) -> Iterator[Host]:
    with running_host(guest_image) as h:
        yield h


def clone_domains(host: Host) -> dict[int, int]:
    return {v["clone_id"]: v["domid"] for v in host.vm_json("ls") if v["clone_id"] is not None}


def learned_on(host: Host, tap: str) -> set[str]:
    """The MACs the bridge learned behind a tap: who ever spoke through it."""
    out = subprocess.run(["bridge", "-n", str(host.netns), "fdb", "show", "dev", tap],
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return {line.split()[0] for line in out.stdout.splitlines() if "permanent" not in line}


def test_clones_take_their_ids_identity_before_they_talk(host: Host) -> None:
    boot(host, "fam", FAMILY)
    out = console(host, "fam")
    parent = identity(1, 0)
    assert f"ADDR {parent.ip}" in out
    for k in (1, 2):
        me = identity(1, k)
        address = me.ip.split("/")[0]
        report = f"REPORT {k} {me.ip} {me.mac} parent=ok sibling=ok lease={address} now={me.ip}"
        assert report in out, out[-3000:]
        assert f"PING {k} ok" in out
        # The parent knows each clone by the clone's own MAC.
        assert re.search(rf"^NEIGH {address} .*lladdr {me.mac}", out, re.M)
    # sfld published each member's identity in its XenStore domain.
    for k, domid in clone_domains(host).items():
        raw = host.xenstore("xenstore-read", f"/local/domain/{domid}/snowflock/network").stdout
        assert json.loads(raw) == {**identity(1, k).to_json()}
        # Its card's link was down until it had its own MAC: the parent's never
        # went out through its tap.
        assert mac(1, 0) not in learned_on(host, fabric.tap_name(1, k))
        assert mac(1, k) in learned_on(host, fabric.tap_name(1, k))
    for domid in clone_domains(host).values():
        host.xenstore("xenstore-write", f"/local/domain/{domid}/go", "1")
    host.tool("sf-vm", "stop", "fam")
    wait_for("the family's network to go", lambda: not fabric.leftovers(host.netns))
    assert router.leftovers(host.netns) == []


def test_a_crashed_sflds_network_is_removed_when_it_starts_again(host: Host) -> None:
    boot(host, "fam", FAMILY)
    console(host, "fam")
    assert fabric.leftovers(host.netns) == [1] and router.leftovers(host.netns) == [1]
    host.stop(signal.SIGKILL)
    assert fabric.leftovers(host.netns) == [1]  # nobody removed them
    assert processes(f"dnsmasq .*{host.root}/")  # it outlives sfld
    host.start()
    assert fabric.leftovers(host.netns) == [] and router.leftovers(host.netns) == []
    assert "removed the networks of families 1" in host.log.read_text()
    assert not processes(f"dnsmasq .*{host.root}/")

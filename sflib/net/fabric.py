"""A family's layer-2 network on one host: a Linux bridge, joined to the bridges of
the family's other hosts by a VXLAN device with the family's VNI over the hosts'
underlay. Without multicast on the underlay, each peer host is an all-zeros entry in
the VXLAN forwarding table (head-end replication); the bridge learns the rest.

The bridge is the family's gateway on this host: the gateway MAC and the subnet's
.1 (the same on every host). Layer-2 isolation: an nftables table of the bridge
family drops every frame whose source MAC lies outside the family's range
(sflib.net.identity) as it enters from a member's tap or from another host, and as
it leaves towards either; and the gateway's frames never cross to another host. A
member cannot speak as anyone else, and nothing from outside reaches a member.

Names carry the family number so that a restarted sfld can find and remove what a
dead one left: sfb<F> (bridge), sfx<F> (VXLAN), sft<F>-<ID> (members' taps), table
bridge sf_f<F>. netns runs the commands in that network namespace (the tests'
hosts); None: in sfld's own.

Every command is awaited (sflib.net.commands): sfld's loop, and with it the
host's heartbeats, goes on while ip, bridge and nft run.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from sflib import run
from sflib.errors import CommandFailed
from sflib.net import commands, identity

log = logging.getLogger(__name__)

VXLAN_PORT = 4789
VXLAN_MTU = 1450  # a 1500-byte underlay less VXLAN's 50 bytes: what members must use
_OURS = re.compile(r"^sf[bx](\d+)$")


def bridge_name(family: int) -> str:
    return f"sfb{identity.check_family(family)}"


def vxlan_name(family: int) -> str:
    return f"sfx{identity.check_family(family)}"


def tap_name(family: int, clone_id: int) -> str:
    """A member's tap: the name says whose it is, which the filter relies on."""
    return f"sft{identity.check_family(family)}-{clone_id}"


def table_name(family: int) -> str:
    return f"sf_f{identity.check_family(family)}"


def isolation_rules(family: int) -> str:
    """The family's nftables table (pure): foreign source MACs go nowhere."""
    prefix, mask = identity.mac_prefix(family)
    foreign = f"ether saddr & {mask} != {prefix} counter drop"
    ports = (vxlan_name(family), f"sft{family}-*")
    rules = "".join(f"        {way} \"{port}\" {foreign}\n"
                    for way in ("iifname", "oifname") for port in ports)  # fmt: skip
    # Every host is its members' gateway, with the same MAC and address: its frames
    # stay on the host, so each host answers its own members only.
    gateway = f"ether saddr {identity.gateway_mac(family)} counter drop"
    rules += "".join(f"        {way} \"{vxlan_name(family)}\" {gateway}\n"
                     for way in ("iifname", "oifname"))  # fmt: skip
    # What the host itself sends through the bridge (its dnsmasq's answers above
    # all) goes through output, not forward: without this, a host refused (DHCPNAK)
    # the members of other hosts, whose requests reach it over the VXLAN.
    own = f'        oifname "{vxlan_name(family)}" {gateway}\n'
    return (f"table bridge {table_name(family)} {{\n"
            "    chain forward {\n"
            "        type filter hook forward priority 0; policy accept;\n"
            f"{rules}    }}\n"
            "    chain output {\n"
            "        type filter hook output priority 0; policy accept;\n"
            f"{own}    }}\n}}\n")  # fmt: skip


@dataclass
class FamilyFabric:
    """The family network of one host. Use create(), join(), attach(), destroy()."""

    family: int
    underlay_ip: str | None  # this host's address on the underlay; None: a host alone
    netns: str | None = None
    peers: set[str] = field(default_factory=set)

    @property
    def bridge(self) -> str:
        return bridge_name(self.family)

    @property
    def vxlan(self) -> str:
        return vxlan_name(self.family)

    async def create(self) -> None:
        """The bridge and the VXLAN device, up. Raises CommandFailed (nothing left)."""
        gateway = f"{identity.subnet(self.family).network_address + 1}/{identity.PREFIX}"
        batch = [f"link add {self.bridge} address {identity.gateway_mac(self.family)} "
                 "type bridge"]  # fmt: skip
        if self.underlay_ip is not None:
            batch += [f"link add {self.vxlan} type vxlan id {identity.vni(self.family)} "
                      f"local {self.underlay_ip} dstport {VXLAN_PORT} nolearning",
                      f"link set {self.vxlan} master {self.bridge} up"]  # fmt: skip
        batch += [f"link set {self.bridge} up", f"addr add {gateway} dev {self.bridge}"]
        try:
            # One ip for all, then nft: its table loaded while the bridge was being
            # made filtered nothing the bridge forwarded, in one run out of three
            # (a spoofed MAC went through; test_net_fabric).
            await commands.run(["ip", *run.netns_option(self.netns), "-batch", "-"],
                               timeout=30, input="".join(f"{c}\n" for c in batch))  # fmt: skip
            await self._nft("-f", "-", input=isolation_rules(self.family))
        except CommandFailed:
            await self.destroy()
            raise
        if self.underlay_ip is None:
            log.info("family %d: bridge %s", self.family, self.bridge)
        else:
            log.info("family %d: bridge %s, VXLAN %s (VNI %d)", self.family, self.bridge,
                     self.vxlan, identity.vni(self.family))  # fmt: skip

    async def join(self, peer_ip: str) -> None:
        """Flood the family's broadcasts and unknown frames to another host too.
        Raises CommandFailed."""
        if peer_ip in self.peers or peer_ip == self.underlay_ip or self.underlay_ip is None:
            return
        self.peers.add(peer_ip)  # first: a second join of the same peer meanwhile is none
        try:
            await self._bridge("fdb", "append", "00:00:00:00:00:00", "dev", self.vxlan,
                               "dst", peer_ip)  # fmt: skip
        except BaseException:
            self.peers.discard(peer_ip)
            raise

    async def attach(self, ifname: str) -> None:
        """Put an interface (a VM's tap) on the family's bridge. Raises CommandFailed."""
        await self._ip("link", "set", ifname, "master", self.bridge, "up")

    async def destroy(self) -> None:
        """Remove the devices (attached taps fall off the bridge) and the table;
        never raises."""
        present = await links(self.netns)
        for dev in (self.vxlan, self.bridge):
            if dev in present:
                try:
                    await self._ip("link", "del", dev)
                except CommandFailed as e:
                    log.warning("cannot remove %s: %s", dev, e)
        if self.family in await tables(self.netns):
            try:
                await self._nft("delete", "table", "bridge", table_name(self.family))
            except CommandFailed as e:
                log.warning("cannot remove table %s: %s", table_name(self.family), e)
        self.peers.clear()

    async def dropped(self) -> int:
        """Frames the isolation rules dropped so far."""
        out = await commands.run([*run.in_netns(self.netns), "nft", "-j", "list", "table",
                                  "bridge", table_name(self.family)], timeout=30)  # fmt: skip
        items = json.loads(out.stdout)["nftables"]
        return sum(e["counter"]["packets"] for item in items if "rule" in item
                   for e in item["rule"]["expr"] if "counter" in e)  # fmt: skip

    async def _ip(self, *argv: str) -> None:
        await commands.run(["ip", *run.netns_option(self.netns), *argv], timeout=30)

    async def _bridge(self, *argv: str) -> None:
        await commands.run(["bridge", *run.netns_option(self.netns), *argv], timeout=30)

    async def _nft(self, *argv: str, input: str | None = None) -> None:
        await commands.run([*run.in_netns(self.netns), "nft", *argv], timeout=30, input=input)


async def links(netns: str | None = None) -> list[str]:
    """The names of the network interfaces (of netns)."""
    out = await commands.run(["ip", *run.netns_option(netns), "-j", "link", "show"],
                             timeout=30)  # fmt: skip
    return [str(link["ifname"]) for link in json.loads(out.stdout or "[]")]


async def tables(netns: str | None = None) -> list[int]:
    """The families whose nftables tables are here."""
    out = await commands.run([*run.in_netns(netns), "nft", "-j", "list", "tables", "bridge"],
                             timeout=30)  # fmt: skip
    names = [i["table"]["name"] for i in json.loads(out.stdout or "{}").get("nftables", [])
             if "table" in i]  # fmt: skip
    return sorted(int(n[4:]) for n in names if re.fullmatch(r"sf_f\d+", n))


async def leftovers(netns: str | None = None) -> list[int]:
    """The families whose devices or tables are here, made by this sfld or a dead one."""
    found = {int(m.group(1)) for name in await links(netns) if (m := _OURS.match(name))}
    return sorted(found | set(await tables(netns)))


async def remove_leftovers(underlay_ip: str | None, netns: str | None = None) -> list[int]:
    """Remove every family network device a dead sfld left (at start-up)."""
    found = await leftovers(netns)
    for family in found:
        await FamilyFabric(family, underlay_ip, netns).destroy()
    return found

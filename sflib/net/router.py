"""A family's way out: NAT to the host's uplink, a firewall for what comes in, and a
bandwidth limit each way between the family and the outside.

Members reach the outside through NAT. From the outside, new connections reach the
parent on any port and every member on the policy's inbound TCP ports; anything else
meant for a member is refused at once (TCP reset, else ICMP admin-prohibited), ICMP
echo excepted, so a member answers ping. Another family's network (its bridge sfb*,
its router's uplink sfu*) is never a way in or out. Traffic between members is
bridged, never routed, so no limit or rule of this module slows it.

Two modes, chosen by the cluster's configuration:

- distributed: every host with members routes for them, its bridge sfb<F> being
  their gateway: an inet nftables table sf_r<F> on the host (NAT, firewall), tc
  shaping the bridge's egress (into the family), and a limit rule of the table
  policing what comes out. Not tc that way: an ifb device behind the bridge's
  ingress makes packets lose their conntrack state under br_netfilter (act_mirred
  resets what br_netfilter made, and nothing makes it again), so they would leave
  un-NATed; and act_police is not in every kernel. The rule's bucket holds a
  second's worth (nftables' smallest unit) and a burst: the limit holds on average
  over a second.
- central: the parent's host runs one router, a network namespace (sfr<F>, or
  <netns>-r<F> on a host that is a namespace itself) with a veth on the bridge
  (host end sfi<F>; router end "inside", with identity.router_mac and router_ip)
  and a veth to the host (host end sfu<F>; router end "uplink") on a /30 of
  100.64.0.0/10 derived from F. The router NATs and filters as above, and tc shapes
  its two veths' egress. The host routes the family's subnet to it (two /21s, more
  specific than the bridge's /20, which stays for the DHCP server) and NATs it to
  the host's uplink. Every host of the family, the router's or not
  (FamilyRouter(..., router_here=False)), keeps its bridge out of routing, so that
  no member can use its host's .1 to get past the router.

ip_forward is turned on where routing happens and left on by destroy(): other
families may route through the same host. Names carry the family number so that a
restarted sfld finds and removes what a dead one left (leftovers()).

With br_netfilter (built into some kernels, and bridge-nf-call-iptables on by
default in every namespace), bridged frames cross the inet forward hook too, their
input and output being the bridge: the rules let such traffic through untouched.

Every command is awaited (sflib.net.commands), so sfld's loop goes on meanwhile.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sflib import run
from sflib.errors import SnowFlockError, UsageError
from sflib.net import commands, fabric, identity

log = logging.getLogger(__name__)

CENTRAL, DISTRIBUTED = "central", "distributed"
UPLINK_BASE = ipaddress.IPv4Network("100.64.0.0/10")  # shared address space (RFC 6598)
INSIDE, UPLINK = "inside", "uplink"  # the router's interfaces, in its own namespace
SHAPER_LATENCY = "50ms"  # the longest a packet waits in a shaper's queue
MIN_BURST = 32 * 1024  # bytes a shaper lets through at once: a few full-size frames
# bytes a policer lets through at once: two 64 KiB GSO packets (as a VM's virtio-net
# sends them), which a smaller bucket would never admit
MIN_POLICE_BURST = 128 * 1024
_OURS = re.compile(r"^sf[iu](\d+)$")


@dataclass(frozen=True)
class RouterPolicy:
    """How every family routes: the mode, the TCP ports any member accepts from the
    outside (the parent accepts all), and the limit each way in Mbit/s (0: none).
    Raises UsageError for a mode, port or rate that makes no sense."""

    mode: str
    inbound_ports: tuple[int, ...] = ()
    rate_mbit: int = 0

    def __post_init__(self) -> None:
        if self.mode not in (CENTRAL, DISTRIBUTED):
            raise UsageError(f"unknown router mode {self.mode!r}",
                             hint=f"{CENTRAL} or {DISTRIBUTED}")  # fmt: skip
        bad = [p for p in self.inbound_ports if not 1 <= p <= 65535]
        if bad:
            raise UsageError(f"inbound port {bad[0]} out of range", hint="1 to 65535")
        if self.rate_mbit < 0:
            raise UsageError(f"rate {self.rate_mbit} Mbit/s", hint="0 (no limit) or more")


def table_name(family: int) -> str:
    return f"sf_r{identity.check_family(family)}"


def inside_name(family: int) -> str:
    """The host end of the router's veth on the family's bridge."""
    return f"sfi{identity.check_family(family)}"


def uplink_name(family: int) -> str:
    """The host end of the router's uplink veth."""
    return f"sfu{identity.check_family(family)}"


def namespace_name(family: int, netns: str | None = None) -> str:
    """The router's namespace; namespace names are global, so a host that is a
    namespace itself prefixes its own name."""
    identity.check_family(family)
    return f"{netns}-r{family}" if netns else f"sfr{family}"


def uplink_net(family: int) -> ipaddress.IPv4Network:
    """The family's /30 between the host (first address) and its router (second)."""
    identity.check_family(family)
    return ipaddress.IPv4Network((int(UPLINK_BASE.network_address) + 4 * family, 30))


def uplink_addresses(family: int) -> tuple[str, str]:
    """(the host's, the router's) addresses on the uplink veth."""
    net = uplink_net(family)
    return str(net.network_address + 1), str(net.network_address + 2)


def router_routes(family: int) -> list[str]:
    """The host's routes to the family through its router: the subnet's halves, which
    win over the bridge's own route to the whole subnet without removing it."""
    return [str(half) for half in identity.subnet(family).subnets(prefixlen_diff=1)]


def _guards(own: str) -> list[str]:
    """Rules keeping the interface own apart from every other family's bridge and
    router uplink, both ways ("sfb*" or "sfu*" matching own too: hence != own)."""
    rules = []
    for here, there in (("iifname", "oifname"), ("oifname", "iifname")):
        for kind in ("sfb", "sfu"):
            other = f' {there} != "{own}"' if own.startswith(kind) else ""
            rules.append(f'{here} "{own}" {there} "{kind}*"{other} drop')
    return rules


def _closed(inside: str) -> list[str]:
    """Input rules (pure): from the family, the host (or the router) itself answers
    DHCP and ping only; its own services (sfld's peers, memory server) stay shut."""
    return [f'iifname "{inside}" ct state established,related accept',
            f'iifname "{inside}" udp dport 67 accept',
            f'iifname "{inside}" icmp type echo-request accept',
            f'iifname "{inside}" drop']  # fmt: skip


def _table(family: int, nat: list[str], forward: list[str], input: list[str]) -> str:
    def chain(name: str, hook: str, rules: list[str]) -> str:
        body = "".join(f"        {rule}\n" for rule in rules)
        return (f"    chain {name} {{\n"
                f"        type {hook}; policy accept;\n{body}    }}\n")  # fmt: skip

    chains = chain("postrouting", "nat hook postrouting priority srcnat", nat) if nat else ""
    chains += chain("forward", "filter hook forward priority filter", forward)
    chains += chain("input", "filter hook input priority filter", input)
    return f"table inet {table_name(family)} {{\n{chains}}}\n"


def firewall_rules(family: int, policy: RouterPolicy) -> str:
    """The family's NAT and firewall as an inet table (pure), for the host in
    distributed mode (the bridge being the inside), for the router's namespace in
    central mode (its inside veth)."""
    net, parent = identity.subnet(family), identity.identity(family, 0).ip.split("/")[0]
    inside = fabric.bridge_name(family) if policy.mode == DISTRIBUTED else INSIDE
    nat = [f'oifname != "{inside}" ip saddr {net} masquerade']
    forward = []
    if policy.mode == DISTRIBUTED:
        # Bridged frames (br_netfilter) go in and out by the bridge: not ours to stop.
        forward += [f'iifname "{inside}" oifname "{inside}" accept', *_guards(inside)]
        if policy.rate_mbit:
            forward.append(f'iifname "{inside}" {police(policy.rate_mbit)}')
    forward += [
        "ct state established,related accept",
        f'iifname "{inside}" accept',
        f'oifname "{inside}" ip daddr {parent} accept',
    ]
    if policy.inbound_ports:
        ports = ", ".join(str(p) for p in sorted(set(policy.inbound_ports)))
        forward.append(f'oifname "{inside}" tcp dport {{ {ports} }} accept')
    forward += [
        f'oifname "{inside}" icmp type echo-request accept',
        # Refused at once rather than dropped: a client learns now, not after minutes.
        f'oifname "{inside}" meta l4proto tcp reject with tcp reset',
        f'oifname "{inside}" reject with icmpx type admin-prohibited',
    ]
    return _table(family, nat, forward, _closed(inside))


def host_rules(family: int, router_here: bool) -> str:
    """A host's table in central mode (pure): its bridge is no gateway, and if the
    router is here, what the router sends out is NATed to the host's uplink and
    kept apart from other families."""
    bridge = fabric.bridge_name(family)
    # Bridged frames (br_netfilter) go in and out by the bridge: not ours to stop.
    forward = [f'iifname "{bridge}" oifname != "{bridge}" drop',
               f'oifname "{bridge}" iifname != "{bridge}" drop']  # fmt: skip
    if not router_here:
        return _table(family, [], forward, _closed(bridge))
    uplink = uplink_name(family)
    nat = [f'oifname != "{uplink}" ip saddr {uplink_net(family)} masquerade']
    shut = [*_closed(bridge), f'iifname "{uplink}" ct state established,related accept',
            f'iifname "{uplink}" drop']  # fmt: skip
    return _table(family, nat, forward + _guards(uplink), shut)


def police(rate_mbit: int) -> str:
    """An nftables statement (pure) dropping what exceeds rate_mbit; its bucket
    holds a second's worth plus the burst."""
    rate = rate_mbit * 1_000_000 // 8
    burst = max(MIN_POLICE_BURST, rate // 10)  # 100 ms worth
    return f"limit rate over {rate} bytes/second burst {burst} bytes drop"


def shaper_argv(dev: str, rate_mbit: int) -> list[str]:
    """tc's arguments (pure) that limit what leaves dev to rate_mbit."""
    burst = max(MIN_BURST, rate_mbit * 1_000_000 // 8 // 100)  # 10 ms worth
    return ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
            "burst", str(burst), "latency", SHAPER_LATENCY]  # fmt: skip


class FamilyRouter:
    """A family's routing on one host (netns: a host that is a namespace; None:
    sfld's own). In central mode, router_here says whether this host runs the
    router (the parent's host) or only keeps its bridge out of routing. Use
    create() once the family's fabric exists on the host, and destroy()."""

    def __init__(self, family: int, policy: RouterPolicy, netns: str | None = None,
                 router_here: bool = True) -> None:  # fmt: skip
        self.family = identity.check_family(family)
        self.policy = policy
        self.netns = netns
        self.router_here = router_here
        self.namespace = namespace_name(family, netns)

    async def create(self) -> None:
        """Set the family's routing up. Raises CommandFailed (or another SnowFlockError
        from sflib.run), having removed whatever it made."""
        try:
            if self.policy.mode == DISTRIBUTED:
                await self._create_distributed()
            elif self.router_here:
                await self._create_router()
            else:
                await _nft(self.netns, host_rules(self.family, router_here=False))
        except SnowFlockError:
            await self.destroy()
            raise
        log.info("family %d: %s routing%s", self.family, self.policy.mode,
                 f" in namespace {self.namespace}" if self._runs_router else "")  # fmt: skip

    @property
    def _runs_router(self) -> bool:
        return self.policy.mode == CENTRAL and self.router_here

    async def _create_distributed(self) -> None:
        # At once: no member is on the bridge yet, so no packet sees them half made.
        bridge, rate = fabric.bridge_name(self.family), self.policy.rate_mbit
        await commands.together(
            _forwarding(self.netns),
            _nft(self.netns, firewall_rules(self.family, self.policy)),
            *([_tc(self.netns, shaper_argv(bridge, rate))] if rate else []),
        )

    async def _create_router(self) -> None:
        host, router, f = self.netns, self.namespace, self.family
        await _nft(host, host_rules(f, router_here=True))  # the bridge is no gateway from now
        await self._plumb_router()
        # The rest at once: no member is on the bridge yet, so no packet sees it half made.
        routes = [f"route add {r} via {uplink_addresses(f)[1]} dev {uplink_name(f)}"
                  for r in router_routes(f)]  # fmt: skip
        steps = [_forwarding(router), _nft(router, firewall_rules(f, self.policy)),
                 _forwarding(host), _ip_batch(host, routes)]  # fmt: skip
        if rate := self.policy.rate_mbit:  # into the family, and out of it
            steps += [_tc(router, shaper_argv(dev, rate)) for dev in (INSIDE, UPLINK)]
        await commands.together(*steps)

    async def _plumb_router(self) -> None:
        """The router's namespace, its veths to the bridge and to the host, their
        addresses, and its default route: one ip -batch on each side."""
        host, router, f = self.netns, self.namespace, self.family
        host_ip, router_ip = uplink_addresses(f)
        await commands.run(["ip", "netns", "add", router], timeout=30)
        await _ip_batch(host, [
            f"link add {inside_name(f)} type veth peer name {INSIDE} netns {router}",
            f"link set {inside_name(f)} master {fabric.bridge_name(f)} up",
            f"link add {uplink_name(f)} type veth peer name {UPLINK} netns {router}",
            f"addr add {host_ip}/30 dev {uplink_name(f)}",
            f"link set {uplink_name(f)} up",
        ])  # fmt: skip
        await _ip_batch(router, [
            "link set lo up",
            f"link set {INSIDE} address {identity.router_mac(f)}",
            f"addr add {identity.router_ip(f)}/{identity.PREFIX} dev {INSIDE}",
            f"link set {INSIDE} up",
            f"addr add {router_ip}/30 dev {UPLINK}",
            f"link set {UPLINK} up",
            f"route add default via {host_ip}",
        ])  # fmt: skip

    async def destroy(self) -> None:
        """Remove whatever of the family's routing is on this host, whichever mode
        made it (also a dead sfld's); never raises."""
        bridge, host = fabric.bridge_name(self.family), self.netns
        await _attempt(f"tc on {bridge}", lambda: _unshape(host, bridge))
        for dev in (inside_name(self.family), uplink_name(self.family)):
            # A veth goes with either end, and the host's routes through it with it.
            await _attempt(dev, functools.partial(_remove_link, host, dev))
        await _attempt(self.namespace, lambda: _remove_namespace(self.namespace))
        await _attempt(table_name(self.family), lambda: _remove_table(host, self.family))


async def leftovers(netns: str | None = None) -> list[int]:
    """The families with routing pieces here (namespaces, devices, tables), made by
    this sfld or a dead one. Raises CommandFailed."""
    prefix = re.escape(f"{netns}-r" if netns else "sfr")
    found = {int(m.group(1)) for name in await namespaces()
             if (m := re.fullmatch(prefix + r"(\d+)", name))}  # fmt: skip
    found |= {int(m.group(1)) for name in await fabric.links(netns)
              if (m := _OURS.match(name))}  # fmt: skip
    return sorted(found | set(await tables(netns)))


async def remove_leftovers(netns: str | None = None) -> list[int]:
    """Remove every family's routing pieces (at start-up, after a crash); the
    families found. Raises CommandFailed if they cannot even be listed."""
    found = await leftovers(netns)
    for family in found:
        # The mode does not matter: destroy() removes whatever it finds.
        await FamilyRouter(family, RouterPolicy(CENTRAL), netns).destroy()
    return found


async def namespaces() -> list[str]:
    """The names of the machine's named network namespaces."""
    out = await commands.run(["ip", "-j", "netns", "list"], timeout=30)
    return [str(ns["name"]) for ns in json.loads(out.stdout or "[]")]


async def tables(netns: str | None = None) -> list[int]:
    """The families whose router tables are here."""
    out = await commands.run([*run.in_netns(netns), "nft", "-j", "list", "tables", "inet"],
                             timeout=30)  # fmt: skip
    names = [i["table"]["name"] for i in json.loads(out.stdout or "{}").get("nftables", [])
             if "table" in i]  # fmt: skip
    return sorted(int(n[4:]) for n in names if re.fullmatch(r"sf_r\d+", n))


async def _unshape(netns: str | None, bridge: str) -> None:
    if bridge not in await fabric.links(netns):
        return
    out = await commands.run(
        ["tc", *run.netns_option(netns), "-j", "qdisc", "show", "dev", bridge], timeout=30
    )
    kinds = {q.get("kind") for q in json.loads(out.stdout or "[]")}
    if "tbf" in kinds:
        await _tc(netns, ["qdisc", "del", "dev", bridge, "root"])


async def _remove_link(netns: str | None, dev: str) -> None:
    if dev in await fabric.links(netns):
        await _ip(netns, "link", "del", dev)


async def _remove_namespace(name: str) -> None:
    if name in await namespaces():
        await commands.run(["ip", "netns", "delete", name], timeout=30)


async def _remove_table(netns: str | None, family: int) -> None:
    if family in await tables(netns):
        await commands.run([*run.in_netns(netns), "nft", "delete", "table", "inet",
                            table_name(family)], timeout=30)  # fmt: skip


async def _attempt(what: str, action: Callable[[], Awaitable[None]]) -> None:
    try:
        await action()
    except (SnowFlockError, ValueError, KeyError) as e:  # (ValueError: unreadable JSON)
        log.warning("cannot remove %s: %s", what, e)


async def _forwarding(netns: str | None) -> None:
    # /proc/sys/net is the opener's namespace's, so sysctl must run inside it.
    await commands.run([*run.in_netns(netns), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
                       timeout=30)  # fmt: skip


async def _nft(netns: str | None, rules: str) -> None:
    await commands.run([*run.in_netns(netns), "nft", "-f", "-"], timeout=30, input=rules)


async def _ip_batch(netns: str | None, batch: list[str]) -> None:
    """Several ip commands in one process; the first that fails ends it (CommandFailed)."""
    await commands.run(["ip", *run.netns_option(netns), "-batch", "-"], timeout=30,
                       input="".join(f"{c}\n" for c in batch))  # fmt: skip


async def _ip(netns: str | None, *argv: str) -> None:
    await commands.run(["ip", *run.netns_option(netns), *argv], timeout=30)


async def _tc(netns: str | None, argv: list[str]) -> None:
    await commands.run(["tc", *run.netns_option(netns), *argv], timeout=30)

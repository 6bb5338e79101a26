"""A family router's names, addresses, nftables tables and tc arguments (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from sflib.errors import UsageError
from sflib.net import identity, router
from sflib.net.router import RouterPolicy


def forward_rules(table: str) -> list[str]:
    """The forward chain's rules, one a line, without the chain's type."""
    chain = table.split("chain forward {\n", 1)[1].split("    }\n", 1)[0]
    return [line.strip() for line in chain.splitlines()[1:]]


def position(rules: list[str], part: str) -> int:
    """The index of the only rule containing part."""
    found = [i for i, rule in enumerate(rules) if part in rule]
    assert len(found) == 1, (part, rules)
    return found[0]


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "both"}, {"mode": "central", "inbound_ports": (0,)},
     {"mode": "central", "inbound_ports": (65536,)},
     {"mode": "distributed", "rate_mbit": -1}],
)  # fmt: skip
def test_a_policy_that_makes_no_sense_is_a_usage_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        RouterPolicy(**kwargs)  # type: ignore[arg-type]


def test_names_carry_the_family() -> None:
    assert (router.table_name(7), router.inside_name(7), router.uplink_name(7)) == (
        "sf_r7", "sfi7", "sfu7")  # fmt: skip
    assert router.namespace_name(7) == "sfr7"
    assert router.namespace_name(7, "sfab12cd-h1") == "sfab12cd-h1-r7"
    with pytest.raises(UsageError):
        router.namespace_name(0)


def test_each_family_has_its_own_uplink_inside_the_shared_space() -> None:
    nets = [router.uplink_net(f) for f in range(1, identity.MAX_FAMILY + 1)]
    assert all(net.subnet_of(router.UPLINK_BASE) and net.prefixlen == 30 for net in nets)
    assert len({net.network_address for net in nets}) == len(nets)  # /30s: disjoint
    assert router.uplink_addresses(1) == ("100.64.0.5", "100.64.0.6")


def test_the_routes_to_the_router_win_over_the_bridges_and_cover_the_subnet() -> None:
    halves = [ipaddress.IPv4Network(r) for r in router.router_routes(7)]
    whole = identity.subnet(7)
    assert all(h.prefixlen > whole.prefixlen and h.subnet_of(whole) for h in halves)
    assert sum(h.num_addresses for h in halves) == whole.num_addresses


def test_distributed_nat_and_firewall_on_the_bridge() -> None:
    policy = RouterPolicy("distributed", inbound_ports=(80, 22, 80), rate_mbit=8)
    table = router.firewall_rules(7, policy)
    assert table.startswith("table inet sf_r7 {")
    assert 'oifname != "sfb7" ip saddr 10.0.112.0/20 masquerade' in table
    rules = forward_rules(table)
    assert rules[0] == 'iifname "sfb7" oifname "sfb7" accept'  # bridged (br_netfilter)
    guards = [position(rules, f'{way} "sfb7" {other} "{kind}*"')
              for way, other in (("iifname", "oifname"), ("oifname", "iifname"))
              for kind in ("sfb", "sfu")]  # fmt: skip
    limit = position(rules, "limit rate over 1000000 bytes/second")
    established = position(rules, "ct state established,related accept")
    assert max(guards) < limit < established  # replies are limited too
    assert position(rules, 'oifname "sfb7" ip daddr 10.0.112.2 accept') > established
    assert 'oifname "sfb7" tcp dport { 22, 80 } accept' in rules
    assert rules[-2:] == ['oifname "sfb7" meta l4proto tcp reject with tcp reset',
                          'oifname "sfb7" reject with icmpx type admin-prohibited']  # fmt: skip


def test_without_ports_or_rate_only_the_parent_is_open_and_nothing_limited() -> None:
    rules = forward_rules(router.firewall_rules(7, RouterPolicy("distributed")))
    assert not [rule for rule in rules if "dport" in rule or "limit" in rule]
    assert 'oifname "sfb7" ip daddr 10.0.112.2 accept' in rules


def test_central_firewall_is_on_the_routers_inside_interface() -> None:
    table = router.firewall_rules(7, RouterPolicy("central", (22,), rate_mbit=8))
    assert 'oifname != "inside" ip saddr 10.0.112.0/20 masquerade' in table
    rules = forward_rules(table)
    assert rules[0] == "ct state established,related accept"
    assert 'oifname "inside" tcp dport { 22 } accept' in rules
    # The router's namespace has no other family in it, and tc shapes it both ways.
    assert not [rule for rule in rules if "sfb" in rule or "limit" in rule]


def test_central_hosts_keep_their_bridge_out_of_routing() -> None:
    elsewhere = router.host_rules(7, router_here=False)
    assert "postrouting" not in elsewhere
    assert forward_rules(elsewhere) == ['iifname "sfb7" oifname != "sfb7" drop',
                                        'oifname "sfb7" iifname != "sfb7" drop']  # fmt: skip
    here = router.host_rules(7, router_here=True)
    assert 'oifname != "sfu7" ip saddr 100.64.0.28/30 masquerade' in here
    rules = forward_rules(here)
    assert rules[:2] == forward_rules(elsewhere)
    assert 'iifname "sfu7" oifname "sfu*" oifname != "sfu7" drop' in rules
    assert 'oifname "sfu7" iifname "sfb*" drop' in rules


def test_shaper_and_policer_buckets_grow_with_the_rate_from_a_floor() -> None:
    argv = router.shaper_argv("sfb7", 8)
    assert argv[:6] == ["qdisc", "replace", "dev", "sfb7", "root", "tbf"]
    assert argv[argv.index("rate") + 1] == "8mbit"
    assert int(argv[argv.index("burst") + 1]) == router.MIN_BURST
    fast = router.shaper_argv("sfb7", 10_000)
    assert int(fast[fast.index("burst") + 1]) == 10_000 * 1_000_000 // 8 // 100  # 10 ms
    # A policer's bucket must hold a 64 KiB GSO packet, or it never admits one.
    assert router.police(1) == (
        f"limit rate over 125000 bytes/second burst {router.MIN_POLICE_BURST} bytes drop"
    )
    assert router.MIN_POLICE_BURST >= 64 * 1024
    assert router.police(10_000).endswith("burst 125000000 bytes drop")  # 100 ms

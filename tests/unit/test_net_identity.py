"""A family member's MAC, IP and VNI as functions of the family and the ID."""

from __future__ import annotations

import ipaddress

import pytest

from sflib.errors import UsageError, WrongStateError
from sflib.net import identity
from sflib.net.fabric import bridge_name, vxlan_name


def test_identity_is_a_function_of_family_and_id() -> None:
    me = identity.identity(1, 0)
    assert (me.mac, me.ip, me.gateway) == ("02:53:46:00:10:00", "10.0.16.2/20", "10.0.16.1")
    assert identity.identity(1, 3).ip == "10.0.16.5/20"
    assert identity.identity(1, 3) == identity.identity(1, 3)


def test_no_two_members_of_any_families_share_a_mac_or_an_ip() -> None:
    members = [(f, k) for f in (1, 2, 255, 4095) for k in (0, 1, 2, identity.MAX_ID)]
    macs = {identity.mac(f, k) for f, k in members}
    ips = {identity.identity(f, k).ip for f, k in members}
    assert len(macs) == len(ips) == len(members)


def test_a_familys_macs_share_its_prefix_and_no_one_elses() -> None:
    address, mask = identity.mac_prefix(9)

    def masked(mac: str) -> list[int]:
        return [
            int(a, 16) & int(m, 16) for a, m in zip(mac.split(":"), mask.split(":"), strict=True)
        ]

    assert all(masked(identity.mac(9, k)) == masked(address) for k in (0, 1, identity.MAX_ID))
    assert masked(identity.mac(10, 0)) != masked(address)


def test_addresses_stay_inside_the_familys_subnet() -> None:
    for family in (1, 4095):
        net = identity.subnet(family)
        for k in (0, identity.MAX_ID):
            address = ipaddress.IPv4Address(identity.identity(family, k).ip.split("/")[0])
            assert address in net and address not in (net.network_address,
                                                      net.broadcast_address)  # fmt: skip


def test_out_of_range_is_refused() -> None:
    for family, k in ((0, 1), (4096, 1), (1, -1), (1, identity.MAX_ID + 1)):
        with pytest.raises(UsageError):
            identity.identity(family, k)
    assert identity.vni(1) != identity.vni(2)
    assert len(bridge_name(4095)) <= 15 and len(vxlan_name(4095)) <= 15  # IFNAMSIZ


def test_isolation_rules_guard_every_port_both_ways() -> None:
    from sflib.net.fabric import isolation_rules, table_name, tap_name

    rules = isolation_rules(7)
    assert f"table bridge {table_name(7)}" in rules
    drops = [line.strip() for line in rules.splitlines() if line.strip().endswith("drop")]
    prefix, mask = identity.mac_prefix(7)
    foreign = [d for d in drops if f"ether saddr & {mask} != {prefix}" in d]
    assert sorted(d.split('"')[1] for d in foreign) == ["sft7-*", "sft7-*", "sfx7", "sfx7"]
    assert {d.split()[0] for d in foreign} == {"iifname", "oifname"}
    gateway = [d for d in drops if d not in foreign]  # the hosts' gateways stay home
    # forwarded both ways, and sent by the host's own bridge (its DHCP answers)
    assert sorted(d.split()[0] for d in gateway) == ["iifname", "oifname", "oifname"]
    assert "type filter hook output" in rules
    assert all(f'"sfx7" ether saddr {identity.gateway_mac(7)}' in d for d in gateway)
    assert tap_name(7, 3).startswith("sft7-")  # what the wildcard catches


def test_the_central_router_is_in_the_family_and_no_member() -> None:
    net = identity.subnet(5)
    members = {identity.identity(5, k).ip.split("/")[0] for k in (0, 1, identity.MAX_ID)}
    macs = {identity.mac(5, k) for k in (0, 1, identity.MAX_ID)}
    assert identity.router_ip(5) not in members | {str(net.network_address + 1)}
    assert ipaddress.IPv4Address(identity.router_ip(5)) in net
    assert identity.router_mac(5) not in macs | {identity.gateway_mac(5)}
    prefix, _ = identity.mac_prefix(5)
    assert identity.router_mac(5)[:13] == prefix[:13]  # inside the family's range
    assert identity.identity(5, 3, central=True).gateway == identity.router_ip(5)
    assert identity.identity(5, 3).gateway == str(net.network_address + 1)


def test_concurrent_tickets_get_apart_members() -> None:
    assert identity.member_base([], 4) == 0
    assert identity.member_base([range(1, 5)], 2) == 4  # members 5, 6
    assert identity.member_base([range(3, 7)], 4) == 6  # 1..4 would clash with 3, 4
    assert identity.member_base([range(5, 7)], 3) == 0
    with pytest.raises(WrongStateError):
        identity.member_base([range(1, identity.MAX_ID + 1)], 1)


def test_family_numbers_are_the_lowest_free() -> None:
    assert identity.free_family(set()) == 1
    assert identity.free_family({1, 2, 4}) == 3
    with pytest.raises(WrongStateError):
        identity.free_family(set(range(1, identity.MAX_FAMILY + 1)))

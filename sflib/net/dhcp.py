"""Synthetic DHCP for a family on one host: dnsmasq on the family's bridge, with a
static lease for each member this host runs and nothing for anyone else, so a
member that reboots or renews gets its ID's address back whatever its
distribution. Every host answers its own members only (the others' requests reach
it over VXLAN too, and it ignores them). dnsmasq_argv and hosts_file are pure; the
caller runs the process and sends it SIGHUP when the members change.
"""

from __future__ import annotations

from pathlib import Path

from sflib.net import fabric, identity


def hosts_file(family: int, members: list[int]) -> str:
    """dnsmasq's --dhcp-hostsfile: MAC,IP per member ID."""
    lines = []
    for clone_id in sorted(members):
        me = identity.identity(family, clone_id)
        lines.append(f"{me.mac},{me.ip.split('/')[0]}\n")
    return "".join(lines)


def dnsmasq_argv(family: int, hosts: Path, leases: Path, gateway: str | None = None,
                 mtu: int | None = None) -> list[str]:  # fmt: skip
    """gateway: the members' router (default: the host's bridge, the subnet's .1);
    mtu: the one members must use (a network spanning hosts over VXLAN)."""
    net = identity.subnet(family)
    extra = [f"--dhcp-option-force=option:mtu,{mtu}"] if mtu else []  # asked or not
    return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            f"--interface={fabric.bridge_name(family)}", "--bind-interfaces",
            "--except-interface=lo",
            f"--dhcp-range={net.network_address},static,{net.netmask},12h",
            f"--dhcp-hostsfile={hosts}", f"--dhcp-leasefile={leases}",
            f"--dhcp-option=option:router,{gateway or net.network_address + 1}",
            "--dhcp-authoritative", "--log-dhcp", "--log-facility=-",
            "--user=root", "--pid-file=", *extra]  # fmt: skip

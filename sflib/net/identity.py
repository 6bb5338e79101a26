"""A family member's network identity, a function of the family and the ID (pure).

A family is a number f (1..4095) the cluster gives a parent and its clones. Its
members' MACs are 02:53:46 (locally administered, "SF") followed by 12 bits of f
and 12 bits of the clone ID (0 is the parent), so the family's range is one prefix
and any frame from outside it is recognisable. The range's last MAC is each host's
bridge (its members' DHCP server, and their gateway in the distributed mode); the
one before is the family's central router. Its subnet is the f-th /20 of
10.0.0.0/8: .1 is each host's bridge, the parent .2, clone k .2+k, and the last
usable address the central router. Its VXLAN network identifier is VNI_BASE + f.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sflib.errors import UsageError, WrongStateError

OUI = (0x02, 0x53, 0x46)
MAX_FAMILY = 0xFFF
# .0 the network, .1 the hosts' bridges, .2 the parent, then the clones, the central
# router, the broadcast.
MAX_ID = 0xFFF - 4
ROUTER_ID = 0xFFE  # its MAC's tail; its address is the one after the last clone's
VNI_BASE = 0x530000
BASE = ipaddress.IPv4Network("10.0.0.0/8")
PREFIX = 20


@dataclass(frozen=True)
class Identity:
    family: int
    clone_id: int
    mac: str
    ip: str  # with its prefix length, e.g. 10.0.16.3/20
    gateway: str

    def to_json(self) -> dict[str, object]:
        return {"family_net": self.family, "mac": self.mac, "ip": self.ip,
                "gateway": self.gateway}  # fmt: skip


def check_family(family: int) -> int:
    if not 1 <= family <= MAX_FAMILY:
        raise UsageError(f"family {family} out of range", hint=f"1 to {MAX_FAMILY}")
    return family


def free_family(used: set[int]) -> int:
    """The lowest family number not in used. Raises WrongStateError."""
    for family in range(1, MAX_FAMILY + 1):
        if family not in used:
            return family
    raise WrongStateError(f"all {MAX_FAMILY} family networks are in use")


def member_base(taken: list[range], n: int) -> int:
    """The lowest base such that members base+1 .. base+n are in none of the taken
    ranges (a parent's other live tickets): clone k of a ticket is member base+k,
    so the clones of two tickets never share an address. Raises WrongStateError."""
    base = 0
    while base + n <= MAX_ID:
        wanted = range(base + 1, base + n + 1)
        clash = [r for r in taken if r.start < wanted.stop and wanted.start < r.stop]
        if not clash:
            return base
        base = max(r.stop for r in clash) - 1
    raise WrongStateError(f"no {n} free addresses left on the family's network")


def subnet(family: int) -> ipaddress.IPv4Network:
    check_family(family)
    return ipaddress.IPv4Network((int(BASE.network_address) + (family << (32 - PREFIX)), PREFIX))


def mac(family: int, clone_id: int) -> str:
    check_family(family)
    _check_id(clone_id)
    return _mac((family << 12) | clone_id)


def gateway_mac(family: int) -> str:
    """The family's gateway on each host (the host's bridge): the range's last MAC,
    which no member has (MAX_ID is lower)."""
    check_family(family)
    return _mac((family << 12) | 0xFFF)


def router_mac(family: int) -> str:
    """The central router's MAC: inside the family's range (so it crosses between
    hosts), and no member's."""
    check_family(family)
    return _mac((family << 12) | ROUTER_ID)


def router_ip(family: int) -> str:
    """The central router's address: the subnet's last usable one."""
    return str(subnet(family).broadcast_address - 1)


def mac_prefix(family: int) -> tuple[str, str]:
    """(address, mask) matching every MAC of the family, as filters want them."""
    check_family(family)
    return mac(family, 0), "ff:ff:ff:ff:f0:00"


def identity(family: int, clone_id: int, central: bool = False) -> Identity:
    """Member clone_id's identity; its gateway is the central router if central,
    else its host's bridge."""
    net = subnet(family)
    _check_id(clone_id)
    address = net.network_address + 2 + clone_id
    gateway = router_ip(family) if central else str(net.network_address + 1)
    return Identity(family, clone_id, mac(family, clone_id), f"{address}/{PREFIX}", gateway)


def vni(family: int) -> int:
    return VNI_BASE + check_family(family)


def _mac(tail: int) -> str:
    return ":".join(f"{b:02x}" for b in (*OUI, tail >> 16, (tail >> 8) & 0xFF, tail & 0xFF))


def _check_id(clone_id: int) -> None:
    if not 0 <= clone_id <= MAX_ID:
        raise UsageError(f"clone ID {clone_id} has no address", hint=f"0 to {MAX_ID}")

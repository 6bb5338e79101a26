"""Xen's permission model (pure).

A node's permissions are a list of entries "<letter><domid>". The first names the
owner and gives the access of every domain not listed; the others give one domain
its access. Letters: n none, r read, w write, b both. Domain 0 and the owner have
full access.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Flag

from sflib.xenstore.wire import XenStoreError


class Access(Flag):
    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = READ | WRITE


_LETTERS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_BY_ACCESS = {access: letter for letter, access in _LETTERS.items()}


@dataclass(frozen=True)
class Perm:
    access: Access
    domid: int

    def __str__(self) -> str:
        return f"{_BY_ACCESS[self.access]}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        if len(text) < 2 or text[0] not in _LETTERS or not text[1:].isdigit():
            raise XenStoreError(errno.EINVAL, f"invalid permission {text!r}")
        return cls(_LETTERS[text[0]], int(text[1:]))


Perms = tuple[Perm, ...]


def parse_perms(items: list[str]) -> Perms:
    if not items or items == [""]:
        raise XenStoreError(errno.EINVAL, "no permissions given")
    return tuple(Perm.parse(item) for item in items)


def owner(perms: Perms) -> int:
    return perms[0].domid


def access_of(perms: Perms, domid: int) -> Access:
    """What domid may do on a node with these permissions."""
    if domid == 0 or domid == owner(perms):
        return Access.BOTH
    for perm in perms[1:]:
        if perm.domid == domid:
            return perm.access
    return perms[0].access


def rebind(perms: Perms, old: int, new: int) -> Perms:
    """The same permissions with every mention of domain old moved to new (cloning)."""
    return tuple(Perm(p.access, new if p.domid == old else p.domid) for p in perms)

"""A domain's XenStore state, frozen: its subtree and its connections' watches.

Taken when a VM is checkpointed and restored into each clone's new domain, so a
guest blocked on a watch inside sf_clone or sf_checkpoint_parent wakes in every
clone, however long after the checkpoint the clone is made (pure).
"""

from __future__ import annotations

import base64
import errno
from dataclasses import dataclass
from typing import Any

from sflib.xenstore import names
from sflib.xenstore.perms import Perm, Perms, parse_perms, rebind
from sflib.xenstore.store import Event, Session, Store, Watch
from sflib.xenstore.tree import Change, Node
from sflib.xenstore.wire import XenStoreError


@dataclass(frozen=True)
class DomainSnapshot:
    domid: int
    nodes: tuple[tuple[str, bytes, Perms], ...]  # (path below the domain, value, perms)
    watches: tuple[Watch, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "nodes": [[p, base64.b64encode(v).decode(), [str(x) for x in perms]]
                      for p, v, perms in self.nodes],
            "watches": [[w.path, base64.b64encode(w.token).decode(), w.relative]
                        for w in self.watches],
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DomainSnapshot:
        return cls(
            int(data["domid"]),
            tuple((p, base64.b64decode(v), parse_perms(perms)) for p, v, perms in data["nodes"]),
            tuple(Watch(p, base64.b64decode(t), bool(r)) for p, t, r in data["watches"]),
        )


def take(store: Store, domid: int, leave_out: tuple[str, ...] = ()) -> DomainSnapshot:
    """The domain's subtree, less the folders leave_out names (relative to the
    domain), and its watches. Costs what that subtree holds, not the whole store.
    Raises ENOENT if the domain has no subtree."""
    top = names.domain_path(domid)
    if top not in store.nodes.nodes:
        raise XenStoreError(errno.ENOENT, top)
    skip = {f"{top}/{rel}" for rel in leave_out}
    nodes, todo = [], [top]
    while todo:
        path = todo.pop()
        node = store.nodes.nodes[path]
        nodes.append((path[len(top) :], node.value, node.perms))
        todo += [kid for kid in (f"{path}/{c}" for c in node.children) if kid not in skip]
    watches = tuple(w for s in store.sessions.values() if s.domid == domid
                    for w in s.watches.values())  # fmt: skip
    return DomainSnapshot(domid, tuple(sorted(nodes)), watches)


def restore(store: Store, snap: DomainSnapshot, dst: int, into: Session) -> list[Event]:
    """Make domain dst a copy of the snapshot, its watches on into's session.

    Relative watches move to the new domain; absolute ones stay where they were.
    Raises EEXIST if dst's subtree exists, EINVAL for a bad request.
    """
    top = names.domain_path(dst)
    if into.domid != dst or dst == 0:
        raise XenStoreError(errno.EINVAL, "bad restore request")
    if top in store.nodes.nodes:
        raise XenStoreError(errno.EEXIST, top)
    parent = store.nodes.nodes[names.parent(top)]
    kids = (*parent.children, names.basename(top))
    store.nodes.set_node(names.parent(top), Node(parent.value, parent.perms, kids))
    kids_of: dict[str, list[str]] = {rel: [] for rel, _, _ in snap.nodes}
    for rel, _, _ in snap.nodes:
        if rel:
            kids_of.setdefault(names.parent(rel) if "/" in rel[1:] else "", []).append(
                names.basename(rel)
            )
    for rel, value, perms in snap.nodes:
        store.nodes.set_node(top + rel, Node(value, rebind(perms, snap.domid, dst),
                                             tuple(kids_of[rel])))  # fmt: skip
    old_top = names.domain_path(snap.domid)
    for w in snap.watches:
        path = top + w.path[len(old_top) :] if w.relative else w.path
        into.watches[(path, w.token)] = Watch(path, w.token, w.relative)
    store.introduced.add(dst)
    top_perms = store.nodes.nodes[top].perms if snap.nodes else (Perm.parse(f"n{dst}"),)
    return store.fire([Change(top, top_perms)]) + store.fire_special("@introduceDomain")

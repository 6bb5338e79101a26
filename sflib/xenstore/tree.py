"""The node tree and its operations, with Xen's permission and quota rules (pure).

Nodes are immutable and replaced on every change, so a transaction detects a
conflict by identity: a node it touched is no longer the object it saw.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass, replace

from sflib.xenstore import names
from sflib.xenstore.perms import Access, Perm, Perms, access_of, owner
from sflib.xenstore.wire import XenStoreError


@dataclass(frozen=True)
class Quotas:
    """Per-domain limits (cxenstored's defaults); domain 0 is exempt."""

    nodes: int = 1000
    value_size: int = 2048
    watches: int = 128
    transactions: int = 10
    outstanding: int = 20  # requests read before their replies were taken
    events: int = 256  # queued watch events; more are dropped (SnowFlock's choice)


@dataclass(frozen=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    generation: int = 0


@dataclass(frozen=True)
class Change:
    """A modified node, for firing watches: recursive for a removed subtree."""

    path: str
    perms: Perms
    recursive: bool = False


class NodeMap:
    """path -> Node, with per-owner node counts; records the paths it touched."""

    def __init__(self, nodes: dict[str, Node], counts: Counter[int], track: bool) -> None:
        self.nodes = nodes
        self.counts = counts
        self.touched: set[str] | None = set() if track else None
        self.generation = 0

    @classmethod
    def initial(cls) -> NodeMap:
        m = cls({}, Counter(), track=False)
        root = Perm(Access.NONE, 0)
        for path in ("/", "/local", "/local/domain", "/tool"):
            m.set_node(path, Node(b"", (root,)))
        m.set_node("/", replace(m.nodes["/"], children=("local", "tool")))
        m.set_node("/local", replace(m.nodes["/local"], children=("domain",)))
        return m

    def get(self, path: str) -> Node | None:
        if self.touched is not None:
            self.touched.add(path)
        return self.nodes.get(path)

    def set_node(self, path: str, node: Node | None) -> None:
        old = self.get(path)
        if old is not None:
            self.counts[owner(old.perms)] -= 1
        if node is None:
            self.nodes.pop(path, None)
            return
        self.generation += 1
        self.nodes[path] = replace(node, generation=self.generation)
        self.counts[owner(node.perms)] += 1


class Tree:
    """Node operations as one domain sees them; raise XenStoreError."""

    def __init__(self, nodes: NodeMap, domid: int, quotas: Quotas) -> None:
        self.nodes = nodes
        self.domid = domid
        self.quotas = quotas
        self.changes: list[Change] = []

    def _check(self, path: str, node: Node, want: Access) -> None:
        if want not in access_of(node.perms, self.domid):
            raise XenStoreError(errno.EACCES, path)

    def _existing(self, path: str, want: Access) -> Node:
        """The node, if this domain may access it; else EACCES or ENOENT.

        A missing node answers like its nearest ancestor: EACCES if this domain could
        not read that, so existence does not leak (cxenstored's ask_parents).
        """
        node = self.nodes.get(path)
        if node is not None:
            self._check(path, node, want)
            return node
        ancestor = path
        while ancestor != "/":
            ancestor = names.parent(ancestor)
            above = self.nodes.get(ancestor)
            if above is not None:
                self._check(ancestor, above, Access.READ)
                break
        raise XenStoreError(errno.ENOENT, path)

    def read(self, path: str) -> bytes:
        return self._existing(path, Access.READ).value

    def directory(self, path: str) -> tuple[str, ...]:
        return self._existing(path, Access.READ).children

    def generation(self, path: str) -> int:
        return self._existing(path, Access.READ).generation

    def get_perms(self, path: str) -> Perms:
        return self._existing(path, Access.READ).perms

    def write(self, path: str, value: bytes) -> None:
        self._check_value(value)
        node = self.nodes.get(path)
        if node is None:
            self._create(path, value)
            return
        self._check(path, node, Access.WRITE)
        self._put(path, replace(node, value=value))

    def mkdir(self, path: str) -> None:
        node = self.nodes.get(path)
        if node is None:
            self._create(path, b"")
        else:
            self._check(path, node, Access.WRITE)

    def rm(self, path: str) -> None:
        if path == "/":
            raise XenStoreError(errno.EINVAL, "cannot remove the root")
        node = self.nodes.get(path)
        if node is None:
            # cxenstored: removing a missing child of an existing parent succeeds.
            self._existing(names.parent(path), Access.WRITE)
            return
        self._check(path, node, Access.WRITE)
        self._remove_subtree(path, node)
        parent_path = names.parent(path)
        parent = self.nodes.get(parent_path)
        if parent is not None:
            kids = tuple(c for c in parent.children if c != names.basename(path))
            self.nodes.set_node(parent_path, replace(parent, children=kids))
        self.changes.append(Change(path, node.perms, recursive=True))

    def set_perms(self, path: str, perms: Perms) -> None:
        node = self._existing(path, Access.WRITE)
        if self.domid != 0 and self.domid != owner(node.perms):
            raise XenStoreError(errno.EPERM, "only the owner may change permissions")
        if self.domid != 0 and owner(perms) != owner(node.perms):
            raise XenStoreError(errno.EPERM, "only domain 0 may change the owner")
        self._put(path, replace(node, perms=perms))

    def _check_value(self, value: bytes) -> None:
        if self.domid != 0 and len(value) > self.quotas.value_size:
            raise XenStoreError(errno.ENOSPC, "value over quota")

    def _put(self, path: str, node: Node) -> None:
        self.nodes.set_node(path, node)
        self.changes.append(Change(path, node.perms))

    def _create(self, path: str, value: bytes, *, implicit: bool = False) -> None:
        """Create path and any missing ancestors, each inheriting its parent's perms.

        Only path itself fires watches, as in cxenstored: a watch on an ancestor
        created on the way fires anyway, for path lies below it.
        """
        parent_path = names.parent(path)
        parent = self.nodes.get(parent_path)
        if parent is None:
            self._create(parent_path, b"", implicit=True)
            parent = self.nodes.get(parent_path)
            assert parent is not None
        self._check(parent_path, parent, Access.WRITE)
        perms = parent.perms
        if self.domid != 0:
            if self.nodes.counts[self.domid] >= self.quotas.nodes:
                raise XenStoreError(errno.ENOSPC, "node quota exceeded")
            perms = (Perm(perms[0].access, self.domid), *perms[1:])
        kids = (*parent.children, names.basename(path))
        self.nodes.set_node(parent_path, replace(parent, children=kids))
        self.nodes.set_node(path, Node(value, perms))
        if not implicit:
            self.changes.append(Change(path, perms))

    def _remove_subtree(self, path: str, node: Node) -> None:
        for child in node.children:
            child_path = names.join(path, child)
            child_node = self.nodes.get(child_path)
            if child_node is not None:
                self._remove_subtree(child_path, child_node)
        self.nodes.set_node(path, None)

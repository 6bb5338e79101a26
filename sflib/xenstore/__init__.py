"""A XenStore-protocol server, wire-compatible with pyxs and xenstore-utils.

wire: the packet codec (pure). paths, perms: node names and access (pure).
store: the tree, transactions, quotas and watches (pure, no I/O).
requests: one request in, one reply and its watch events out (pure).
server: asyncio connections (Unix socket for domain 0, any stream for a domain).
"""

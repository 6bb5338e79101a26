"""The cluster: sfmasterd, where every host's sfld registers and heartbeats and
tickets are granted across hosts, and the calls between daemons (DESIGN §1, §5).

allocator: where a ticket's clones go (pure). wire: authenticated JSON lines over
TCP between daemons. registry: the master's SQLite store. master: sfmasterd's
logic. peers: an sfld's client of the master and of other sflds. testbed: a
cluster of network-namespace hosts on one machine.
"""

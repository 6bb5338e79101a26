"""Private networks for clone families (DESIGN §1, network identity).

identity: a family member's MAC and IP, functions of the family and the clone ID
(pure). fabric: a family's layer-2 network on one host, a bridge joined to the
other hosts' by VXLAN (an adapter over ip(8) and bridge(8)). commands: how they
and the router run their commands without holding sfld's event loop up.
"""

"""Memory of clones on other hosts (DESIGN §2 step 4): the memory server on the
parent's host serves frozen memory images; memtap on a clone's host exposes them
as files through FUSE, fetching each page range on first touch.

protocol: the wire format between them (pure, mirrors c/memproto.h).
"""

"""VM fork: the guest API and the host side that carries it out.

layout: the XenStore keys and messages between them (pure). api: the guest side.
tickets: reservations and the embedded allocator (pure). memory: frozen memory
images and who uses them. checkpoint: descriptors (manifest + device state).
engine: sfld's executor of requests.
"""

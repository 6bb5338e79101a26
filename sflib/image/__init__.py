"""The guest image: a Debian kernel and an initramfs that is the guest's whole root fs.

packages (apt download and unpack), pydists (our Python dependencies), modules
(kernel module order), rootfs (the tree), initramfs (cpio packing), build (the
orchestration and the up-to-date check).
"""

"""SnowFlock: VM fork for Linux clusters, on QEMU.

The library only adds a NullHandler to its logger; executables configure logging
(see sflib.log).
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

"""The guest's side of a family network: a clone asks sfld to bring its card's
link up once hooks.d/clone-post.d/10-network has given it its own identity.

    python3 -m sflib.guest.net link-up
"""

from __future__ import annotations

import sys

from sflib.errors import SnowFlockError
from sflib.guest.api import request


def main(argv: list[str]) -> int:
    if argv != ["link-up"]:
        print("usage: python3 -m sflib.guest.net link-up", file=sys.stderr)
        return 2
    try:
        request("link", up=True)
    except SnowFlockError as e:
        print(f"link-up: {e}", file=sys.stderr)
        return int(e.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

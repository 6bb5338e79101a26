"""sfld settings a user sets, seen from inside a real VM (issue 16)."""

from __future__ import annotations

import json
import re

import pytest

from sflib.image import build as image
from tests.integration.conftest import boot, console, running_host

pytestmark = pytest.mark.vm

PARTIAL = r"""
out=$(sf-ticket --json 5 2>/tmp/warning)
echo "TICKET $out"
echo "WARNING $(cat /tmp/warning)"
t=$(echo "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["ticket"])')
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" | sed 's/^/JOINED /'; echo SF-DONE
else
  sf-exit "$id"
fi
"""


def test_max_clones_grants_part_of_a_ticket_and_the_vm_forks_that_many(
    guest_image: image.Result,
) -> None:
    """sfld --max-clones 2: a ticket for 5 gets 2 (sf-ticket warns), and sf-clone
    makes exactly those 2."""
    with running_host(guest_image, "--max-clones", "2") as h:
        boot(h, "few", PARTIAL)
        out = console(h, "few", timeout=600)
        ticket = json.loads(re.search(r"^TICKET (.*)$", out, re.M).group(1))  # type: ignore[union-attr]
        assert (ticket["granted"], ticket["requested"]) == (2, 5), out[-3000:]
        assert "granted 2 of 5 clones" in re.search(r"^WARNING (.*)$", out, re.M).group(1)  # type: ignore[union-attr]
        joined = sorted(re.findall(r"^JOINED (\d+) (\w+) (\d+)$", out, re.M))
        assert joined == [("1", "exited", "1"), ("2", "exited", "2")], out[-3000:]

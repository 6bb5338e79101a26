"""sfmasterd settings a cluster admin sets, seen from real VMs in a test cluster
(issue 16): --max-family-clones and --max-host-clones."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from sflib.image import build as image
from tests.integration.conftest import GO, boot, console, running_cluster

pytestmark = pytest.mark.vm

FAMILY_MAX, HOST_MAX = 3, 4

# Parent a (on h1): 2, then 1 of 2 (the family's cap), then none; it forks with the
# second ticket and joins it, which gives its clone back: one more ticket then.
FAMILY = """
t1=$(sf-ticket --json 2); echo "T1 $t1"
t2=$(sf-ticket --json 2 2>/tmp/w); echo "T2 $t2"; echo "T2-WARNING $(cat /tmp/w)"
sf-ticket 1 2>/tmp/e; echo "T3 rc=$? $(cat /tmp/e)"
t=$(echo "$t2" | python3 -c 'import json, sys; print(json.load(sys.stdin)["ticket"])')
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" | sed 's/^/JOINED /'
  t4=$(sf-ticket --json 1); echo "T4 rc=$? $t4"
  echo SF-DONE
else
  sf-exit 5
fi
"""

# Parent b (on h1, once a holds 3) and parent c (on h2): 3 asked by each.
OTHER = """
t1=$(sf-ticket --json 3 2>/tmp/w); echo "T1 $t1"; echo "T1-WARNING $(cat /tmp/w)"
sf-ticket 1 2>/tmp/e; echo "T2 rc=$? $(cat /tmp/e)"
echo SF-DONE
"""


def tagged(out: str, tag: str) -> str:
    found = re.findall(f"^{re.escape(tag)} (.*)$", out, re.M)
    assert len(found) == 1, f"one {tag} line expected:\n{out[-3000:]}"
    return str(found[0]).rstrip()


def grant(out: str, tag: str) -> tuple[int, int]:
    ticket: dict[str, Any] = json.loads(tagged(out, tag).removeprefix("rc=0 "))
    return ticket["granted"], ticket["requested"]


def test_max_family_and_host_clones_cap_the_tickets_of_a_parent_and_of_a_host(
    guest_image: image.Result,
) -> None:
    """A family holds at most 3 clones across its live tickets, the parents of one
    host at most 4: a request past a limit gets what is left (sf-ticket warns),
    at the limit none (exit 4, naming the setting); a joined ticket's clones count
    no longer; another host's parents have a cap of their own."""
    limits = ("--max-family-clones", str(FAMILY_MAX), "--max-host-clones", str(HOST_MAX))
    with running_cluster(guest_image, 3, master_args=limits) as cluster:
        h1, h2, _ = cluster.hosts
        boot(h1, "a", FAMILY)
        b = boot(h1, "b", GO + OTHER)
        boot(h2, "c", OTHER)
        a_out = console(h1, "a", timeout=600)
        assert grant(a_out, "T1") == (2, 2) and grant(a_out, "T2") == (1, 2), a_out[-3000:]
        assert "granted 1 of 2 clones" in tagged(a_out, "T2-WARNING")
        assert tagged(a_out, "T3").startswith("rc=4 "), a_out[-3000:]
        assert "max_family_clones 3" in tagged(a_out, "T3")
        assert tagged(a_out, "JOINED") == "1 exited 5"
        assert grant(a_out, "T4") == (1, 1)  # a holds 3 again: 2 + 1
        h1.xenstore("xenstore-write", f"/local/domain/{b['domid']}/go", "1")
        b_out = console(h1, "b")
        assert grant(b_out, "T1") == (1, 3), b_out[-3000:]  # h1's parents: 3 + 1
        assert "granted 1 of 3 clones" in tagged(b_out, "T1-WARNING")
        assert tagged(b_out, "T2").startswith("rc=4 ") and "max_host_clones 4" in b_out
        c_out = console(h2, "c")
        assert grant(c_out, "T1") == (3, 3), c_out[-3000:]  # h2's own parents' cap
        assert tagged(c_out, "T2").startswith("rc=4 ") and "max_family_clones 3" in c_out

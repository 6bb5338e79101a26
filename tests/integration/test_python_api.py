"""import snowflock in a real guest: a program forks, each clone reports its ID as
its exit status, the parent joins; errors carry the tools' exit codes; threads call
at once (snowflock.3py)."""

from __future__ import annotations

import re

import pytest

from tests.integration.conftest import Host, boot, console

pytestmark = pytest.mark.vm

PROGRAM = r"""
import threading, snowflock
t = snowflock.request_ticket(2)
me = snowflock.clone(t)
if me:
    snowflock.exit(10 + me)
print("TICKET", t.granted, t.requested, flush=True)
print("JOINED", *(f"{c.id}:{c.state}:{c.status}" for c in snowflock.join(t)), flush=True)
for name, call in (("JOIN-AGAIN", lambda: snowflock.join(t)), ("EXIT-IN-PARENT", snowflock.exit),
                   ("BAD-TICKET", lambda: snowflock.kill("t99-nope"))):
    try:
        call()
    except snowflock.Error as e:
        print(name, type(e).__name__, e.exit_code, flush=True)
got = []
def one(): got.append(snowflock.request_ticket(1).id)
threads = [threading.Thread(target=one) for _ in range(4)]
for x in threads: x.start()
for x in threads: x.join()
print("THREADS", len(set(got)), flush=True)
"""
SCRIPT = f"cat >/p.py <<'PY'\n{PROGRAM}PY\npython3 /p.py\necho SF-DONE\n"


def test_a_python_program_forks_and_joins_with_import_snowflock(host: Host) -> None:
    boot(host, "py", SCRIPT, memory=256)
    out = console(host, "py")
    print(out)  # shown when an assertion fails
    assert re.search(r"^TICKET 2 2$", out, re.M)
    assert re.search(r"^JOINED 1:exited:11 2:exited:12$", out, re.M)  # each its own ID
    assert re.search(r"^JOIN-AGAIN WrongStateError 4$", out, re.M)
    assert re.search(r"^EXIT-IN-PARENT WrongStateError 4$", out, re.M)
    assert re.search(r"^BAD-TICKET NotFoundError 3$", out, re.M)
    assert re.search(r"^THREADS 4$", out, re.M)  # four threads at once, four tickets

"""The pages sf-clone holds for the avoidance heuristic (sflib.guest.freepages),
in a real guest: the frames it reports must stay its own until its answer comes,
whatever the guest's kernel does meanwhile. sfld punches those frames out of the
frozen image after the pause; a frame that moved would have been handed to
somebody else, whose page then reads as zeros in the parent and in every clone
(seen: sf-clone itself dying of a zeroed TLS page in a 2 GiB parent, after the
guest's khugepaged had collapsed small pages into huge ones during the fork)."""

from __future__ import annotations

import re

from tests.integration.conftest import Host, boot, console

# A control region of small pages, mapped as sf-clone's was before the fix, and
# sf-clone's own reservation; then khugepaged, told to hurry, collapses what it
# may: frames of the control (else the test proves nothing), none of the
# reservation's (before the fix, khugepaged went for the reservation first).
# Compaction, the other mover, is kept off by locking the pages
# (vm.compact_unevictable_allowed=0); this guest gives it no reason to run.
HOLD = r"""
THP=/sys/kernel/mm/transparent_hugepage
echo never > $THP/enabled  # small pages for both regions, as a guest low on memory gets
python3 - <<'PY'
import mmap, time
from sflib.guest import freepages
THP = "/sys/kernel/mm/transparent_hugepage/"
size = 40 << 20
control = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
control_frames = freepages._frames(control, size)
held = freepages.reserve()
open(THP + "khugepaged/scan_sleep_millisecs", "w").write("0")
open(THP + "khugepaged/pages_to_scan", "w").write("8192")
open(THP + "enabled", "w").write("always")
# A new mapping enters this process with khugepaged, which then scans all of it.
enter = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
deadline = time.monotonic() + 400
while time.monotonic() < deadline:  # until khugepaged moved frames of either
    moved = len(set(control_frames) - set(freepages._frames(control, size)))
    held_moved = len(set(held.pfns) - set(held.frames()))
    if moved or held_moved:
        break
    time.sleep(0.5)
print("CONTROL", len(control_frames), "MOVED", moved, flush=True)
print("HELD", len(held.pfns), "MOVED", held_moved, flush=True)
held.release()
PY
echo SF-DONE
"""


def test_held_free_pages_stay_put_while_khugepaged_collapses(host: Host) -> None:
    boot(host, "hold", HOLD)
    out = console(host, "hold", timeout=600)
    control = re.search(r"^CONTROL (\d+) MOVED (\d+)$", out, re.M)
    held = re.search(r"^HELD (\d+) MOVED (\d+)$", out, re.M)
    assert control and held, out[-3000:]
    assert int(held.group(1)) > 4096, out[-3000:]  # what 40 MiB left of 256 MiB's free memory
    assert int(held.group(2)) == 0, f"{held.group(2)} held frames moved: {out[-3000:]}"
    assert int(control.group(2)) > 0, f"khugepaged moved nothing: {out[-3000:]}"


# sf-clone gives its pages back before it returns, in the parent and in the clone
# (which exits 1 if they were not back), and leaves no process behind.
GIVE_BACK = r"""
available() { awk '/^MemAvailable/ { print $2 }' /proc/meminfo; }
before=$(available)
t=$(sf-ticket 1)
id=$(sf-clone --debug --avoidance "$t" 2>/tmp/err)
after=$(available)
taken=$(sed -n 's/.*free pages: \([0-9]*\) taken.*/\1/p' /tmp/err)
grep -q "free pages given back in" /tmp/err && back=1 || back=0
left=$(ps -o comm | grep -c '^sf-clone')
if [ "$id" = 0 ]; then
  echo "PARENT taken $taken back $back before $before after $after left $left"
  sf-join "$t" | sed 's/^/JOINED /'; echo SF-DONE
else
  [ "$back" = 1 ] && [ "$left" = 0 ] && [ "$after" -ge $((before - 16384)) ]
  sf-exit $?
fi
"""


def test_sf_clone_has_given_the_free_pages_back_when_it_returns(host: Host) -> None:
    boot(host, "back", GIVE_BACK)
    out = console(host, "back")
    parent = re.search(r"^PARENT taken (\d+) back (\d) before (\d+) after (\d+) left (\d+)$",
                       out, re.M)  # fmt: skip
    assert parent, out[-3000:]
    taken, back, before, after, left = (int(g) for g in parent.groups())
    assert taken > 8192 and back == 1, out[-3000:]  # a 256 MiB guest has 32+ MiB free
    assert after >= before - 16384 and left == 0, out[-3000:]  # 16 MiB: the kernel's own
    assert "JOINED 1 exited 0" in out, out[-3000:]  # the same in the clone

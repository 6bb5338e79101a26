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

"""VM fork on one host, from inside real guests (TCG): the seven calls and their
wrong uses. Each guest runs a shell script and prints unambiguous lines that the
test reads from the parent's console."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
from pathlib import Path

import pytest

from sflib.image.overlay import overlay
from tests.integration.conftest import GO, Host, boot, console, vm_names

pytestmark = pytest.mark.vm

FORK = """
dd if=/dev/urandom of=/tmp/state bs=1M count=8 2>/dev/null
h=$(sha256sum /tmp/state | cut -c1-16)
t=$(sf-ticket 3)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" > /tmp/join; echo "JOIN rc=$?"; sed 's/^/JOINED /' /tmp/join
  for k in 1 2 3; do echo "FROM $k $(sf-share get "$t" $k result)"; done
  echo "PARENT $h"; echo SF-DONE
else
  echo "$id $(sha256sum /tmp/state | cut -c1-16)" | sf-share put result
  sf-exit $((id + 10))
fi
"""


def test_three_clones_share_the_parents_memory_and_report_their_ids(host: Host) -> None:
    boot(host, "farm", FORK)
    out = console(host, "farm")
    parent_hash = re.search(r"^PARENT (\w+)", out, re.M).group(1)  # type: ignore[union-attr]
    for k in (1, 2, 3):
        assert f"FROM {k} {k} {parent_hash}" in out  # its own ID, the memory from before
        assert f"JOINED {k} exited {k + 10}" in out
    assert "JOIN rc=1" in out  # statuses were not all 0
    assert vm_names(host) == ["farm"]  # joined clones are gone
    pause = re.search(r"farm paused ([\d.]+) ms", host.log.read_text())
    assert pause, "the parent's pause is logged"
    ticket = host.vm_json("tickets")[0]
    assert ticket["state"] == "ended" and ticket["pause_ms"] == float(pause.group(1))
    assert len(list(host.memory_dir.glob("*.mem"))) == 1  # only the image the parent maps


# The parent checkpoints, then changes its memory (a mark and 8 MiB rewritten) and
# says so (MOVED); told to go on, it clones the checkpoint, whose clones must find
# the memory from before.
CHECKPOINT = (
    """
echo before > /tmp/mark
dd if=/dev/urandom of=/tmp/state bs=1M count=8 2>/dev/null
h=$(sha256sum </tmp/state | cut -c1-16)
set -- $(sf-checkpoint)
c=$1; id=$2
if [ "$id" = 0 ]; then
  echo "CKPT $c $h"
  echo after > /tmp/mark
  dd if=/dev/urandom of=/tmp/state bs=1M count=8 conv=notrunc 2>/dev/null
  echo "MOVED $(cat /tmp/mark) $(sha256sum </tmp/state | cut -c1-16)"
  """
    + GO
    + """
  t=$(sf-ticket 2)
  echo "CREATE $(sf-clone --from "$c" "$t")"
  sf-join "$t"; echo "JOIN rc=$?"
  for k in 1 2; do echo "FROM $k $(sf-share get "$t" $k mark)"; done
  echo SF-DONE
else
  echo "$c $id $(cat /tmp/mark) $(sha256sum </tmp/state | cut -c1-16)" | sf-share put mark
  sf-exit 0
fi
"""
)


def moved_on(host: Host, name: str) -> tuple[str, str]:
    """Once the parent has changed its memory after its checkpoint: the digests of
    its state before the checkpoint and now."""
    out = console(host, name, "MOVED")
    before = re.search(r"^CKPT \S+ (\w+)$", out, re.M)
    moved = re.search(r"^MOVED after (\w+)$", out, re.M)
    assert before and moved, out[-2000:]
    return before.group(1), moved.group(1)


def test_checkpoint_now_clones_later(host: Host) -> None:
    info = boot(host, "ckpt", CHECKPOINT)
    text = console(host, "ckpt", "CKPT")
    ckpt = re.search(r"^CKPT (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    listed = host.vm_json("checkpoints")
    assert [c["checkpoint"] for c in listed] == [ckpt]
    manifest = json.loads(host.tool("sf-vm", "describe", ckpt).stdout)
    assert manifest["format"] == "snowflock-descriptor-1" and manifest["owner"] == "ckpt"
    assert manifest["devstate"]["bytes"] > 0 and manifest["machine"]["memory_mib"] == 256
    before, moved = moved_on(host, "ckpt")
    host.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go", "1")
    out = console(host, "ckpt")
    assert "CREATE 0" in out and "JOIN rc=0" in out
    for k in (1, 2):  # the memory from before the checkpoint, not what the parent has now
        assert f"FROM {k} {ckpt} {k} before {before}" in out, out[-2000:]
    assert moved != before
    host.tool("sf-vm", "stop", "ckpt")
    assert host.vm_json("checkpoints") == []  # a checkpoint ends with its VM
    assert host.leftovers() == []


def test_clones_of_a_corrupt_checkpoint_fail_with_qemus_reason(host: Host) -> None:
    """A device state cut short: each clone's QEMU refuses it and exits while
    loading; sfld says so (not a timeout), the clones are failed, and nothing stays."""
    info = boot(host, "torn", CHECKPOINT)
    text = console(host, "torn", "CKPT")
    ckpt = re.search(r"^CKPT (\S+)", text, re.M).group(1)  # type: ignore[union-attr]
    devstate = host.root / "var/lib/snowflock/checkpoints" / ckpt / "devstate"
    whole = devstate.read_bytes()
    devstate.write_bytes(whole[: len(whole) // 2])
    host.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go", "1")
    out = console(host, "torn")
    assert "CREATE 0" in out and "JOIN rc=1" in out, out[-2000:]
    log = host.log.read_text()
    assert "while migrating" in log or "migration failed" in log, log[-3000:]
    assert "migration not done" not in log
    host.tool("sf-vm", "stop", "torn")
    assert host.leftovers() == []


KILL = (
    """
t=$(sf-ticket 2)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  until [ "$(sf-share ls "$t" | wc -l)" = 2 ]; do sleep 1; done
  echo "CLONES-UP $t"
  """
    + GO
    + """
  echo "KILLED $(sf-kill "$t")"
  sf-join "$t"; echo "JOIN-AFTER-KILL rc=$?"
  sf-exit 0; echo "EXIT-IN-PARENT rc=$?"
  echo SF-DONE
else
  sf-join "$t"; echo "$?" | sf-share put joinrc
  sleep 100000
fi
"""
)


def test_kill_and_a_crashed_clone(host: Host) -> None:
    info = boot(host, "boss", KILL)
    out = console(host, "boss", "CLONES-UP")
    ticket = re.search(r"CLONES-UP (\S+)", out).group(1)  # type: ignore[union-attr]
    clones = {v["clone_id"]: v for v in host.vm_json("ls") if v["family"] == "boss"}
    assert sorted(clones) == [1, 2]
    os.kill(clones[1]["pid"], signal.SIGKILL)  # a fault: clone 1's QEMU dies
    host.xenstore("xenstore-write", f"/local/domain/{info['domid']}/go", "1")
    out = console(host, "boss")
    assert "KILLED 2" in out  # clone 1 had already crashed
    assert "JOIN-AFTER-KILL rc=4" in out
    assert "EXIT-IN-PARENT rc=4" in out
    states = {c["id"]: c["state"] for c in host.vm_json("tickets")[0]["clones"].values()}
    assert states == {1: "crashed", 2: "killed"}
    assert vm_names(host) == ["boss"]
    share = f"/local/domain/{info['domid']}/snowflock/share/{ticket}"
    joinrc = host.xenstore("xenstore-read", f"{share}/2/joinrc/0")
    assert base64.b64decode(joinrc.stdout.strip()) == b"4\n"  # sf-join in a clone: refused


ERRORS = (
    """
sf-ticket 0; echo "TICKET-0 rc=$?"
sf-ticket 100000; echo "TICKET-HUGE rc=$?"
sf-join t99-abcdef; echo "JOIN-UNKNOWN rc=$?"
sf-kill t99-abcdef; echo "KILL-UNKNOWN rc=$?"
sf-clone t99-abcdef; echo "CLONE-UNKNOWN rc=$?"
sf-clone --from c99-abcdef "$(sf-ticket 1)"; echo "FROM-UNKNOWN rc=$?"
t=$(sf-ticket 1)
sf-join "$t"; echo "JOIN-UNUSED rc=$?"
echo "FOREIGN $t"
"""
    + GO
    + """
go=$(python3 -c "from sflib.guest.bus import open_bus as o; print(o().read(b'go').decode())")
sf-clone "$go"
echo "FOREIGN-USE rc=$?"
echo SF-DONE
"""
)


def test_wrong_use_is_refused_and_changes_nothing(host: Host) -> None:
    a = boot(host, "a", ERRORS)
    b = boot(host, "b", ERRORS)
    ticket_of_a = re.search(r"FOREIGN (\S+)", console(host, "a", "FOREIGN")).group(1)  # type: ignore[union-attr]
    console(host, "b", "FOREIGN")
    host.xenstore("xenstore-write", f"/local/domain/{a['domid']}/go", "none")
    host.xenstore("xenstore-write", f"/local/domain/{b['domid']}/go", ticket_of_a)
    out = console(host, "b")
    for line in ("TICKET-0 rc=2", "TICKET-HUGE rc=2", "JOIN-UNKNOWN rc=3", "KILL-UNKNOWN rc=3",
                 "CLONE-UNKNOWN rc=3", "FROM-UNKNOWN rc=3", "JOIN-UNUSED rc=4",
                 "FOREIGN-USE rc=3"):  # fmt: skip
        assert line in out, line
    assert "sf-ticket: error: cannot ask for 0 clones" in out
    assert vm_names(host) == ["a", "b"]  # no clone was made by any of it
    assert all(t["state"] == "granted" for t in host.vm_json("tickets"))


HOOKED = """
t=$(sf-ticket 1)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
  sf-join "$t" >/dev/null
  echo "HOSTNAME $(sf-share get "$t" 1 host)"
  sf-share get "$t" 1 env | sed 's/^/HOOKENV /'
  echo SF-DONE
else
  hostname | sf-share put host
  sf-share put env /tmp/hook.env
  sf-exit 0
fi
"""
RECORD_HOOK = "#!/bin/sh\nenv | grep -E '^(SF_|PATH=|HOME=)' | sort > /tmp/hook.env\n"


def test_clone_post_hooks_run_in_each_clone_with_its_identity(host: Host, tmp_path: Path) -> None:
    image = overlay(host.image, tmp_path / "image", {
        "/etc/snowflock/hooks.d/clone-post.d/50-record": (RECORD_HOOK.encode(), 0o755),
    })  # fmt: skip
    b64 = base64.b64encode(HOOKED.encode()).decode()
    host.vm_json("run", "--name", "hooked", "--image", str(image), "--wait-ready", "--append",
                 f'sf.run="echo {b64} | base64 -d > /g.sh && sh /g.sh; sleep 100000"')  # fmt: skip
    out = console(host, "hooked")
    assert "HOSTNAME hooked-1" in out  # the shipped 05-hostname ran first
    env = dict(line.split(" ", 1)[1].split("=", 1) for line in out.splitlines()
               if line.startswith("HOOKENV "))  # fmt: skip
    assert env["SF_ID"] == "1" and env["SF_FAMILY"] == "hooked"
    assert env["SF_HOOKS_EVENT"] == "clone" and env["SF_HOOKS_PHASE"] == "post"
    assert env["SF_TICKET"].startswith("t") and "HOME" not in env  # environment cleared

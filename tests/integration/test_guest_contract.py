"""What the man pages promise inside a guest, run for real (TCG): sf-share beyond one
chunk, two forks of one VM at once, a checkpoint cloned twice, failing and moved
hooks, stopping a parent that has clones, sfld without network cards and
sf-vm logs -f. Several checks share a boot: each costs 20-60 s under TCG."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest

from sflib import run
from sflib.image import build as image
from sflib.image.overlay import overlay
from tests.integration.conftest import (
    GO,
    ROOT,
    Host,
    boot,
    console,
    running_host,
    vm_names,
)

pytestmark = pytest.mark.vm


def lines(out: str, tag: str) -> list[str]:
    """What follows "TAG " on each console line that starts with it."""
    return [m.group(1).rstrip() for m in re.finditer(f"^{re.escape(tag)} (.*)$", out, re.M)]


def clone_console(host: Host, name: str, marker: str, timeout: float = 300) -> str:
    """A clone's console up to marker: the parent's sf-clone returns before its
    clones start, so wait for the clone to be listed first."""
    deadline = time.monotonic() + timeout
    while name not in vm_names(host):
        assert time.monotonic() < deadline, f"no clone {name}:\n{host.log.read_text()[-3000:]}"
        time.sleep(1)
    return console(host, name, marker, timeout=deadline - time.monotonic())


def line(out: str, tag: str) -> str:
    found = lines(out, tag)
    assert len(found) == 1, f"one {tag} line expected, got {found}:\n{out[-3000:]}"
    return found[0]


# Clone 1 shares a 20 KB value (14 chunks of 1536 bytes) and tries a bad key; the
# parent reads it back, tries wrong keys, clears the share, and shares a value of its own.
SHARE = """
t=$(sf-ticket 1)
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
 sf-join "$t" | sed 's/^/JOINED /'
 echo "BIG $(sf-share get "$t" 1 big | sha256sum | cut -c1-16)"
 sf-share get "$t" 1 facts | sed 's/^/FACTS /'
 sf-share get "$t" 1 nokey; echo "GET-MISSING rc=$?"
 sf-share get "$t" 1 'a/b'; echo "GET-BADKEY rc=$?"
 sf-share ls "$t" | sed 's/^/LS /'
 sf-share clear "$t"; echo "CLEAR rc=$?"
 sf-share ls "$t"; echo "LS-CLEARED rc=$?"
 sf-share get "$t" 1 big >/dev/null; echo "GET-CLEARED rc=$?"
 head -c 5000 /dev/urandom >/tmp/p
 sf-share put mine /tmp/p; echo "PUT-PARENT rc=$? $(sha256sum </tmp/p | cut -c1-16)"
 echo x | sf-share put 'a b'; echo "PUT-BADKEY rc=$?"
 echo SF-DONE
else
 head -c 20000 /dev/urandom >/tmp/b
 sf-share put big /tmp/b; a=$?
 echo x | sf-share put 'a/b' 2>/tmp/e; b=$?
 echo "$(sha256sum </tmp/b | cut -c1-16) $a $b $(cat /tmp/e)" | sf-share put facts
 sf-exit 0
fi
"""


def test_share_many_chunks_bad_and_missing_keys_clear_and_a_parents_own_put(host: Host) -> None:
    info = boot(host, "sharer", SHARE)
    out = console(host, "sharer")
    assert line(out, "JOINED") == "1 exited 0"
    big_sum, put_rc, badkey_rc, error = line(out, "FACTS").split(" ", 3)
    assert put_rc == "0" and line(out, "BIG") == big_sum  # all 14 chunks, in order
    assert badkey_rc == "2" and error.startswith("sf-share: error: invalid key 'a/b'")
    assert line(out, "GET-MISSING") == "rc=3" and line(out, "GET-BADKEY") == "rc=2"
    assert lines(out, "LS") == ["1 big", "1 facts"]
    assert line(out, "CLEAR") == "rc=0"
    assert line(out, "LS-CLEARED") == "rc=3" and line(out, "GET-CLEARED") == "rc=3"
    rc, parent_sum = line(out, "PUT-PARENT").split()
    assert rc == "rc=0" and line(out, "PUT-BADKEY") == "rc=2"
    # The parent's own value, in its own domain, as the host collects it.
    base = f"/local/domain/{info['domid']}/snowflock/share/parent/0/mine"
    count = int(host.xenstore("xenstore-read", f"{base}/chunks").stdout)
    data = b"".join(base64.b64decode(host.xenstore("xenstore-read", f"{base}/{i}").stdout)
                    for i in range(count))  # fmt: skip
    assert count == 4 and len(data) == 5000
    assert hashlib.sha256(data).hexdigest()[:16] == parent_sum
    assert vm_names(host) == ["sharer"]


# Clone 1 shares 1 MB, then the same again: past its domain's node quota (1000 nodes of
# 1536 bytes), which must fail with 111 and leave the clone able to end. The host
# reads the clone's console, then lets the clone sf-exit and the parent join it (45 s
# at most, so that a clone that cannot end is killed). The parent then shares too much.
QUOTA = (
    """
t=$(sf-ticket 1)
echo "TICKET $t"
id=$(sf-clone "$t")
if [ "$id" = 0 ]; then
 """
    + GO
    + """
 timeout 45 sf-join "$t" >/tmp/j; echo "JOIN rc=$?"; sed 's/^/JOINED /' /tmp/j
 grep -q . /tmp/j || sf-kill "$t"
 echo "GOT $(sf-share get "$t" 1 mb | sha256sum | cut -c1-16) $(sf-share get "$t" 1 sum)"
 sf-share get "$t" 1 mb2 >/dev/null; echo "GET-PARTIAL rc=$?"
 sf-share ls "$t" | sed 's/^/LS /'
 sf-ticket 1 >/dev/null; echo "TICKET-AFTER rc=$?"
 head -c 2000000 /dev/zero | sf-share put huge 2>/tmp/e; echo "PUT-HUGE rc=$?"
 sed 's/^/ERR /' /tmp/e
 echo SF-DONE
else
 head -c 1000000 /dev/urandom >/tmp/m
 sha256sum </tmp/m | cut -c1-16 | sf-share put sum
 sf-share put mb </tmp/m; echo "MB rc=$?"
 sf-share put mb2 </tmp/m 2>/tmp/e; echo "MB2 rc=$?"
 sed 's/^/ERR /' /tmp/e
 echo QUOTA-DONE
 """
    + GO
    + """
 sf-exit 7
fi
"""
)


def test_share_over_quota_fails_with_111_and_the_family_carries_on(host: Host) -> None:
    info = boot(host, "quota", QUOTA)
    ticket = line(console(host, "quota", "TICKET"), "TICKET")
    clone = f"{ticket}-1"
    out = clone_console(host, clone, "QUOTA-DONE")
    domid = next(v["domid"] for v in host.vm_json("ls") if v["name"] == clone)
    for d in (domid, info["domid"]):  # the clone may end; the parent waits for it 45 s
        host.xenstore("xenstore-write", f"/local/domain/{d}/go", "1")
    parent = console(host, "quota")
    print(out, parent, sep="\n")  # shown when an assertion fails
    assert line(out, "MB") == "rc=0"
    assert line(out, "MB2") == "rc=111"  # over the quota: a system failure
    assert [e.split(": error: ")[0] for e in lines(out, "ERR")] == ["sf-share"]  # one line
    assert line(parent, "JOIN") == "rc=1" and line(parent, "JOINED") == "1 exited 7"
    got, shared = line(parent, "GOT").split()
    assert got == shared and line(parent, "GET-PARTIAL") == "rc=3"
    assert lines(parent, "LS") == ["1 mb", "1 sum"]  # not the half-stored mb2
    assert line(parent, "TICKET-AFTER") == "rc=0"
    assert line(parent, "PUT-HUGE") == "rc=111"  # the parent's own quota
    assert [e.split(": error: ")[0] for e in lines(parent, "ERR")] == ["sf-share"]


# Two sf-clone at once on two tickets, then one more: the one asked while another's
# checkpoint is in flight is refused (4), or forks if it came after. The clones wait for
# the host; the parent joins the tickets that forked all at once. The host lets the
# clones end once sfld has every join (or one join has already ended: it failed).
AT_ONCE = (
    """
go() { id=$(sf-clone "$1" 2>/tmp/e$1); rc=$?
 if [ "$rc$id" = 01 ]; then
  """
    + GO
    + """
  sf-exit 0
 fi
 echo "$rc $id" >/tmp/r$1; echo "TRY $1 $rc $id $(tr '\\n' ' ' </tmp/e$1)"; }
a=$(sf-ticket 1); b=$(sf-ticket 1); c=$(sf-ticket 1)
go "$a" & go "$b" & wait
go "$c"
p=
for t in $a $b $c; do
 [ "$(cat /tmp/r$t)" = "0 0" ] || continue
 { sf-join "$t" >/tmp/j$t 2>&1; echo $? >>/tmp/j$t; } & p="$p $!"
done
echo JOINING
while :; do for x in $p; do kill -0 $x 2>/dev/null || break 2; done; sleep 1; done
echo FIRST-END; wait
for t in $a $b $c; do [ -f /tmp/j$t ] && echo "JOIN $t $(tr '\\n' ' ' </tmp/j$t)"; done
echo SF-DONE
"""
)


def test_two_forks_at_once_one_refused_while_in_flight_and_tickets_joined_at_once(
    host: Host,
) -> None:
    boot(host, "conc", AT_ONCE)
    out = console(host, "conc", "JOINING")
    tries: dict[str, tuple[str, str]] = {}  # ticket: (sf-clone's status, its output and error)
    for x in lines(out, "TRY"):
        t, rc, *rest = x.split(" ", 2)
        tries[t] = (rc, "".join(rest))
    forked = [t for t, (rc, rest) in tries.items() if (rc, rest) == ("0", "0")]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # every join in flight at once, or one is over
        text = host.tool("sf-vm", "logs", "conc").stdout
        joins = [t for t in forked if f"conc: join {{'ticket': '{t}'}}" in host.log.read_text()]
        if len(joins) == len(forked) or re.search("^FIRST-END", text, re.M):
            break
        time.sleep(1)
    for vm in host.vm_json("ls"):
        if vm["name"] != "conc":
            host.xenstore("xenstore-write", f"/local/domain/{vm['domid']}/go", "1")
    out = console(host, "conc")
    print(out)  # shown when an assertion fails
    assert len(tries) == 3, tries
    *pair, third = tries  # the two at once, in the order they ended; then the third
    assert tries[third] == ("0", "0"), tries
    log = host.log.read_text()
    requests = {t: log.find(f"conc: clone {{'ticket': '{t}'") for t in pair}
    first = min((t for t in pair if t in forked), key=requests.__getitem__)
    ended = log.index("conc paused", requests[first])  # its checkpoint, over
    for t in set(pair) - {first}:
        if t in forked:  # asked after the first's checkpoint ended
            assert requests[t] > ended
        else:  # asked while it was in flight
            assert tries[t][0] == "4" and "already in flight" in tries[t][1]
            assert requests[first] < requests[t] < ended
    joined = dict(x.split(" ", 1) for x in lines(out, "JOIN"))
    assert joined == {t: "1 exited 0 0" for t in forked}  # its output, its status


# The image's hooks.d gains a failing hook and a later one; a hooks.d of the guest's
# own, given with --hooks-dir, holds one more. Each clone shares sf-clone's status, ID,
# stderr, host name and what the hooks left.
HOOKS = """
mkdir -p /tmp/hk/clone-post.d
printf '#!/bin/sh\\necho "$SF_ID $SF_TICKET" >/tmp/moved\\n' >/tmp/hk/clone-post.d/50-moved
chmod +x /tmp/hk/clone-post.d/50-moved
t=$(sf-ticket 1); u=$(sf-ticket 1)
id=$(sf-clone "$t" 2>/tmp/e); rc=$?
if [ "$id" = 0 ]; then
 sf-join "$t" | sed 's/^/JOINED /'
 id=$(sf-clone --hooks-dir /tmp/hk "$u" 2>/tmp/e); rc=$?
fi
if [ "$id" = 0 ]; then
 sf-join "$u" | sed 's/^/JOINED /'
 echo "PARENT $(hostname)"
 for x in $t $u; do sf-share get "$x" 1 r | sed "s/^/R $x /"; done
 echo SF-DONE
else
 { echo "rc=$rc id=$id"; hostname; cat /tmp/after /tmp/moved; cat /tmp/e; } 2>&1 | sf-share put r
 sf-exit 0
fi
"""
FAILING_HOOK = b"#!/bin/sh\necho 'not today' >&2\nexit 1\n"
LATER_HOOK = b'#!/bin/sh\necho "after $SF_ID" >/tmp/after\n'


def test_a_failing_clone_hook_is_reported_and_the_clone_goes_on_and_hooks_dir(
    host: Host,
    tmp_path: Path,
) -> None:
    hooks = "/etc/snowflock/hooks.d/clone-post.d"
    image = overlay(host.image, tmp_path / "image", {
        f"{hooks}/20-fails": (FAILING_HOOK, 0o755),
        f"{hooks}/30-after": (LATER_HOOK, 0o755),
    })  # fmt: skip
    b64 = base64.b64encode(HOOKS.encode()).decode()
    host.vm_json("run", "--name", "hooked", "--image", str(image), "--wait-ready", "--append",
                 f'sf.run="echo {b64} | base64 -d > /g.sh && sh /g.sh; sleep 100000"')  # fmt: skip
    out = console(host, "hooked")
    print(out)  # shown when an assertion fails
    assert lines(out, "JOINED") == ["1 exited 0", "1 exited 0"]
    tickets = list(dict.fromkeys(x.split(" ", 1)[0] for x in lines(out, "R")))
    assert len(tickets) == 2, out[-3000:]
    first, moved = (lines(out, f"R {t}") for t in tickets)
    # The image's hooks: 20-fails failed, reported; sf-clone went on, 30-after ran.
    assert first[:3] == ["rc=0 id=1", "hooked-1", "after 1"], first
    assert "cat: can't open '/tmp/moved': No such file or directory" in first
    warning = f"sf-clone: WARNING: hook {hooks}/20-fails failed: "
    assert any(x.startswith(warning) and x.endswith("status 1: not today") for x in first)
    assert "sf-clone: INFO: 20-fails: not today" in first  # its output, logged
    # --hooks-dir: only its hooks ran (not 05-hostname, not 30-after).
    parent_name = line(out, "PARENT")
    assert moved[:2] == ["rc=0 id=1", parent_name], moved
    assert "cat: can't open '/tmp/after': No such file or directory" in moved
    assert f"1 {tickets[1]}" in moved and not any("WARNING" in x for x in moved)


# A named checkpoint, cloned twice later (1 clone, then 2) after the parent moved on;
# then two tickets whose clones all run at once; then the parent ticks until stopped.
KEEPER = """
echo before >/tmp/m
set -- $(sf-checkpoint); c=$1
if [ "$2" != 0 ]; then echo "$2 $(cat /tmp/m)" | sf-share put m; sf-exit 0; fi
echo after >/tmp/m
for n in 1 2; do
 t=$(sf-ticket $n); echo "FROM $t $(sf-clone --from "$c" "$t")"; sf-join "$t" >/dev/null
 for k in $(seq $n); do echo "CKPT $t $(sf-share get "$t" $k m)"; done
done
a=$(sf-ticket 2); b=$(sf-ticket 1)
for t in $a $b; do
 [ "$(sf-clone "$t")" = 0 ] || { echo up | sf-share put up; sleep 100000; }
done
until [ "$(sf-share ls "$a" | wc -l) $(sf-share ls "$b" | wc -l)" = "2 1" ]; do sleep 1; done
echo "LIVE $a $b"
i=0; while :; do i=$((i + 1)); echo "TICK $i"; sleep 1; done
"""


def ticks(text: str) -> list[int]:
    return [int(n) for n in lines(text, "TICK")]


def test_a_checkpoint_cloned_twice_then_the_parent_stopped_with_live_clones_and_logs_f(
    host: Host,
) -> None:
    boot(host, "keeper", KEEPER)
    out = console(host, "keeper", "LIVE")
    made = [x.split() for x in lines(out, "FROM")]
    assert [x[1] for x in made] == ["0", "0"], out[-3000:]
    (once, _), (twice, _) = made
    assert lines(out, "CKPT") == [f"{once} 1 before", f"{twice} 1 before", f"{twice} 2 before"]
    a, b = line(out, "LIVE").split()
    assert vm_names(host) == sorted(["keeper", f"{a}-1", f"{a}-2", f"{b}-1"])
    assert len(host.vm_json("checkpoints")) == 1
    follow_log = host.root / "follow.log"
    with follow_log.open("wb") as sink:
        follow = subprocess.Popen([*run.in_netns(host.netns), str(ROOT / "bin/sf-vm"), "logs",
                                   "-f", "keeper"], env=host.env, stdout=sink)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(ticks(follow_log.read_text())) < 2:  # what it printed, then new lines
            assert time.monotonic() < deadline and follow.poll() is None, follow_log.read_text()
            time.sleep(0.5)
        start = ticks(follow_log.read_text())[-1]
        while ticks(follow_log.read_text())[-1] < start + 3:
            assert time.monotonic() < deadline and follow.poll() is None, follow_log.read_text()
            time.sleep(0.5)
        host.tool("sf-vm", "stop", "keeper")
        assert follow.wait(timeout=60) == 0  # it ends with the VM
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    followed = follow_log.read_text()
    assert ticks(followed) == list(range(1, ticks(followed)[-1] + 1))  # nothing lost
    assert "snowflock-guest: ready" in followed  # from the start, as sf-vm logs
    assert vm_names(host) == []  # the clones of both tickets went with their parent
    assert host.vm_json("checkpoints") == [] and host.leftovers() == []


# Without a network card: the parent forks, each clone reports its interfaces.
NO_NETWORK = """
echo "NET $(ls /sys/class/net | tr '\\n' ' ')"
t=$(sf-ticket 2)
id=$(sf-clone "$t" 2>/tmp/e)
if [ "$id" = 0 ]; then
 sf-join "$t" | sed 's/^/JOINED /'
 for k in 1 2; do sf-share get "$t" $k r | sed "s/^/R $k /"; done
 echo SF-DONE
else
 { echo "$id $(ls /sys/class/net | tr '\\n' ' ')"; cat /tmp/e; } | sf-share put r
 sf-exit 0
fi
"""


def test_sfld_with_network_none_boots_and_forks_vms_without_a_card(
    guest_image: image.Result,
) -> None:
    with running_host(guest_image, "--network", "none") as host:
        info = boot(host, "bare", NO_NETWORK)
        argv = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
        assert not [a for a in argv if b"netdev" in a or b"virtio-net" in a], argv
        out = console(host, "bare")
        print(out)  # shown when an assertion fails
        assert line(out, "NET") == "lo"
        assert lines(out, "JOINED") == ["1 exited 0", "2 exited 0"]
        assert lines(out, "R 1") == ["1 lo"] and lines(out, "R 2") == ["2 lo"]  # no warning
        assert host.vm_json("network")["network"] == "none"

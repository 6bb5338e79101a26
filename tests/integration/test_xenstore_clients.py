"""sf-xenstored driven by clients nobody here wrote: pyxs and Debian's xenstore-utils."""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

import pytest
from pyxs import Client, PyXSError


def xs(sock: Path, *argv: str) -> str:
    env = {**os.environ, "XENSTORED_PATH": str(sock)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20, check=True)
    return out.stdout


def test_pyxs_basic_operations(xenstored: Path) -> None:
    with Client(unix_socket_path=str(xenstored)) as c:
        c.write(b"/vm/name", b"render-1")
        assert c.read(b"/vm/name") == b"render-1"
        c.mkdir(b"/vm/empty")
        assert sorted(c.list(b"/vm")) == [b"empty", b"name"]
        assert c.exists(b"/vm/empty")
        c.set_perms(b"/vm/name", [b"n0", b"r5"])
        assert c.get_perms(b"/vm/name") == [b"n0", b"r5"]
        c.delete(b"/vm")
        assert not c.exists(b"/vm")
        assert c.get_domain_path(3) == b"/local/domain/3"
        with pytest.raises(PyXSError):
            c.read(b"/no/such/key")


def test_pyxs_transactions_commit_and_conflict(xenstored: Path) -> None:
    with Client(unix_socket_path=str(xenstored)) as a, Client(unix_socket_path=str(xenstored)) as b:
        a.write(b"/count", b"1")
        a.transaction()
        a.write(b"/count", b"2")
        assert a.commit() is True
        assert b.read(b"/count") == b"2"
        a.transaction()
        a.read(b"/count")
        b.write(b"/count", b"3")
        a.write(b"/count", b"4")
        assert a.commit() is False  # pyxs's word for EAGAIN
        assert b.read(b"/count") == b"3"


def test_pyxs_watch_sees_initial_event_then_changes(xenstored: Path) -> None:
    with Client(unix_socket_path=str(xenstored)) as c, c.monitor() as m:
        m.watch(b"/jobs", b"tok")
        events = m.wait()
        assert next(events) == (b"/jobs", b"tok")
        with Client(unix_socket_path=str(xenstored)) as other:
            other.write(b"/jobs/1", b"queued")
        assert next(events) == (b"/jobs/1", b"tok")


def test_xenstore_utils_write_read_ls_rm(xenstored: Path) -> None:
    xs(xenstored, "xenstore-write", "/farm/frames", "240", "/farm/scene", "castle.pov")
    assert xs(xenstored, "xenstore-read", "/farm/frames") == "240\n"
    listing = xs(xenstored, "xenstore-ls", "/farm")
    assert 'frames = "240"' in listing
    assert 'scene = "castle.pov"' in listing
    xs(xenstored, "xenstore-rm", "/farm/scene")
    assert "scene" not in xs(xenstored, "xenstore-ls", "/farm")
    with pytest.raises(subprocess.CalledProcessError):
        xs(xenstored, "xenstore-read", "/farm/scene")


def test_xenstore_utils_chmod_shows_in_ls_p(xenstored: Path) -> None:
    xs(xenstored, "xenstore-write", "/perm/key", "v")
    xs(xenstored, "xenstore-chmod", "/perm/key", "n5", "r7")
    assert "(n5,r7)" in xs(xenstored, "xenstore-ls", "-p", "/perm")


def test_xenstore_watch_reports_changes(xenstored: Path) -> None:
    env = {**os.environ, "XENSTORED_PATH": str(xenstored)}
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/events"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert watcher.stdout is not None
    try:
        # Its initial event says the watch is placed (and counts as one of the two).
        readable, _, _ = select.select([watcher.stdout], [], [], 20)
        assert readable, "xenstore-watch reported no initial event"
        assert watcher.stdout.readline() == "/events\n"
        xs(xenstored, "xenstore-write", "/events/new", "1")
        out, _ = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
        watcher.wait()
    assert out.split() == ["/events/new"]
    assert watcher.returncode == 0

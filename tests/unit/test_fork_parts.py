"""The fork's pure parts (tickets, messages, share chunks) and the hooks contract."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from sflib.errors import NotFoundError, UsageError, WrongStateError
from sflib.fork.engine import ForkEngine
from sflib.fork.images import MemoryImage
from sflib.fork.lifecycle import TicketLife
from sflib.fork.tickets import Clone, CloneState, TicketBook, TicketState
from sflib.guest import freepages, layout
from sflib.guest.freepages import PAGE, ram_offset
from sflib.guest.hooks import HookFailed, hooks_in, run_hooks
from sflib.guest.share import CHUNK, chunks
from sflib.xenstore.server import XenStoreServer


def test_tickets_grant_at_most_the_free_slots() -> None:
    book = TicketBook(capacity=5)
    a = book.grant("web", 3)
    assert (a.requested, a.granted, a.state) == (3, 3, TicketState.GRANTED)
    b = book.grant("web", 4)
    assert b.granted == 2  # m <= n: only 2 slots left
    with pytest.raises(WrongStateError, match="no clone slots free"):
        book.grant("web", 1)
    book.end(a)
    assert book.grant("other", 9).granted == 3  # ended tickets free their slots
    for bad in (0, -1, 4097):
        with pytest.raises(UsageError):
            book.grant("web", bad)


def test_tickets_are_their_owners_and_used_once() -> None:
    book = TicketBook(capacity=4)
    t = book.grant("web", 1)
    with pytest.raises(NotFoundError):
        book.get(t.id, "intruder")  # another VM's ticket is unknown to it
    with pytest.raises(NotFoundError):
        book.get("t9-000000", "web")
    assert book.usable(t.id, "web") is t
    t.state = TicketState.ACTIVE
    with pytest.raises(WrongStateError, match="already used"):
        book.usable(t.id, "web")
    t.clones = {1: Clone(1, "x"), 2: Clone(2, "y", CloneState.EXITED, 0)}
    assert not t.finished
    t.clones[1].state = CloneState.CRASHED
    assert t.finished
    assert json.loads(json.dumps(t.to_json()))["clones"]["2"]["status"] == 0


def test_request_and_reply_messages() -> None:
    assert layout.parse_request_path("/local/domain/7/snowflock/requests/12-ab") == (7, "12-ab")
    assert layout.parse_request_path("/local/domain/7/snowflock/replies/12-ab") is None
    assert layout.parse_request_path("/local/domain/7/snowflock/requests/a/b") is None
    req = layout.decode_request(7, "r", layout.encode_request("ticket", {"n": 3}))
    assert (req.op, req.args) == ("ticket", {"n": 3})
    for bad in (b"nope", b'{"op": "format-disk"}', b'{"op": "clone", "args": 3}'):
        with pytest.raises(UsageError):
            layout.decode_request(7, "r", bad)
    assert layout.decode_reply(layout.encode_result({"id": 2})) == {"id": 2}
    with pytest.raises(WrongStateError, match="busy"):
        layout.decode_reply(layout.encode_error(WrongStateError("busy")))


def test_share_chunks_fit_xenstore_values() -> None:
    data = os.urandom(5000)
    parts = chunks(data)
    assert all(len(p) <= 2048 for p in parts)
    assert b"".join(base64.b64decode(p) for p in parts) == data
    assert len(parts) == -(-5000 // CHUNK)
    assert chunks(b"") == []  # only <key>/chunks, "0"


def hook(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_hooks_run_in_order_with_a_clean_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "clone-post.d"
    out = tmp_path / "out"
    hook(d, "20-second", f'echo "2 $SF_ID $HOME" >> {out}')
    hook(d, "10-first", f'echo "1 $SF_ID $SF_FAMILY $SF_HOOKS_PHASE $SF_EXTRA" >> {out}')
    hook(d, "30-broken", "exit 3")
    hook(d, "40-after", f"echo 4 >> {out}")
    hook(d, "skipped.bak", f"echo bak >> {out}")
    (d / "not-executable").write_text(f"#!/bin/sh\necho nx >> {out}\n")
    monkeypatch.setenv("SF_EXTRA", "kept")
    monkeypatch.setenv("HOME", "/secret")
    assert [p.name for p in hooks_in(d)] == ["10-first", "20-second", "30-broken", "40-after"]
    failed = run_hooks("clone", "post", {"id": 2, "family": "farm"}, str(tmp_path))
    assert failed == ["30-broken"]  # reported; the others still ran
    assert out.read_text().splitlines() == ["1 2 farm post kept", "2 2 ", "4"]


def test_a_failing_pre_hook_aborts(tmp_path: Path) -> None:
    hook(tmp_path / "clone-pre.d", "10-veto", "echo no >&2; exit 1")
    with pytest.raises(HookFailed, match="10-veto"):
        run_hooks("clone", "pre", {}, str(tmp_path))
    assert run_hooks("clone", "post", {}, str(tmp_path)) == []  # no such folder: nothing


async def test_a_second_fork_of_the_same_vm_is_refused(tmp_path: Path) -> None:
    table = SimpleNamespace(
        bus=XenStoreServer(), on_end=[], on_ready=[], network=None, settings={"host_name": "h1"}
    )
    engine = ForkEngine(table, 4, tmp_path)  # type: ignore[arg-type]
    vm = SimpleNamespace(machine=SimpleNamespace(spec=SimpleNamespace(name="web")))
    async with engine.calls._forking(vm):  # type: ignore[arg-type]
        with pytest.raises(WrongStateError, match="already in flight"):
            async with engine.calls._forking(vm):  # type: ignore[arg-type]
                pass
    async with engine.calls._forking(vm):  # type: ignore[arg-type]  (free again)
        pass
    await table.bus.close()


def test_free_page_reports_survive_the_trip_and_land_in_the_ram_file() -> None:
    pfns = [5, 6, 7, 100, 3, 4, 9000]
    assert freepages.runs(pfns) == [(3, 5), (100, 1), (9000, 1)]
    chunks = freepages.encode(freepages.runs(pfns))
    assert all(len(c) <= 2048 for c in chunks)
    assert freepages.decode(chunks) == [(3, 5), (100, 1), (9000, 1)]
    in_file = freepages.file_runs(freepages.decode(chunks), 64 << 20)  # 16384 pages
    free_map = freepages.bitmap(in_file, 16384)
    assert len(free_map) == 2048
    assert freepages.set_runs(free_map) == [(3, 5), (100, 1), (9000, 1)]


def test_free_frames_map_to_file_pages_across_the_hole_below_4g() -> None:
    big = 4 << 30  # 2 GiB below 4 GiB, 2 GiB from 4 GiB up
    below = 0x80000000 // PAGE
    above = (1 << 32) // PAGE
    frames = [(below - 2, 4), (above - 1, 3), (above + big // PAGE, 5)]
    # The run into the PCI hole is cut; the one across 4 GiB starts at the file's
    # 2 GiB; the one past the RAM is dropped.
    assert freepages.file_runs(frames, big) == [(below - 2, 2), (below, 2)]
    for pfn in (below - 1, above, above + 1):
        offset = ram_offset(pfn, big)
        assert offset is not None
        runs = freepages.file_runs([(pfn, 1)], big)
        assert runs == [(offset // PAGE, 1)]


def test_free_map_bits_for_runs_of_any_alignment() -> None:
    runs = [(0, 1), (3, 17), (40, 8), (63, 1)]
    free_map = freepages.bitmap(runs, 64)
    marked = {i for i in range(64) if free_map[i // 8] >> (i % 8) & 1}
    assert marked == {0, *range(3, 20), *range(40, 48), 63}
    assert freepages.bitmap([(60, 10)], 64)[-1] == 0xF0  # clipped to the file


def test_a_big_report_is_chunked_and_garbage_is_refused() -> None:
    pfns = random.Random(1).sample(range(1 << 18), 60000)
    chunks = freepages.encode(freepages.runs(pfns))
    assert len(chunks) > 1 and all(len(c) <= 2048 for c in chunks)
    assert sum(n for _, n in freepages.decode(chunks)) == 60000
    for bad in ([b"not base64!"], [b"aGVsbG8="], []):
        with pytest.raises(ValueError):
            freepages.decode(bad)


def test_q35_puts_ram_above_4g_past_2_75_gib() -> None:
    assert ram_offset(10, 1 << 30) == 10 * PAGE
    assert ram_offset((1 << 30) // PAGE, 1 << 30) is None  # past the RAM
    big = 4 << 30
    assert ram_offset((0x80000000 // PAGE) - 1, big) == 0x80000000 - PAGE
    assert ram_offset(0x80000000 // PAGE, big) is None  # the PCI hole
    assert ram_offset((1 << 32) // PAGE, big) == 0x80000000


def test_marking_free_pages_punches_them_out_of_the_image(tmp_path: Path) -> None:
    image = MemoryImage(tmp_path / "k1.mem")
    image.path.write_bytes(b"\1" * (16 * freepages.PAGE))
    runs = [(2, 3), (10, 1)]
    free_map = freepages.bitmap(runs, 16)
    image.mark_free(free_map)
    assert image.punch_runs(runs) == 4
    data = image.path.read_bytes()
    pages = [data[i * freepages.PAGE : (i + 1) * freepages.PAGE] for i in range(16)]
    assert [i for i, p in enumerate(pages) if p == bytes(freepages.PAGE)] == [2, 3, 4, 10]
    assert image.free_map.read_bytes() == free_map
    image.use("x")
    image.release("x")
    assert not image.path.exists() and not image.free_map.exists()


async def test_a_kill_while_clones_start_waits_for_them_and_kills_them() -> None:
    """sf-kill right after sf-clone (libsnowflock returns that fast): the clones still
    starting are killed once they run, here and on other hosts, not missed."""
    book = TicketBook(capacity=4)
    ticket = book.grant("web", 2)
    stopped: list[object] = []

    class Stopper:
        async def stop(self, *what: object) -> None:
            stopped.append(what)

    life = TicketLife(book, Stopper(), Stopper(), None)  # type: ignore[arg-type]
    life.granted(ticket)
    may_start = asyncio.Event()

    async def spawn() -> None:
        with life.spawning(ticket):
            await may_start.wait()  # the clones' QEMUs are starting
            ticket.clones = {1: Clone(1, "t-1"), 2: Clone(2, "t-2", host="h2")}

    spawning = asyncio.create_task(spawn())
    await asyncio.sleep(0)
    kill = asyncio.create_task(life.kill_running(ticket))
    await asyncio.sleep(0.05)
    assert not kill.done()  # it waits for the clones
    may_start.set()
    killed = await kill
    await spawning
    assert [c.id for c in killed] == [1, 2]
    assert all(c.state == CloneState.KILLED for c in ticket.clones.values())
    assert ("t-1",) in stopped and len(stopped) == 2  # here, and the other host's
    assert await asyncio.wait_for(life.kill_running(ticket), 1) == []  # nothing in flight

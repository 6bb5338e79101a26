"""sfld's pure parts: settings precedence, the control codec, VM naming and sizing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sflib.errors import NotFoundError, UsageError, WrongStateError
from sflib.paths import Paths
from sflib.settings import SFLD_SETTINGS, resolve, to_toml
from sflib.sfld.control import decode_reply, decode_request, encode_error, encode_result
from sflib.sfld.vms import check_name, minimum_memory_mib, next_domid


def test_settings_precedence(tmp_path: Path) -> None:
    conf = tmp_path / "sfld.toml"
    conf.write_text("[sfld]\nmemory = 300\nvcpus = 2\naccel = 'kvm'\n")
    values = resolve(SFLD_SETTINGS, Paths(tmp_path), conf, {"accel": "tcg"},
                     {"SF_VCPUS": "3", "SF_ACCEL": "auto"})  # fmt: skip
    assert values["memory"] == 300  # file over default
    assert values["vcpus"] == 3  # environment over file
    assert values["accel"] == "tcg"  # command line over environment
    assert values["state_dir"] == tmp_path / "var/lib/snowflock"


def test_default_config_file_may_be_missing_an_explicit_one_not(tmp_path: Path) -> None:
    assert resolve(SFLD_SETTINGS, Paths(tmp_path), None, {}, {})["memory"] == 256
    with pytest.raises(UsageError, match="does not exist"):
        resolve(SFLD_SETTINGS, Paths(tmp_path), tmp_path / "nope.toml", {}, {})


@pytest.mark.parametrize(
    ("text", "message"),
    [("[sfld]\nmemroy = 1\n", "unknown setting"), ("[other]\n", "unknown setting"),
     ("[sfld]\nmemory = -5\n", "positive"), ("[sfld]\naccel = 'x'\n", "one of"),
     ("[sfld\n", "sfld.toml")],
)  # fmt: skip
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "sfld.toml"
    conf.write_text(text)
    with pytest.raises(UsageError, match=message):
        resolve(SFLD_SETTINGS, Paths(tmp_path), conf, {}, {})


def test_printed_config_reads_back_the_same(tmp_path: Path) -> None:
    values = resolve(SFLD_SETTINGS, Paths(tmp_path), None, {"memory": 512}, {})
    conf = tmp_path / "again.toml"
    conf.write_text(to_toml(SFLD_SETTINGS, values))
    assert resolve(SFLD_SETTINGS, Paths(tmp_path), conf, {}, {}) == values


def test_control_codec_round_trip_and_errors() -> None:
    assert decode_request(b'{"op": "vm.stop", "args": {"name": "a"}}\n') == (
        "vm.stop",
        {"name": "a"},
    )
    for bad in (b"nonsense", b'{"args": {}}', b'{"op": "x", "args": []}', b"\xff"):
        with pytest.raises(UsageError):
            decode_request(bad)
    assert decode_reply(encode_result([1, 2])) == [1, 2]
    with pytest.raises(NotFoundError, match="no VM named a") as e:
        decode_reply(encode_error(NotFoundError("no VM named a", hint="see sf-vm ls")))
    assert e.value.hint == "see sf-vm ls"
    assert json.loads(encode_error(WrongStateError("busy")))["error"]["type"] == "WrongStateError"


def test_domain_ids_and_names() -> None:
    assert next_domid(set()) == 1
    assert next_domid({1, 2, 4}) == 3
    with pytest.raises(WrongStateError):
        next_domid(set(range(1, 0x7FF0)))
    assert check_name("render-1") == "render-1"
    for bad in ("", "Web", "a b", "-x", "x" * 33, "../etc"):
        with pytest.raises(UsageError):
            check_name(bad)


def test_minimum_memory_covers_the_unpacked_image(tmp_path: Path) -> None:
    (tmp_path / "initrd.img").write_bytes(b"\0" * (20 << 20))
    (tmp_path / "manifest.json").write_text(json.dumps({"rootfs_size": 66 << 20}))
    assert minimum_memory_mib(tmp_path) == 66 + 40 + 128
    (tmp_path / "manifest.json").unlink()
    assert minimum_memory_mib(tmp_path) == 40 + 128

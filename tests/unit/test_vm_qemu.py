"""QEMU's command line (pure functions) and the accelerator choice."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sflib.errors import WrongStateError
from sflib.vm import accel
from sflib.vm.accel import Accel, choose
from sflib.vm.qemu import VMFiles, VMSpec, kernel_cmdline, qemu_argv, show


def spec(**kw: object) -> VMSpec:
    base = dict(name="web", domid=3, memory_mib=256, vcpus=2, accel=Accel.TCG,
                kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"))  # fmt: skip
    return VMSpec(**{**base, **kw})  # type: ignore[arg-type]


FILES = VMFiles(Path("/shm/web.mem"), Path("/run/web.qmp"), Path("/run/web.xenbus"),
                Path("/var/web/console.log"))  # fmt: skip


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_ram_is_a_shared_file_backend() -> None:
    argv = qemu_argv("qemu", spec(), FILES)
    assert "memory-backend-file,id=ram,size=256M,mem-path=/shm/web.mem,share=on" in opt(
        argv, "-object"
    )
    [machine] = opt(argv, "-machine")
    assert machine.split(",")[:2] == ["q35", "memory-backend=ram"]
    assert opt(argv, "-smp") == ["2"]


def test_a_clone_maps_memory_privately_and_waits_for_its_state() -> None:
    argv = qemu_argv("qemu", spec(share_memory=False, incoming="defer"), FILES)
    assert any("share=off" in o for o in opt(argv, "-object"))
    assert opt(argv, "-incoming") == ["defer"]


def test_qemu_is_the_client_of_both_sockets() -> None:
    chardevs = opt(qemu_argv("qemu", spec(), FILES), "-chardev")
    assert "socket,id=qmp,path=/run/web.qmp,reconnect=1" in chardevs
    assert "socket,id=xenbus,path=/run/web.xenbus,reconnect=1" in chardevs
    assert not any("server=on" in c for c in chardevs)


def test_xenstore_port_name_and_kernel_line() -> None:
    argv = qemu_argv("qemu", spec(append='sf.run="x y"'), FILES)
    assert "virtserialport,bus=vser.0,chardev=xenbus,name=org.snowflock.xenbus" in opt(
        argv, "-device"
    )
    assert kernel_cmdline(spec()) == "console=ttyS0 panic=-1 init_on_free=1"  # free pages are zero
    assert opt(argv, "-append") == ['console=ttyS0 panic=-1 init_on_free=1 sf.run="x y"']
    assert show(["a", "b c"]) == "a 'b c'"


def test_accel_and_cpu_follow_the_choice() -> None:
    kvm = qemu_argv("qemu", spec(accel=Accel.KVM), FILES)
    assert opt(kvm, "-accel") == ["kvm"] and opt(kvm, "-cpu") == ["host"]
    tcg = qemu_argv("qemu", spec(), FILES)
    assert opt(tcg, "-accel") == ["tcg"] and opt(tcg, "-cpu") == ["max,-erms"]  # no ERMS


def fake_qemu(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bios = tmp_path / "probe.bin"
    bios.write_bytes(b"\0" * 65536)
    monkeypatch.setattr(accel.os, "access", lambda p, m: True)  # as if /dev/kvm were usable
    # Generous: a fake QEMU that answers must never time out on a loaded machine.
    monkeypatch.setattr(accel, "PROBE_TIMEOUT", 60.0)
    return bios


def test_kvm_is_chosen_only_when_the_probe_reaches_long_mode(tmp_path: Path, probe: Path) -> None:
    works = fake_qemu(tmp_path, "exit 85")
    assert choose(Accel.AUTO, works, probe).accel == Accel.KVM
    fails = fake_qemu(tmp_path, "echo 'Could not access KVM kernel module' >&2; exit 1")
    chosen = choose(Accel.AUTO, fails, probe)
    assert chosen.accel == Accel.TCG and "Could not access KVM" in chosen.reason


def test_a_hanging_probe_means_tcg(tmp_path: Path, probe: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # Short is safe here: a probe that never ends exceeds any timeout.
    monkeypatch.setattr(accel, "PROBE_TIMEOUT", 0.5)
    chosen = choose(Accel.AUTO, fake_qemu(tmp_path, "exec sleep 30"), probe)
    assert chosen.accel == Accel.TCG and "long mode within 0.5 s" in chosen.reason


def test_kvm_demanded_but_broken_is_an_error(tmp_path: Path, probe: Path) -> None:
    with pytest.raises(WrongStateError, match="KVM requested but unusable"):
        choose(Accel.KVM, fake_qemu(tmp_path, "exit 1"), probe)
    assert choose(Accel.TCG, "/nonexistent", probe).accel == Accel.TCG

"""The image with a JVM (sf-image build --jvm): its own output folder, and an inputs
digest that sees the jar, the JDK and jlink's options (the runtime itself is made in
tests/integration/test_java_api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sflib.errors import NotFoundError
from sflib.image import build as image
from sflib.image import jvm
from sflib.image.packages import Package

PKGS = [Package("busybox-static", "1:1.35", "amd64")]


def opts(tmp_path: Path, with_jvm: bool = False) -> image.Options:
    hooks = tmp_path / "hooks.d"
    hooks.mkdir(exist_ok=True)
    return image.Options(out=tmp_path / "out", cache=tmp_path / "cache", hooks=hooks,
                         compression="zstd", jvm=with_jvm)  # fmt: skip


@pytest.fixture
def fake_jdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A JDK whose release file and a jar the digest reads, both under tmp_path."""
    jdk = tmp_path / "jdk"
    (jdk / "bin").mkdir(parents=True)
    (jdk / "release").write_text('JAVA_VERSION="17.0.15"\n')
    jar = tmp_path / "snowflock.jar"
    jar.write_bytes(b"PK one")
    monkeypatch.setattr(jvm, "find_jlink", lambda: jdk / "bin/jlink")
    monkeypatch.setattr(image, "JAVA_JAR", jar)
    return jdk, jar


def test_an_image_with_a_jvm_has_its_own_folder() -> None:
    assert image.default_out(with_jvm=True).name == "image-jvm"
    assert image.default_out().name == "image"


def test_digest_sees_the_jvm_the_jar_and_the_jdk(
    tmp_path: Path, fake_jdk: tuple[Path, Path]
) -> None:
    jdk, jar = fake_jdk
    plain = image.input_digest(opts(tmp_path), PKGS, [])
    with_jvm = image.input_digest(opts(tmp_path, with_jvm=True), PKGS, [])
    assert with_jvm != plain
    assert image.input_digest(opts(tmp_path, with_jvm=True), PKGS, []) == with_jvm
    jar.write_bytes(b"PK two")
    assert image.input_digest(opts(tmp_path, with_jvm=True), PKGS, []) != with_jvm
    assert image.input_digest(opts(tmp_path), PKGS, []) == plain  # the default image: as before
    changed = image.input_digest(opts(tmp_path, with_jvm=True), PKGS, [])
    (jdk / "release").write_text('JAVA_VERSION="17.0.16"\n')
    assert image.input_digest(opts(tmp_path, with_jvm=True), PKGS, []) != changed


def test_no_jdk_is_said_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not a JDK's jlink") as e:
        jvm.jdk_release(tmp_path / "bin/jlink")
    assert "openjdk-17-jdk-headless" in str(e.value)


def test_no_jar_is_said_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not built") as e:
        jvm.add_jvm(tmp_path / "root", tmp_path / "bin/jlink", tmp_path / "none.jar")
    assert "make java" in str(e.value)

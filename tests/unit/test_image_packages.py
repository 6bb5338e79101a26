"""apt output parsing, package file names, the skip list and requirement names."""

from __future__ import annotations

import pytest

from sflib.errors import UsageError
from sflib.image import packages, pydists
from sflib.image.packages import Package

DEPENDS = """\
povray
  Depends: libc6
  Depends: <libsdl-virtual>
libc6
  Depends: libgcc-s1
<libsdl-virtual>
libgcc-s1
  PreDepends: libc6
perl-base
perl-modules-5.36
"""

SHOW = """\
Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64
Description: Standalone rescue shell
 with tons of builtin utilities

Package: media-types
Version: 10.0.0
Architecture: all
"""


def test_depends_output_gives_real_packages_only() -> None:
    names = packages.parse_depends_output(DEPENDS)
    assert names == ["libc6", "libgcc-s1", "perl-base", "perl-modules-5.36", "povray"]


def test_skip_list_matches_patterns() -> None:
    assert packages.is_skipped("perl-modules-5.36")
    assert packages.is_skipped("dpkg")
    assert not packages.is_skipped("libc6")
    assert not packages.is_skipped("perlx")


def test_control_stanzas() -> None:
    stanzas = packages.parse_control(SHOW)
    assert [s["Package"] for s in stanzas] == ["busybox-static", "media-types"]
    assert stanzas[0]["Description"] == "Standalone rescue shell"


def test_deb_name_escapes_the_epoch() -> None:
    pkg = Package("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64")
    assert pkg.deb_name == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"


def test_resolve_keeps_an_explicitly_asked_skipped_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packages, "_apt_cache", lambda args: DEPENDS)
    assert "perl-base" not in packages.resolve(["povray"])
    assert "perl-base" in packages.resolve(["povray", "perl-base"])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("click>=8.2.1", ("click", False)),
        ("markdown-it-py (>=2.2.0)", ("markdown-it-py", False)),
        ('ipywidgets (>=7.5.1,<9) ; extra == "jupyter"', None),
        ('typing_extensions; python_version < "3.11"', ("typing_extensions", True)),
    ],
)
def test_requirement_names(line: str, expected: tuple[str, bool] | None) -> None:
    assert pydists.requirement_name(line) == expected


def test_bad_requirement() -> None:
    with pytest.raises(UsageError):
        pydists.requirement_name(">=1")


def test_closure_holds_what_the_guest_needs() -> None:
    names = {d.metadata["Name"].lower() for d in pydists.closure()}
    assert {"pyxs", "typer", "click", "rich", "pygments"} <= names

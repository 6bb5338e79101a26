"""Fixtures for integration tests that boot guests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sflib.image import build as image
from sflib.image.initramfs import default_compression


@pytest.fixture(scope="session")
def guest_image() -> image.Result:
    """The guest image, built once into build/image/ and reused while its inputs hold.

    The .deb cache (build/cache/debs/) is shared with sf-image, so it is fetched once.
    """
    opts = image.Options(
        out=image.default_out(),
        cache=image.default_cache(),
        hooks=image.default_hooks(),
        compression=default_compression(),
    )
    result = image.build(opts)
    for path in (result.kernel, result.initrd):
        assert Path(path).is_file(), f"{path} missing after the build"
    return result

"""mount.py: overlay mount options as data (absolute or short relative lowers, ro or rw,
userxattr). The mount call itself is tested through `ocilayers mount` in test_store.py."""

from __future__ import annotations

import pytest

from ocilayers.mount import MS_RDONLY, OverlayMount, mount_overlay


def test_read_only_options_absolute_and_relative() -> None:
    m = OverlayMount("/s/overlay2", ("l/AAA", "l/BBB"))
    assert m.options(relative=False) == "lowerdir=/s/overlay2/l/AAA:/s/overlay2/l/BBB"
    assert m.options(relative=True) == "lowerdir=l/AAA:l/BBB"
    assert m.flags == MS_RDONLY


def test_read_write_options_with_userxattr() -> None:
    m = OverlayMount("/s/overlay2", ("l/AAA",), upper="/s/u", work="/s/w", userxattr=True)
    assert m.options(relative=True) == "lowerdir=l/AAA,upperdir=/s/u,workdir=/s/w,userxattr"
    assert m.flags == 0


def test_one_lower_read_only_is_refused() -> None:
    with pytest.raises(ValueError, match="two lowers"):
        mount_overlay(OverlayMount("/s", ("l/A",)), "/nonexistent")

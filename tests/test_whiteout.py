"""whiteout.py: `.wh.` name classification and the overlay xattr escaping, table-driven."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ocilayers.errors import ImageError, UnsafeEntryError
from ocilayers.whiteout import (
    classify,
    escape_xattr,
    is_overlay_xattr,
    is_whiteout_stat,
    opaque_xattr,
    unescape_xattr,
)


@pytest.mark.parametrize(("base", "expected"), [
    pytest.param(b"foo", ("entry", b"foo"), id="plain"),
    pytest.param(b".foo", ("entry", b".foo"), id="dotfile"),
    pytest.param(b"wh.foo", ("entry", b"wh.foo"), id="no-leading-dot"),
    pytest.param(b".WH.foo", ("entry", b".WH.foo"), id="case-sensitive"),
    pytest.param(b"a.wh.foo", ("entry", b"a.wh.foo"), id="prefix-not-at-start"),
    pytest.param(b".wh.foo", ("whiteout", b"foo"), id="whiteout"),
    pytest.param(b".wh..foo", ("whiteout", b".foo"), id="whiteout-of-dotfile"),
    pytest.param(b".wh....", ("whiteout", b"..."), id="whiteout-of-three-dots"),
    pytest.param(b".wh.\xff\xfe", ("whiteout", b"\xff\xfe"), id="whiteout-non-utf8"),
    pytest.param(b".wh..wh..opq", ("opaque", b""), id="opaque"),
    pytest.param(b".wh..wh.plnk", ("meta", b""), id="aufs-plnk"),
    pytest.param(b".wh..wh.aufs", ("meta", b""), id="aufs-aufs"),
    pytest.param(b".wh..wh..opqx", ("meta", b""), id="opaque-lookalike-is-meta"),
])
def test_classify(base: bytes, expected: tuple[str, bytes]) -> None:
    assert classify(base, base.decode("utf-8", "backslashreplace")) == expected


@pytest.mark.parametrize("base", [
    pytest.param(b".wh.", id="bare"),
    pytest.param(b".wh..", id="dot"),
    pytest.param(b".wh...", id="dotdot"),
])
def test_classify_refuses_escaping_whiteouts(base: bytes) -> None:
    display = "some/dir/" + base.decode()
    with pytest.raises(UnsafeEntryError) as info:
        classify(base, display)
    assert f"'{display}'" in str(info.value)
    assert isinstance(info.value, ImageError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("name", "escaped"), [
    pytest.param("trusted.overlay.opaque", "trusted.overlay.overlay.opaque", id="trusted-opaque"),
    pytest.param("trusted.overlay.redirect", "trusted.overlay.overlay.redirect",
                 id="trusted-redirect"),
    pytest.param("trusted.overlay.metacopy", "trusted.overlay.overlay.metacopy",
                 id="trusted-metacopy"),
    pytest.param("trusted.overlay.whiteout", "trusted.overlay.overlay.whiteout",
                 id="trusted-xattr-whiteout"),
    pytest.param("user.overlay.opaque", "user.overlay.overlay.opaque", id="user-opaque"),
    pytest.param("trusted.overlay.overlay.opaque", "trusted.overlay.overlay.overlay.opaque",
                 id="already-escaped-is-escaped-again"),
    pytest.param("security.capability", "security.capability", id="capability"),
    pytest.param("user.mime_type", "user.mime_type", id="user"),
    pytest.param("trusted.foo", "trusted.foo", id="trusted-other"),
    pytest.param("trusted.overlayfoo", "trusted.overlayfoo", id="no-dot-after-overlay"),
    pytest.param("trusted.overlay", "trusted.overlay", id="bare-overlay"),
    pytest.param("security.overlay.opaque", "security.overlay.opaque", id="other-namespace"),
])
def test_escape_xattr(name: str, escaped: str) -> None:
    assert escape_xattr(name) == escaped
    assert unescape_xattr(escaped) == name


@pytest.mark.parametrize(("on_disk", "image"), [
    pytest.param("trusted.overlay.overlay.opaque", "trusted.overlay.opaque", id="escaped-trusted"),
    pytest.param("user.overlay.overlay.origin", "user.overlay.origin", id="escaped-user"),
    pytest.param("trusted.overlay.opaque", None, id="bookkeeping-opaque"),
    pytest.param("trusted.overlay.origin", None, id="bookkeeping-origin"),
    pytest.param("trusted.overlay.impure", None, id="bookkeeping-impure"),
    pytest.param("user.overlay.redirect", None, id="bookkeeping-user-redirect"),
    pytest.param("security.capability", "security.capability", id="capability"),
    pytest.param("user.x", "user.x", id="user"),
])
def test_unescape_xattr(on_disk: str, image: str | None) -> None:
    assert unescape_xattr(on_disk) == image


@pytest.mark.parametrize(("name", "expected"), [
    pytest.param("trusted.overlay.opaque", True, id="trusted"),
    pytest.param("user.overlay.opaque", True, id="user"),
    pytest.param("trusted.overlayx", False, id="lookalike"),
    pytest.param("security.capability", False, id="capability"),
])
def test_is_overlay_xattr(name: str, expected: bool) -> None:
    assert is_overlay_xattr(name) is expected


@pytest.mark.parametrize(("namespace", "name"), [
    pytest.param("trusted", "trusted.overlay.opaque", id="trusted"),
    pytest.param("user", "user.overlay.opaque", id="user"),
])
def test_opaque_xattr(namespace: str, name: str) -> None:
    assert opaque_xattr(namespace) == name


def _mknod_or_skip(path: Path, mode: int, dev: int) -> None:
    try:
        os.mknod(path, mode, dev)
    except PermissionError as exc:
        pytest.skip(f"cannot mknod here: {exc}")


@pytest.mark.parametrize(("kind", "expected"), [
    pytest.param("whiteout", True, id="char-0-0"),
    pytest.param("char", False, id="char-1-3"),
    pytest.param("fifo", False, id="fifo"),
    pytest.param("file", False, id="file"),
])
def test_is_whiteout_stat(tmp_path: Path, kind: str, expected: bool) -> None:
    p = tmp_path / "node"
    if kind == "whiteout":
        _mknod_or_skip(p, stat.S_IFCHR, os.makedev(0, 0))
    elif kind == "char":
        _mknod_or_skip(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        p.write_bytes(b"")
    assert is_whiteout_stat(os.lstat(p)) is expected

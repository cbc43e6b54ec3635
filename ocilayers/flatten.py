"""The flatten workflow: every layer of an image applied in delete mode into a plain rootfs.

DEST must be missing or an empty dir, and a failure leaves it as it was found: the rootfs is
built in a temp dir beside DEST and renamed into place at the end (into a DEST that is a
mount point, where no rename can go, it is built in place and emptied again on failure)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator

from ocilayers.errors import OCILayersError
from ocilayers.fsutil import remove_at, rmtree
from ocilayers.lookup import source_or_image
from ocilayers.spec import Platform
from ocilayers.store import Store
from ocilayers.transports import open_source


def flatten(arg: str, dest: str, *, root: str | None = None, ref: str | None = None,
            platform: Platform | str | None = None) -> int:
    """Apply every layer in delete mode into the plain dir `dest` (missing or empty);
    returns the layer count."""
    from ocilayers.extract import apply_layer

    store = Store(root)
    kind = source_or_image(store, arg)  # (a bad name fails before DEST is touched)
    with _building(dest) as work:
        if kind == "source":
            with open_source(arg) as src:
                image = src.resolve(ref, platform)
                for layer in image.layers:
                    with src.open_layer(layer, readahead=True) as reader:
                        apply_layer(reader, work, mode="delete")
                        reader.finish()
                return len(image.layers)
        img = store.find_image(arg)
        for rec in img.layers:
            apply_layer(store.layers.open_tar(rec), work, mode="delete")
        return len(img.layers)


@contextlib.contextmanager
def _building(dest: str) -> Iterator[str]:
    """A dir to build DEST's content in; DEST holds it when the block succeeds, and is as it
    was found when it fails."""
    try:
        st: os.stat_result | None = os.stat(dest)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise OCILayersError(f"{dest}: exists and is not a directory")
        if os.listdir(dest):
            raise OCILayersError(f"{dest}: not empty (flatten writes into a missing or empty "
                                 "directory)")
        if os.path.ismount(dest):
            with _in_place(dest):
                yield dest
            return
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise OCILayersError(f"{dest}: the directory {parent} does not exist")
    work = tempfile.mkdtemp(dir=parent, prefix=".ocilayers-flatten-")
    try:
        if st is not None:  # the user's dir: its mode and owner
            os.chmod(work, stat.S_IMODE(st.st_mode))
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(work, st.st_uid, st.st_gid)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(work, 0o777 & ~umask)
        yield work
        os.rename(work, dest)  # onto an empty dir, or a missing name
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            rmtree(work)
        raise


@contextlib.contextmanager
def _in_place(dest: str) -> Iterator[None]:
    st = os.stat(dest)
    try:
        yield
    except BaseException:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in os.listdir(fd):
                remove_at(fd, name)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)
        raise

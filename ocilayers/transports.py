"""Every image source by its transport: `docker://` (a registry) or a file source (OCI
layout, oci-archive, docker-save tarball, `oci:`/`oci-archive:`/`docker-archive:`, `-`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ocilayers.remote import is_remote, open_registry
from ocilayers.sources import ImageSource
from ocilayers.sources import open_source as open_file_source


@contextlib.contextmanager
def open_source(spec: str) -> Iterator[ImageSource]:
    """Open an image source: a registry for `docker://`, else a file source."""
    if is_remote(spec):
        with open_registry(spec) as src:
            yield src
        return
    with open_file_source(spec) as fsrc:
        yield fsrc

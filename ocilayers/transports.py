"""Every image source by its transport: `docker://` (a registry) or a file source (OCI
layout, oci-archive, docker-save tarball, `oci:`/`oci-archive:`/`docker-archive:`, `-`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ocilayers.sources import ImageSource
from ocilayers.sources import open_source as open_file_source
from ocilayers.spec import DOCKER_TRANSPORT


@contextlib.contextmanager
def open_source(spec: str) -> Iterator[ImageSource]:
    """Open an image source: a registry for `docker://`, else a file source."""
    if spec.startswith(DOCKER_TRANSPORT):
        from ocilayers.remote import open_registry  # (urllib3 only when a registry is used)

        with open_registry(spec) as src:
            yield src
        return
    with open_file_source(spec) as fsrc:
        yield fsrc

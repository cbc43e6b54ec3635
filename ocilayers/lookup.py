"""What an argument names: a source (a transport prefix or an existing path) or an image in
the store (a tag, an image ID or a unique ID prefix)."""

from __future__ import annotations

import os

from ocilayers.errors import ImageNotFoundError, OCILayersError, StoreError
from ocilayers.sources import TRANSPORTS
from ocilayers.spec import DOCKER_TRANSPORT
from ocilayers.store import Store


def is_store_name(store: Store, name: str) -> bool:
    """Does `name` pick a store image? An ambiguous ID prefix raises (it is a store name)."""
    if not store.exists():
        return False
    try:
        store.images.find(name)
    except ImageNotFoundError:
        return False
    return True


def source_or_image(store: Store, arg: str) -> str:
    """'source' or 'image'. A name that is both is an error asking which one."""
    if arg == "-" or arg.startswith((*TRANSPORTS, DOCKER_TRANSPORT)):
        return "source"
    exists = os.path.exists(arg)
    in_store = is_store_name(store, arg)
    if exists and in_store:
        raise OCILayersError(f"{arg!r} is both a path and an image in the store; write "
                             f"./{arg} or oci:{arg} for the path, or use the image ID")
    if in_store:
        return "image"
    if exists or not store.exists():
        return "source"  # with no store, the open reports the missing path
    raise StoreError(f"{arg}: no such file, directory or image in the store")

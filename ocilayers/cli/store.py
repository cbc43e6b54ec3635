"""CLI commands over the store: images, tag, untag, rmi, prune, verify, mount, umount."""

from __future__ import annotations

import argparse
import os
import sys

from ocilayers import api
from ocilayers.cli.common import AddFn, PickFn, _existing_store, _print_json, _store
from ocilayers.errors import OCILayersError
from ocilayers.store import Store


def add_images(add: AddFn, pick: PickFn) -> None:
    p = add("images", "list the store's images")
    p.add_argument("--json", action="store_true",
                   help="exact values: sizes in bytes, times as the config has them")
    p.add_argument("--no-trunc", action="store_true", help="full image IDs")
    p.set_defaults(func=cmd_images)


def cmd_images(args: argparse.Namespace) -> int:
    from ocilayers import texts

    store = _existing_store(args)
    if args.json:
        _print_json(api.list_images(store))
    else:
        print(texts.images_table(list(store.iter_images()), args.no_trunc))
    return 0


def add_tag(add: AddFn, pick: PickFn) -> None:
    p = add("tag", "tag a store image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("ref", metavar="REPO:TAG")
    p.set_defaults(func=cmd_tag)


def cmd_tag(args: argparse.Namespace) -> int:
    api.tag(_existing_store(args), args.image, args.ref)
    return 0


def add_untag(add: AddFn, pick: PickFn) -> None:
    p = add("untag", "remove a tag (the image stays)")
    p.add_argument("ref", metavar="REPO:TAG")
    p.set_defaults(func=cmd_untag)


def cmd_untag(args: argparse.Namespace) -> int:
    api.untag(_existing_store(args), args.ref)
    return 0


def add_rmi(add: AddFn, pick: PickFn) -> None:
    p = add("rmi", "remove an image and the layers nothing else uses")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_rmi)


def cmd_rmi(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    for line in api.remove_image(store, args.image):
        print(line)
    return 0


def add_prune(add: AddFn, pick: PickFn) -> None:
    p = add("prune", "remove layers no image references")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    for line in api.prune(store):
        print(line)
    return 0


def add_verify(add: AddFn, pick: PickFn) -> None:
    p = add("verify", "check layers against their tar-split records and the store format")
    p.add_argument("image", metavar="IMAGE", nargs="?")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    problems = api.verify(store, args.image)
    if problems:
        for p in problems[1:]:
            print(p, file=sys.stderr)
        raise OCILayersError(f"verify: {len(problems)} problem(s); first: {problems[0]}")
    print("ok")
    return 0


def add_mount(add: AddFn, pick: PickFn) -> None:
    p = add("mount", "mount a read-only merged view of an image, or a container read-write")
    p.add_argument("name", metavar="IMAGE|CONTAINER")
    p.add_argument("target", metavar="TARGET", nargs="?",
                   help="where to mount (needed for an image without --run; default for a "
                        "container: overlay2/<mount-id>/merged)")
    p.add_argument("--fuse", action="store_true",
                   help="mount with fuse-overlayfs (rootless: shows the owners the store "
                        "recorded); default: the kernel's overlayfs")
    p.add_argument("--run", nargs=argparse.REMAINDER, metavar="CMD",
                   help="run CMD with the mount (its path in $OCILAYERS_MOUNT), then unmount "
                        "it; rootless, CMD runs in the user namespace that holds the mount")
    p.set_defaults(func=cmd_mount)


def cmd_mount(args: argparse.Namespace) -> int:
    from ocilayers import lifecycle
    from ocilayers.cli import unshare

    store = _existing_store(args)
    if args.run is not None:
        return _mount_run(args, store)
    if unshare.entered():
        raise OCILayersError(
            "rootless, a mount lives in the user namespace ocilayers made for this command and "
            "would be gone when it exits: use `mount ... --run CMD`, or mount inside "
            "`ocilayers unshare`")
    if lifecycle.resolve_name(store, args.name) == "container":
        c = lifecycle.find_container(store, args.name)
        print(lifecycle.mount_container(store, c, args.target, fuse=args.fuse))
        return 0
    if args.target is None:
        raise OCILayersError("mount IMAGE needs a TARGET dir (a container has a default)")
    api.mount(store, args.name, args.target, fuse=args.fuse)
    return 0


def _mount_run(args: argparse.Namespace, store: Store) -> int:
    """`mount ... --run CMD`: mount, run CMD with $OCILAYERS_MOUNT, unmount."""
    import subprocess
    import tempfile

    from ocilayers import lifecycle

    if not args.run:
        raise OCILayersError("--run needs a command")
    made = None
    container = lifecycle.resolve_name(store, args.name) == "container"
    if container:
        c = lifecycle.find_container(store, args.name)
        path = lifecycle.mount_container(store, c, args.target, fuse=args.fuse)
    else:
        target = args.target
        if target is None:
            made = target = tempfile.mkdtemp(prefix="ocilayers-mount-",
                                             dir=os.environ.get("XDG_RUNTIME_DIR") or None)
        try:
            path = api.mount(store, args.name, target, fuse=args.fuse)
        except BaseException:
            if made:
                os.rmdir(made)
            raise
    try:
        env = {**os.environ, "OCILAYERS_MOUNT": path}
        try:
            return subprocess.run(args.run, env=env).returncode
        except FileNotFoundError:
            raise OCILayersError(f"{args.run[0]}: command not found") from None
    finally:
        if container:
            lifecycle.umount_container(store, c, held_by_us=True)
        else:
            api.umount(store, path)
            if made:
                os.rmdir(made)


def add_umount(add: AddFn, pick: PickFn) -> None:
    p = add("umount", "unmount a container, or a view made by `mount`")
    p.add_argument("target", metavar="CONTAINER|TARGET")
    p.set_defaults(func=cmd_umount)


def cmd_umount(args: argparse.Namespace) -> int:
    from ocilayers import lifecycle

    store = _store(args)
    if not os.path.isabs(args.target) and lifecycle.resolve_name(store, args.target) == \
            "container" and not os.path.exists(args.target):
        lifecycle.umount_container(store, lifecycle.find_container(store, args.target))
        return 0
    api.umount(store, args.target)
    return 0

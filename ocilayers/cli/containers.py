"""CLI commands for containers: create, ps, rm, commit (mount/umount are in `store`)."""

from __future__ import annotations

import argparse
import json
import sys

from ocilayers import shapes
from ocilayers.cli.common import PROG, AddFn, PickFn, _existing_store, _print_json, _store


def register(add: AddFn, pick: PickFn) -> None:
    p = add("create", "make a container on an image: its init layer and an empty rw layer")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--name", metavar="NAME", help="a name for it, unique in the store")
    p.add_argument("--json", action="store_true", help="print the container as JSON")
    p.add_argument("command_argv", metavar="CMD", nargs="*",
                   help="after --: its command (default: the image's Entrypoint + Cmd)")
    p.set_defaults(func=cmd_create)

    p = add("ps", "list the store's containers")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-trunc", action="store_true", help="full IDs")
    p.set_defaults(func=cmd_ps)

    p = add("rm", "remove a container: its rw and init layers and its records")
    p.add_argument("containers", metavar="CONTAINER", nargs="+")
    p.add_argument("-f", "--force", action="store_true", help="unmount it first")
    p.set_defaults(func=cmd_rm)

    def step_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--network", choices=("none", "host"), default="none",
                       help="none: a new network namespace with only lo; host: the host's "
                            "(default: none)")
        p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                       help="an environment variable, over the image's Env (repeatable)")
        p.add_argument("-w", "--workdir", metavar="DIR",
                       help="the working dir (default: the image's WorkingDir, else /)")
        p.add_argument("-u", "--user", metavar="USER[:GROUP]",
                       help="names resolved in the container's /etc/passwd and /etc/group "
                            "(default: the image's User, else root)")
        p.add_argument("--seccomp", metavar="FILE",
                       help="a seccomp profile in the runtime-spec's JSON form (default: none)")
        p.add_argument("--init", action="store_true",
                       help="run tini as PID 1 (it reaps zombies and ends on SIGTERM)")
        p.add_argument("command_argv", metavar="CMD", nargs="*",
                       help="after --: the command (default: the image's Entrypoint + Cmd)")

    p = add("run", "run a command in a container through an OCI runtime (runc, crun); "
                   "exits with its exit code")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("--runtime", metavar="NAME|PATH",
                   help="the OCI runtime (default: $OCILAYERS_RUNTIME, else runc or crun on "
                        "PATH)")
    step_options(p)
    p.set_defaults(func=cmd_run)

    p = add("bundle", "write an OCI runtime bundle for a container (runc run -b DIR ID)")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("dir", metavar="DIR")
    step_options(p)
    p.set_defaults(func=cmd_bundle)

    p = add("commit", "commit a container's rw layer (or an upper dir) as a new image")
    p.add_argument("container", metavar="CONTAINER", nargs="?")
    p.add_argument("tag", metavar="REPO:TAG", nargs="?")
    p.add_argument("--upper", metavar="DIR",
                   help="commit this upper dir (Docker's, podman's) instead of a container")
    p.add_argument("--from", dest="base", metavar="IMAGE",
                   help="with --upper: the store image the upper dir was made on")
    p.add_argument("-m", "--message", metavar="MESSAGE", help="the history entry's comment")
    p.add_argument("-a", "--author", metavar="AUTHOR")
    p.add_argument("-c", "--change", action="append", default=[], metavar="INSTRUCTION",
                   help="a Dockerfile instruction to apply to the config (repeatable): CMD, "
                        "ENTRYPOINT, ENV, EXPOSE, LABEL, USER, VOLUME, WORKDIR, STOPSIGNAL, "
                        "HEALTHCHECK, ONBUILD")
    p.add_argument("--created-by", metavar="TEXT",
                   help="the history entry's created_by (default: the container's run steps "
                        "joined with ' && ', else its command)")
    p.add_argument("--source-date-epoch", type=int, metavar="N",
                   help="the history's and config's created time, and a clamp for newer "
                        "mtimes (default: $SOURCE_DATE_EPOCH if set, else now)")
    p.add_argument("--xattrs", choices=("all", "docker"), default="all",
                   help="as pack (default: all)")
    p.add_argument("--opaque", choices=("docker", "lower"),
                   help="as pack (default: lower: only dirs a lower layer has)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_commit)


def cmd_create(args: argparse.Namespace) -> int:
    from ocilayers import lifecycle

    command = list(args.command_argv)
    c = lifecycle.create_container(_store(args), args.image, name=args.name,
                                   command=command or None)
    if args.json:
        _print_json(shapes.container(c, mounted=[]))
    else:
        print(c.id)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from ocilayers import lifecycle, texts

    store = _existing_store(args)
    rows = lifecycle.list_containers(store)
    if args.json:
        _print_json([shapes.container(c, mounted) for c, mounted in rows])
    else:
        print(texts.containers_table(store, rows, args.no_trunc))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ocilayers import lifecycle

    store = _existing_store(args)
    for name in args.containers:
        c = lifecycle.find_container(store, name)
        lifecycle.remove_container(store, c, force=args.force)
        print(name)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from ocilayers import lifecycle
    from ocilayers.commit import CommitOptions, commit_container, commit_dir
    from ocilayers.errors import OCILayersError
    from ocilayers.pack import source_date_epoch

    def warn(msg: str) -> None:
        print(f"{PROG}: warning: {msg}", file=sys.stderr)

    tag = args.tag
    if args.upper is not None:
        if args.base is None:
            raise OCILayersError("--upper needs --from IMAGE (the image it was made on)")
        if args.tag is not None:
            raise OCILayersError("with --upper, give at most one REPO:TAG")
        tag = args.container  # (`commit --upper DIR --from IMAGE REPO:TAG`)
    elif args.container is None:
        raise OCILayersError("commit needs a CONTAINER (or --upper DIR --from IMAGE)")
    elif args.base is not None:
        raise OCILayersError("--from goes with --upper")
    opts = CommitOptions(tags=[tag] if tag else [], message=args.message, author=args.author,
                         changes=args.change, created_by=args.created_by,
                         source_date_epoch=source_date_epoch(args.source_date_epoch),
                         xattrs=args.xattrs, opaque=args.opaque, warn=warn)
    store = _existing_store(args)
    if args.upper is not None:
        result = commit_dir(store, args.upper, str(args.base), opts)
    else:
        result = commit_container(store, lifecycle.find_container(store, args.container), opts)
    if args.json:
        sys.stdout.write(json.dumps(shapes.commit_result(result), indent=2) + "\n")
    else:
        print(result.image_id)
    return 0


def _run_options(args: argparse.Namespace) -> object:
    from ocilayers.bundle import RunOptions
    from ocilayers.run import parse_env

    seccomp = None
    if args.seccomp is not None:
        with open(args.seccomp, "rb") as f:
            seccomp = json.loads(f.read())
    return RunOptions(command=list(args.command_argv), env=parse_env(args.env),
                      workdir=args.workdir, user=args.user, network=args.network,
                      seccomp=seccomp)


def cmd_run(args: argparse.Namespace) -> int:

    from ocilayers import lifecycle
    from ocilayers.bundle import RunOptions
    from ocilayers.run import run_step

    store = _existing_store(args)
    c = lifecycle.find_container(store, args.container)
    opts = _run_options(args)
    assert isinstance(opts, RunOptions)
    return run_step(store, c, opts, runtime=args.runtime, init=args.init)


def cmd_bundle(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ocilayers import lifecycle
    from ocilayers.bundle import RunOptions
    from ocilayers.run import bundle_for, find_init

    store = _existing_store(args)
    c = lifecycle.find_container(store, args.container)
    opts = _run_options(args)
    assert isinstance(opts, RunOptions)
    if args.init:
        opts = replace(opts, init=find_init())
    print(bundle_for(store, c, args.dir, opts))
    return 0

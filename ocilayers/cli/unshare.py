"""Rootless mode on the command line: `--rootless`, entering the user namespace before a
command runs, and `ocilayers unshare [CMD]` (a shell or command inside it, as `buildah
unshare`)."""

from __future__ import annotations

import argparse
import os

from ocilayers import userns
from ocilayers.cli.common import AddFn, PickFn
from ocilayers.errors import RootlessError

# Commands that never touch the store or a mount: no namespace needed. (`inspect` may read
# a store image, whose owners only the namespace shows right.)
OUTSIDE = frozenset({"login", "logout"})
_entered: list[bool] = []


def entered() -> bool:
    """Did this process make its user namespace (so its mounts end with it)?"""
    return bool(_entered)


def enter(args: argparse.Namespace) -> None:
    """Set up rootless mode for this command: with --rootless, mark it; as a user other than
    root (and not yet in a namespace), enter a user + mount namespace mapped to the user's
    subordinate IDs, or to the user alone when it has none (userns.plan)."""
    if getattr(args, "rootless", False):
        os.environ["OCILAYERS_ROOTLESS"] = "1"
    if os.geteuid() == 0 or args.command in OUTSIDE:
        return  # root, or already root of a user namespace (a child of `unshare`)
    userns.enter(userns.plan())
    _entered.append(True)
    os.environ["OCILAYERS_ROOTLESS"] = "1"


def add_unshare(add: AddFn, pick: PickFn) -> None:
    p = add("unshare", "run a shell or command in the rootless user + mount namespace (as "
                       "`buildah unshare`): mounts made there stay until it exits")
    p.add_argument("command_argv", metavar="CMD", nargs=argparse.REMAINDER,
                   help="command and arguments (default: $SHELL, else /bin/sh)")
    p.set_defaults(func=cmd_unshare)


def cmd_unshare(args: argparse.Namespace) -> int:
    import subprocess

    argv = args.command_argv or [os.environ.get("SHELL") or "/bin/sh"]
    env = dict(os.environ)
    env["OCILAYERS_ROOTLESS"] = "1"
    if args.root:
        env["OCILAYERS_ROOT"] = os.path.abspath(args.root)
    try:
        return subprocess.run(argv, env=env).returncode
    except FileNotFoundError:
        raise RootlessError(f"{argv[0]}: command not found") from None

"""CLI commands for registries: push, login, logout; and the registry options every command
takes for a `docker://` source or output."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from ocilayers import api
from ocilayers.cli.common import PROG, AddFn, PickFn, Progress, _msg, _print_json
from ocilayers.errors import OCILayersError
from ocilayers.streams import COMPRESSIONS


def registry_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """`--tls-verify`, `--cert-dir`, `--insecure`, `--creds`: global options."""
    d = argparse.SUPPRESS if suppress else None
    g = parser.add_argument_group("registries (docker:// sources and outputs)")
    g.add_argument("--tls-verify", choices=("true", "false"), default=d,
                   help="check registries' TLS certificates (default true; loopback too)")
    g.add_argument("--cert-dir", metavar="DIR", default=d,
                   help="CA (*.crt) and client (*.cert/*.key) files instead of "
                        "/etc/docker/certs.d/HOST/")
    g.add_argument("--insecure", action="append", metavar="HOST", default=d,
                   help="allow plain HTTP to HOST[:PORT] (loopback always may)")
    g.add_argument("--creds", metavar="USER:PASS", default=d,
                   help="credentials for the registry (default: docker's config.json, "
                        "containers' auth.json)")


@contextlib.contextmanager
def registry_context(args: argparse.Namespace) -> Iterator[None]:
    """The registry options given, for every docker:// the command opens (none given: the
    defaults, and no registry module is imported by a command that uses none)."""
    if not any(getattr(args, k, None) for k in ("tls_verify", "cert_dir", "insecure",
                                               "creds")):
        yield
        return
    from ocilayers.httpclient import TLSOptions
    from ocilayers.registry import RegistryOptions
    from ocilayers.remote import use_options

    tls = TLSOptions(verify=getattr(args, "tls_verify", None) != "false",
                     cert_dir=getattr(args, "cert_dir", None),
                     insecure=tuple(getattr(args, "insecure", None) or ()))
    with use_options(RegistryOptions(tls=tls, creds=getattr(args, "creds", None))):
        yield


def add_push(add: AddFn, pick: PickFn) -> None:
    p = add("push", "push a store image or a source to a registry")
    p.add_argument("source", metavar="IMAGE|SOURCE")
    p.add_argument("dest", metavar="docker://HOST[:PORT]/REPO[:TAG]")
    pick(p)
    p.add_argument("--compression", choices=COMPRESSIONS,
                   help="recompress every layer (default: a source's blobs as they are; "
                        "gzip for a store image)")
    p.add_argument("--format", choices=("oci", "docker"),
                   help="manifest family (default: the source's; oci for a store image)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    progress = Progress(args)
    try:
        result = api.push(args.source, args.dest, root=args.root, ref=args.ref,
                          platform=args.platform, compression=args.compression,
                          family=args.format, progress=progress.layer_callback())
    finally:
        progress.close()
    s = result.stats
    if args.json:
        _print_json({"ref": result.ref, "manifest_digest": str(result.manifest_digest),
                     "image_id": str(result.image_id) if result.image_id else None,
                     "media_type": result.media_type, "uploaded": s.uploaded,
                     "uploaded_bytes": s.uploaded_bytes, "present": s.present,
                     "mounted": s.mounted})
    else:
        print(result.manifest_digest)
        _msg(args, f"{PROG}: pushed {result.ref}: {s.uploaded} blobs uploaded "
                   f"({s.uploaded_bytes} bytes), {s.present} already there, {s.mounted} "
                   "mounted")
    return 0


def add_login(add: AddFn, pick: PickFn) -> None:
    p = add("login", "store credentials for a registry (as docker login, in "
                     "$DOCKER_CONFIG/config.json)")
    p.add_argument("host", metavar="HOST[:PORT]")
    p.add_argument("-u", "--username", required=True)
    p.add_argument("--password-stdin", action="store_true", required=True,
                   help="read the password from stdin (the only way: never on the command "
                        "line)")
    p.add_argument("--no-check", action="store_true",
                   help="store without trying the credentials on the registry first")
    p.set_defaults(func=cmd_login)


def cmd_login(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise OCILayersError("no password on stdin")
    if not args.no_check:
        from ocilayers.registry import Registry, RegistryOptions
        from ocilayers.remote import current_options

        base = current_options()
        reg = Registry(args.host, RegistryOptions(tls=base.tls,
                                                  creds=f"{args.username}:{password}"))
        reg.check_login()
    where = api.login(args.host, args.username, password)
    _msg(args, f"{PROG}: login succeeded; credentials stored in {where}")
    return 0


def add_logout(add: AddFn, pick: PickFn) -> None:
    p = add("logout", "remove the stored credentials of a registry")
    p.add_argument("host", metavar="HOST[:PORT]")
    p.set_defaults(func=cmd_logout)


def cmd_logout(args: argparse.Namespace) -> int:
    if not api.logout(args.host):
        raise OCILayersError(f"not logged in to {args.host}")
    _msg(args, f"{PROG}: removed the credentials of {args.host}")
    return 0

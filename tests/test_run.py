"""`ocilayers run`: build steps through the real runc, as root.

The base image is made here, not taken from fixtures/: `fixtures/docker-save.tar` links only
six busybox applets (sh ls cat echo rm mkdir), and a step needs `sleep` and `id`. So one layer
holds Debian's busybox-static (`/bin/busybox`) with symlinks for the applets the steps use,
an `/etc/passwd` and `/etc/group` with names to resolve, and `/etc/obsolete.conf` for a step to
delete (written with tests/tarbuilder.py and write_oci, mtimes 1600000000).

What is checked, with real runc (and tini for --init):

- a three-step build: a step that writes and deletes files (and writes /etc/hosts, which is
  bind-mounted from outside the layers and so reaches neither the rw layer nor the commit), a
  step as `-u 65534 -w /work -e FOO=bar` (runc makes the missing /work), and `sh -c 'exit 3'`
  whose code is ocilayers' own; commit (created_by: the runs joined with ' && '), a container
  on the committed image runs and sees the files; export, then `docker load` and
  `docker run --network none` in a throwaway dockerd read it back (same image ID);
- SIGTERM to the ocilayers process: `sleep` as PID 1 ignores it, so it is killed after the
  grace period (137); with `--init` tini passes it on and the step ends at once (143); while
  the step runs, commit, rm, umount and a second run refuse, naming the run's pid;
- writing /proc/sys as root fails and leaves the host's value as it was;
- `--network none` shows only `lo`, `--network host` the host's interfaces;
- users: names from the container's /etc/passwd, supplementary groups from its /etc/group,
  `USER:GROUP`, numbers taken as they are, unknown names as one-line errors; a symlinked
  /etc/passwd (absolute) and /etc/group (`../` past the root) resolve inside the rootfs even
  when the same path on the host holds a different file (planted under tmp);
- without root, `run` fails with one line that says rootless.

Needs root, runc, overlay mounts and /bin/busybox (static); the docker test also needs
docker.io. Each test gets its own store under tmp; whatever a failing test leaves mounted is
unmounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import tarbuilder as tb
from conftest import assert_one_line_error, run_module
from test_store import write_oci
from throwaway_dockerd import Daemon, DaemonError, mounts_under, unavailable, unmount_all

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "rm", "mkdir", "ls", "sleep", "id", "pwd", "test", "touch",
           "hostname", "wc", "true")
PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
          b"alice:x:1000:1000::/home/alice:/bin/sh\n")
GROUP = (b"root:x:0:\n"
         b"nogroup:x:65534:\n"
         b"alice:x:1000:\n"
         b"staff:x:50:alice\n"
         b"audio:x:29:bob,alice\n")
GRACE = 10  # ocilayers.run.GRACE_SECONDS, docker stop's: written out, not imported
WAIT = GRACE + 30  # a bound for "it ended", never a timing claim


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "run needs root"
    if shutil.which("runc") is None:
        return "runc is not installed"
    if not BUSYBOX.is_file():
        return "/bin/busybox is absent (Debian's busybox-static)"
    with open(BUSYBOX, "rb") as f:
        head = f.read(4096)
    if b"/lib64/ld-linux" in head or b"/lib/ld-linux" in head:
        return "/bin/busybox is not static (want busybox-static)"
    return None


def busybox_members(*extra: tb.Member, passwd: bytes | None = PASSWD,
                    group: bytes | None = GROUP) -> list[tb.Member]:
    """The base layer: busybox-static and its applet links, /etc, /tmp, and `extra`."""
    out = [tb.dir("bin"), tb.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
           *(tb.symlink(f"bin/{a}", "busybox") for a in APPLETS),
           tb.dir("etc"), tb.file("etc/obsolete.conf", b"old\n"),
           tb.dir("tmp", mode=0o1777), tb.dir("root", mode=0o700)]
    if passwd is not None:
        out.append(tb.file("etc/passwd", passwd))
    if group is not None:
        out.append(tb.file("etc/group", group))
    return [*out, *extra]


def busybox_image(dest: Path, *extra: tb.Member, passwd: bytes | None = PASSWD,
                  group: bytes | None = GROUP) -> Path:
    write_oci(dest, [tb.build(busybox_members(*extra, passwd=passwd, group=group))])
    return dest


# --- running ocilayers ---


def oci(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m ocilayers --root ROOT ARGV` (a subprocess: a step's output goes to our fds,
    which capsys cannot see)."""
    proc = run_module(["--root", str(root), *argv])
    if check and proc.returncode != 0:
        raise AssertionError(f"ocilayers {' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def step(root: Path, container: str, *argv: str, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    """`ocilayers run CONTAINER ARGV` (options, then `--` and the command)."""
    return oci(root, "run", container, *argv, check=check)


def ps(root: Path, container: str) -> dict[str, Any]:
    for c in json.loads(oci(root, "ps", "--json").stdout):
        if c["id"] == container:
            return dict(c)
    raise AssertionError(f"no container {container}")


def diff_dir(root: Path, container: str) -> Path:
    """The container's rw layer (its upper dir), from the mount ID `ps` reports."""
    return root / "overlay2" / str(ps(root, container)["mount_id"]) / "diff"


def tree(path: Path) -> set[str]:
    """Every path below `path`, relative (dirs with a trailing /)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        for d in dirnames:
            out.add(os.path.normpath(os.path.join(rel, d)) + "/")
        for f in filenames:
            out.add(os.path.normpath(os.path.join(rel, f)))
    return out


def net_devices(text: str) -> set[str]:
    """Interface names in a /proc/net/dev text."""
    return {line.split(":", 1)[0].strip() for line in text.splitlines()[2:] if ":" in line}


def read_docker_archive(path: Path) -> tuple[bytes, list[bytes]]:
    """(config bytes, uncompressed layer tars) of the first image of a docker-archive."""
    import gzip

    with tarfile.open(path) as t:
        def member(name: str) -> bytes:
            f = t.extractfile(name)
            assert f is not None, name
            return f.read()
        (manifest,) = json.loads(member("manifest.json"))
        layers = [member(n) for n in manifest["Layers"]]
        return member(manifest["Config"]), [gzip.decompress(x) if x[:2] == b"\x1f\x8b" else x
                                            for x in layers]


def tar_names(layer: bytes) -> dict[str, tarfile.TarInfo]:
    import io

    with tarfile.open(fileobj=io.BytesIO(layer)) as t:
        return {m.name.rstrip("/").removeprefix("./"): m for m in t.getmembers()}


def runc_state(root: Path) -> Path:
    """Where `run` keeps runc's state (README: under <root>/ocilayers/run/)."""
    return root / "ocilayers" / "run" / "state"


def runc_list(root: Path) -> list[Any]:
    state = runc_state(root)
    if not state.exists():
        return []
    proc = subprocess.run(["runc", "--root", str(state), "list", "--format", "json"],
                          capture_output=True, text=True, check=True, timeout=30)
    return list(json.loads(proc.stdout or "null") or [])


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descendant_running(ancestor: int, argv: Sequence[str]) -> int | None:
    """The pid of a process running exactly `argv` below `ancestor`, or None."""
    want = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if f.read() != want:
                    continue
        except OSError:
            continue
        pid = int(name)
        seen = 0
        while pid > 1 and seen < 64:
            pid, seen = _ppid(pid), seen + 1
            if pid == ancestor:
                return int(name)
    return None


def start_step(root: Path, container: str, *argv: str) -> subprocess.Popen[str]:
    """`ocilayers run` in the background; returns once `argv` (after --) runs in it."""
    cmd = list(argv[argv.index("--") + 1:])
    proc = subprocess.Popen([sys.executable, "-m", "ocilayers", "--root", str(root), "run",
                             container, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30  # a bound on start-up, not a timing claim
    while descendant_running(proc.pid, cmd) is None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended ({proc.returncode}) before {cmd} ran:\n{out}{err}")
        if time.monotonic() > deadline:
            finish(proc)
            raise AssertionError(f"{cmd} did not start within 30 s")
        time.sleep(0.05)
    return proc


def finish(proc: subprocess.Popen[str]) -> str:
    """Kill it if it still runs, wait, close its pipes; returns its stderr."""
    if proc.poll() is None:
        proc.kill()
    _out, err = proc.communicate(timeout=WAIT)
    return err


# --- fixtures ---


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return busybox_image(tmp_path_factory.mktemp("image") / "base")


@pytest.fixture
def root(tmp_path: Path, base: Path) -> Iterator[Path]:
    """A store with the base image as `base:1`; anything left mounted is unmounted."""
    r = tmp_path / "root"
    try:
        proc = oci(r, "unpack", str(base), "--tag", "base:1", check=False)
        if proc.returncode != 0 and "mount" in proc.stderr:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, proc.stderr
        yield r
    finally:
        left = unmount_all(r)
        assert not left, left


def create(root: Path, image: str = "base:1") -> str:
    return oci(root, "create", image).stdout.strip()


# --- the build ---


def test_three_step_build_commit_and_run_the_result(root: Path, tmp_path: Path) -> None:
    c = create(root)
    steps = [
        ["sh", "-c", "mkdir -p /data && echo one >/data/one && echo two >/data/two && "
                     "rm /data/two /etc/obsolete.conf && echo 10.9.9.9 planted >>/etc/hosts"],
        ["sh", "-c", 'echo "$(id -u) $(pwd) $FOO"'],
        ["sh", "-c", "exit 3"],
    ]
    assert step(root, c, "--", *steps[0]).returncode == 0
    # /etc/hosts is bind-mounted from beside the container's records: the write went there
    # (each run writes it afresh, as dockerd at each start), not into the rw layer
    hosts = root / "ocilayers" / "containers" / c / "hosts"
    assert "planted" in hosts.read_text()
    assert not (diff_dir(root, c) / "etc" / "hosts").exists()
    second = step(root, c, "-u", "65534", "-w", "/work", "-e", "FOO=bar", "--", *steps[1])
    assert second.stdout == "65534 /work bar\n", second.stderr
    third = step(root, c, "--", *steps[2], check=False)
    assert third.returncode == 3, third.stderr
    assert third.stderr == ""  # the step's code is ours, with no error line of ours

    # the rw layer: the step's files, runc's /work, a whiteout; no /etc/hosts
    upper = diff_dir(root, c)
    assert tree(upper) == {"data/", "data/one", "etc/", "etc/obsolete.conf", "work/"}
    assert (upper / "etc" / "obsolete.conf").stat().st_rdev == 0  # the overlay whiteout
    assert not ps(root, c)["mounted"], "the step's mount outlived it"
    assert runc_list(root) == []

    out = json.loads(oci(root, "commit", c, "built:1", "--json").stdout)
    config = json.loads(oci(root, "inspect", "built:1", "--json").stdout)["config"]
    want = " && ".join(" ".join(s) for s in steps)
    assert config["history"][-1]["created_by"] == want
    assert config["rootfs"]["diff_ids"][-1] == out["diff_id"]

    # a container on the committed image sees the result
    c2 = create(root, "built:1")
    seen = step(root, c2, "--", "sh", "-c",
                "cat /data/one; test -e /data/two || echo no-two; "
                "test -e /etc/obsolete.conf || echo no-obsolete; test -d /work && echo work; "
                "cat /etc/hosts")
    lines = seen.stdout.splitlines()
    assert lines[:4] == ["one", "no-two", "no-obsolete", "work"], seen.stdout
    assert "planted" not in seen.stdout  # a fresh /etc/hosts: the first one never got in

    # the committed layer: what the steps made, nothing of /etc/hosts (export reads it back)
    archive = tmp_path / "built.tar"
    oci(root, "export", "built:1", "-o", str(archive), "--format", "docker-archive")
    config_raw, layers = read_docker_archive(archive)
    assert json.loads(config_raw)["history"][-1]["created_by"] == want
    names = tar_names(layers[-1])
    assert set(names) == {"data", "data/one", "etc", "etc/.wh.obsolete.conf", "work"}
    assert names["work"].isdir() and names["work"].uid == 0


@contextlib.contextmanager
def throwaway_daemon(prefix: str) -> Iterator[Daemon]:
    """A started throwaway dockerd (skips the test when there can be none), stopped by its
    pid and its scratch dir removed afterwards."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    d = Daemon(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))  # short: a socket path
    problems: list[str] = []
    try:
        try:
            d.start()
        except (DaemonError, OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"dockerd could not be started: {exc}")
        yield d
    finally:
        problems = d.stop()
        if not mounts_under(d.base):
            shutil.rmtree(d.base, ignore_errors=True)
    assert not problems, problems


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with throwaway_daemon("rn-") as d:
        yield d


def test_the_build_loads_and_runs_in_docker(root: Path, tmp_path: Path,
                                            daemon: Daemon) -> None:
    c = create(root)
    step(root, c, "--", "sh", "-c", "mkdir /data && echo one >/data/one && "
                                    "rm /etc/obsolete.conf && echo x >>/etc/hosts")
    step(root, c, "-w", "/work", "--", "sh", "-c", "echo made >here")
    image_id = oci(root, "commit", c, "ocl-built:1").stdout.strip()
    archive = tmp_path / "built.tar"
    oci(root, "export", "ocl-built:1", "-o", str(archive), "--format", "docker-archive")
    out = daemon.docker("load", "-i", str(archive)).stdout
    assert "ocl-built:1" in out, out
    assert daemon.docker("image", "inspect", "-f", "{{.Id}}",
                         "ocl-built:1").stdout.strip() == image_id
    seen = daemon.docker("run", "--rm", "--network", "none", "ocl-built:1", "sh", "-c",
                         "cat /data/one /work/here; test -e /etc/obsolete.conf || echo gone; "
                         "grep -c '^x$' /etc/hosts || true", check=False)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.splitlines() == ["one", "made", "gone", "0"]


# --- signals and the hold on the container ---


def test_sigterm_kills_a_step_that_ignores_it_after_the_grace_period(root: Path) -> None:
    c = create(root)
    proc = start_step(root, c, "--", "sleep", "1000")
    try:
        pid = str(proc.pid)
        for argv, what in ((["commit", c], "commit"), (["rm", c], "remove"),
                           (["umount", c], "unmount")):
            r = oci(root, *argv, check=False)
            assert_one_line_error(r.returncode, r.stderr, f"cannot {what}", c[:12],
                                  f"pid {pid}")
        again = step(root, c, "--", "true", check=False)
        assert_one_line_error(again.returncode, again.stderr, "running a step", pid)
        assert ps(root, c)["mounted"], "the running step's mount is gone"

        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)  # sleep as PID 1 has no handler: only the KILL after GRACE ends it
    finally:
        err = finish(proc)
    assert proc.returncode == 128 + signal.SIGKILL, err
    # it cleaned up: no runc container, no bundle, no mount; the container is free again
    assert runc_list(root) == []
    assert [p.name for p in (root / "ocilayers" / "run").iterdir()] == ["state"]
    assert not ps(root, c)["mounted"]
    assert step(root, c, "--", "true").returncode == 0
    oci(root, "rm", c)


def test_init_ends_the_step_on_sigterm(root: Path) -> None:
    c = create(root)
    proc = start_step(root, c, "--init", "--", "sleep", "1000")
    try:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
        took = time.monotonic() - t0
    finally:
        err = finish(proc)
    # tini passed SIGTERM on and exited with 128+15; the kill after GRACE would be 137
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < GRACE
    assert "/dev/init" not in tree(diff_dir(root, c))  # tini's mount point is in /dev's tmpfs
    assert tree(diff_dir(root, c)) == set()


def test_exit_codes_of_the_step_are_ours(root: Path) -> None:
    # (a step killed by a signal: 128+N, as the SIGTERM test's 137 and 143 show; a PID 1
    # cannot signal itself to death, the kernel ignores it)
    c = create(root)
    for code in (0, 1, 42, 255):
        r = step(root, c, "--", "sh", "-c", f"exit {code}", check=False)
        assert (r.returncode, r.stderr) == (code, "")


def test_no_command_is_a_one_line_error(root: Path) -> None:
    c = create(root)  # the image has no Entrypoint and no Cmd
    r = step(root, c, check=False)
    assert_one_line_error(r.returncode, r.stderr, "no command")


# --- isolation ---


def test_writing_proc_sys_as_root_fails_and_the_host_keeps_its_value(root: Path) -> None:
    knob = Path("/proc/sys/vm/swappiness")
    before = knob.read_text()
    other = "1" if before.strip() != "1" else "2"
    c = create(root)
    r = step(root, c, "--", "sh", "-c", f"id -u; echo {other} >{knob}", check=False)
    assert r.stdout == "0\n"
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr
    assert knob.read_text() == before


def test_network_none_has_only_lo(root: Path) -> None:
    c = create(root)
    r = step(root, c, "--network", "none", "--", "cat", "/proc/net/dev")
    assert net_devices(r.stdout) == {"lo"}
    default = step(root, c, "--", "cat", "/proc/net/dev")
    assert net_devices(default.stdout) == {"lo"}


def test_network_host_sees_the_hosts_interfaces(root: Path) -> None:
    host = net_devices(Path("/proc/net/dev").read_text())
    if host == {"lo"}:
        pytest.skip("the host has no interface but lo: nothing to tell the two apart")
    c = create(root)
    r = step(root, c, "--network", "host", "--", "cat", "/proc/net/dev")
    assert net_devices(r.stdout) == net_devices(Path("/proc/net/dev").read_text())


def test_hostname_is_the_short_container_id(root: Path) -> None:
    c = create(root)
    r = step(root, c, "--", "sh", "-c", "hostname; cat /etc/hostname")
    assert r.stdout.splitlines() == [c[:12], c[:12]]


# --- users ---


def ids(root: Path, container: str, user: str) -> tuple[str, str, set[str]]:
    r = step(root, container, "-u", user, "--", "sh", "-c", "id -u; id -g; id -G")
    uid, gid, groups = r.stdout.splitlines()
    return uid, gid, set(groups.split())


def test_user_names_and_groups_come_from_the_container(root: Path) -> None:
    c = create(root)
    # alice: uid/gid from /etc/passwd, staff and audio from /etc/group's member lists
    assert ids(root, c, "alice") == ("1000", "1000", {"1000", "50", "29"})
    # an explicit group: that gid, no supplementary groups (as runc's and Docker's rules)
    assert ids(root, c, "alice:staff") == ("1000", "50", {"50"})
    assert ids(root, c, "nobody") == ("65534", "65534", {"65534"})
    assert ids(root, c, "65534") == ("65534", "65534", {"65534"})  # numbers: the passwd gid
    assert ids(root, c, "4321:7") == ("4321", "7", {"7"})  # numbers not in passwd: as given


@pytest.mark.parametrize(("user", "needle"), [
    ("bob", "unable to find user bob"),
    ("alice:wheel", "unable to find group wheel"),
])
def test_unknown_user_or_group_is_a_one_line_error(root: Path, user: str,
                                                   needle: str) -> None:
    c = create(root)
    r = step(root, c, "-u", user, "--", "true", check=False)
    assert_one_line_error(r.returncode, r.stderr, needle)
    assert runc_list(root) == []


def test_symlinked_passwd_and_group_resolve_inside_the_rootfs(tmp_path: Path,
                                                              base: Path) -> None:
    # On the host, the links' targets are a planted passwd/group (uid 4242, gid 888); inside
    # the rootfs the same paths hold carol with uid 1234 and carolgrp with gid 777.
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "passwd").write_bytes(b"carol:x:4242:4242::/:/bin/sh\n")
    (planted / "group").write_bytes(b"carolgrp:x:888:\n")
    inside = str(planted).lstrip("/")
    image = busybox_image(
        tmp_path / "image", tb.dir(inside, mode=0o755),
        tb.file(f"{inside}/passwd", b"root:x:0:0::/:/bin/sh\ncarol:x:1234:1234::/:/bin/sh\n"),
        tb.file(f"{inside}/group", b"root:x:0:\ncarolgrp:x:777:\n"),
        tb.symlink("etc/passwd", str(planted / "passwd")),  # absolute
        tb.symlink("etc/group", "../" * 40 + f"{inside}/group"),  # climbs past the root
        passwd=None, group=None)
    r = tmp_path / "root"
    try:
        oci(r, "unpack", str(image), "--tag", "links:1")
        c = create(r, "links:1")
        out = step(r, c, "-u", "carol:carolgrp", "--", "sh", "-c", "id -u; id -g")
        assert out.stdout.splitlines() == ["1234", "777"]
        # the links themselves are what the container sees too
        seen = step(r, c, "--", "cat", "/etc/passwd", "/etc/group")
        assert "1234" in seen.stdout and "4242" not in seen.stdout
    finally:
        assert not unmount_all(r)


def test_a_fifo_passwd_fails_at_once(tmp_path: Path, base: Path) -> None:
    # an image can put a FIFO where /etc/passwd goes: opening it would block the run for ever
    image = busybox_image(tmp_path / "image", tb.fifo("etc/passwd"), passwd=None)
    r = tmp_path / "root"
    try:
        oci(r, "unpack", str(image), "--tag", "fifo:1")
        c = create(r, "fifo:1")
        proc = step(r, c, "-u", "alice", "--", "true", check=False)  # (run_module: 120 s cap)
        assert_one_line_error(proc.returncode, proc.stderr, "/etc/passwd",
                              "not a regular file")
        # a number is looked up too (for its primary group). (Without -u ocilayers reads
        # nothing, but runc's init then reads the FIFO itself, for $HOME, and hangs: never
        # run that here.)
        numeric = step(r, c, "-u", "0", "--", "true", check=False)
        assert_one_line_error(numeric.returncode, numeric.stderr, "not a regular file")
    finally:
        assert not unmount_all(r)


# --- not root ---


def _as_nobody(argv: Sequence[str]) -> tuple[int, str]:
    """`ocilayers ARGV` in a forked child that has dropped to uid/gid 65534 (the interpreter
    is under /root, which nobody may not enter, so no new one can be started as nobody: what
    the command imports is imported here first). Returns (exit code, stdout + stderr)."""
    import ocilayers.bundle
    import ocilayers.cli
    import ocilayers.cli.containers
    import ocilayers.lifecycle
    import ocilayers.run
    import ocilayers.store.containers  # noqa: F401
    from ocilayers.cli import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.close(r)
            sys.stdout = sys.stderr = os.fdopen(w, "w")
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # report it, whatever it is
            print(f"child: {type(exc).__name__}: {exc}")
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode()


def test_run_as_a_user_on_a_store_root_made_fails_with_one_line(base: Path) -> None:
    # a store made as root, then given to uid 65534, in a dir nobody can reach (pytest's tmp
    # dirs are 0700 root): its overlay metadata is in trusted.* xattrs, which a rootless run
    # can neither read nor write (rootless runs themselves: test_rootless.py)
    scratch = Path(tempfile.mkdtemp(prefix="ocl-nobody-", dir="/tmp"))
    try:
        scratch.chmod(0o755)
        r = scratch / "root"
        oci(r, "unpack", str(base), "--tag", "base:1")
        c = create(r)
        for dirpath, dirnames, filenames in os.walk(r):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, 65534, 65534, follow_symlinks=False)
        code, out = _as_nobody(["--root", str(r), "run", c, "--", "true"])
        assert_one_line_error(code, out, "made by root", "cannot be used rootless")
        assert runc_state(r).exists() is False
    finally:
        unmount_all(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def test_created_by_records_every_run_in_order(root: Path) -> None:
    c = create(root)
    step(root, c, "--", "touch", "/a")
    step(root, c, "-e", "X=1", "--", "sh", "-c", "touch /b")
    step(root, c, "--", "sh", "-c", "exit 1", check=False)
    oci(root, "commit", c, "steps:1")
    config = json.loads(oci(root, "inspect", "steps:1", "--json").stdout)["config"]
    assert config["history"][-1]["created_by"] == "touch /a && sh -c touch /b && sh -c exit 1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", config["history"][-1]["created"])

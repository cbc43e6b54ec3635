"""`ocilayers bundle`: the OCI runtime bundle (runtime-spec config.json) for a step, and the
resolver that reads the container's /etc/passwd and /etc/group.

Expectations are Docker's defaults written out here (oci/caps/defaults.go, oci/defaults.go),
not read from the product. The bundle is checked field by field, then run by the real runc
(`runc --root <tmp> run -b DIR ID`) and compared with what `ocilayers run` prints for the same
step. The resolver tests at the end need neither root nor runc: they build a rootfs as a plain
dir, symlinks and all.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error
from test_run import busybox_image, create, oci, ps, skip_reason, step, tree
from throwaway_dockerd import unmount_all

from ocilayers.bundle import RunOptions, resolve_user, runtime_spec
from ocilayers.errors import RunError

# Docker's default capabilities (moby oci/caps/defaults.go), in its order
DOCKER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
               "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
               "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
# moby oci/defaults.go DefaultLinuxSpec (20.10), also `runc spec`'s
MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
SYSTEM_MOUNTS = ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys",
                 "/sys/fs/cgroup"]
ETC_FILES = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    return busybox_image(tmp_path_factory.mktemp("image") / "base")


@pytest.fixture
def root(tmp_path: Path, base: Path) -> Iterator[Path]:
    r = tmp_path / "root"
    try:
        proc = oci(r, "unpack", str(base), "--tag", "base:1", check=False)
        if proc.returncode != 0 and "mount" in proc.stderr:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, proc.stderr
        yield r
    finally:
        assert not unmount_all(r)


def bundle(root: Path, container: str, directory: Path, *argv: str,
           nofile: tuple[int, int] | None = None) -> dict[str, Any]:
    """`ocilayers bundle CONTAINER DIR ARGV` (with RLIMIT_NOFILE set to `nofile` in the
    caller first, if given); returns the config.json it wrote."""
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    proc = subprocess.run([sys.executable, "-m", "ocilayers", "--root", str(root), "bundle",
                           container, str(directory), *argv], capture_output=True, text=True,
                          timeout=120, check=False, preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{directory}\n"
    config: dict[str, Any] = json.loads((directory / "config.json").read_text())
    return config


def mounts_by_dest(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in config["mounts"]}


def test_bundle_config_for_root(root: Path, tmp_path: Path) -> None:
    c = create(root)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(soft, 512) if hard == resource.RLIM_INFINITY else min(soft, hard, 512)
    config = bundle(root, c, tmp_path / "b", "-e", "FOO=bar", "-w", "/srv", "--", "sh", "-c",
                    "true", nofile=(soft, hard))
    (mounted,) = ps(root, c)["mounted"]
    assert config["root"] == {"path": mounted["target"], "readonly": False}
    assert config["hostname"] == c[:12]
    p = config["process"]
    assert p["args"] == ["sh", "-c", "true"]
    assert p["cwd"] == "/srv"
    assert p["env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "FOO=bar"]
    assert p["user"] == {"uid": 0, "gid": 0}
    assert p["terminal"] is False
    caps = p["capabilities"]
    assert caps["bounding"] == DOCKER_CAPS
    assert caps["effective"] == DOCKER_CAPS
    assert caps["permitted"] == DOCKER_CAPS
    assert len(DOCKER_CAPS) == 14
    # the caller's own limits: root without CAP_SYS_RESOURCE could not raise them
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft}]
    linux = config["linux"]
    assert linux["maskedPaths"][:len(MASKED)] == MASKED
    assert set(linux["maskedPaths"]) - set(MASKED) <= {"/sys/devices/virtual/powercap"}
    assert linux["readonlyPaths"] == READONLY
    assert {n["type"] for n in linux["namespaces"]} == {"pid", "ipc", "uts", "mount",
                                                         "network"}
    assert "seccomp" not in linux
    mounts = mounts_by_dest(config)
    assert [m["destination"] for m in config["mounts"]][:len(SYSTEM_MOUNTS)] == SYSTEM_MOUNTS
    assert set(mounts) == {*SYSTEM_MOUNTS, *ETC_FILES}
    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/dev"]["type"] == "tmpfs"
    assert mounts["/dev/pts"]["type"] == "devpts"
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert mounts["/sys"]["type"] == "sysfs" and "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    # /etc/hosts etc.: bind mounts of files outside the layers, beside the container's records
    records = root.resolve() / "ocilayers" / "containers" / c
    for dest in ETC_FILES:
        m = mounts[dest]
        assert m["type"] == "bind"
        src = Path(m["source"])
        assert src.parent == records, src
        assert src.is_file()
        assert not str(src).startswith(str(root.resolve() / "overlay2"))
    assert (records / "hostname").read_text() == c[:12] + "\n"
    assert c[:12] in (records / "hosts").read_text()
    oci(root, "umount", c)
    assert not ps(root, c)["mounted"]


def test_bundle_config_for_a_user_without_capabilities(root: Path, tmp_path: Path) -> None:
    c = create(root)
    config = bundle(root, c, tmp_path / "b", "-u", "alice", "--", "id")
    p = config["process"]
    assert p["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [50, 29]}
    assert p["capabilities"]["bounding"] == DOCKER_CAPS
    assert p["capabilities"]["effective"] == []
    assert p["capabilities"]["permitted"] == []
    assert not p["capabilities"].get("ambient")
    oci(root, "umount", c)


def test_bundle_network_host_shares_the_namespace(root: Path, tmp_path: Path) -> None:
    c = create(root)
    config = bundle(root, c, tmp_path / "b", "--network", "host", "--", "true")
    assert "network" not in {n["type"] for n in config["linux"]["namespaces"]}
    sys_mount = mounts_by_dest(config)["/sys"]
    assert sys_mount["type"] == "bind" and "ro" in sys_mount["options"]
    oci(root, "umount", c)


def test_bundle_init_and_seccomp(root: Path, tmp_path: Path) -> None:
    c = create(root)
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
    (tmp_path / "seccomp.json").write_text(json.dumps(profile))
    config = bundle(root, c, tmp_path / "b", "--init", "--seccomp",
                    str(tmp_path / "seccomp.json"), "--", "sleep", "1")
    assert config["process"]["args"] == ["/dev/init", "--", "sleep", "1"]
    init = mounts_by_dest(config)["/dev/init"]
    assert init["type"] == "bind" and "ro" in init["options"]
    # a static init: the image has no libc for a dynamic one to load
    with open(init["source"], "rb") as f:
        assert b"ld-linux" not in f.read(4096), init["source"]
    assert config["linux"]["seccomp"] == profile
    oci(root, "umount", c)
    # the profile is applied: mkdir is refused, the rest works
    r = step(root, c, "--seccomp", str(tmp_path / "seccomp.json"), "--", "sh", "-c",
             "mkdir /nope; echo $?", check=False)
    assert r.stdout.strip() == "1", r.stderr
    assert "not permitted" in r.stderr.lower() or "denied" in r.stderr.lower()


STEP = ("id; id -G; pwd; echo \"$FOO\"; hostname; cat /proc/net/dev | wc -l; ls /dev; "
        "cat /etc/hostname; echo made >>/tmp/made-here")


def test_runc_run_of_the_bundle_is_the_same_step(root: Path, tmp_path: Path) -> None:
    args = ("-u", "alice", "-w", "/w", "-e", "FOO=bar", "--", "sh", "-c", STEP)
    c = create(root)
    want = step(root, c, *args)
    assert "uid=1000(alice)" in want.stdout
    bundle(root, c, tmp_path / "b", *args)
    state = tmp_path / "runc-state"
    state.mkdir()
    runc = shutil.which("runc")
    assert runc is not None
    try:
        got = subprocess.run([runc, "--root", str(state), "run", "-b", str(tmp_path / "b"),
                              f"ocl-test-{os.getpid()}"], capture_output=True, text=True,
                             timeout=120, check=False)
    finally:
        subprocess.run([runc, "--root", str(state), "delete", "--force",
                        f"ocl-test-{os.getpid()}"], capture_output=True, check=False)
    assert (got.returncode, got.stdout, got.stderr) == (0, want.stdout, want.stderr)
    oci(root, "umount", c)
    # both wrote into the rw layer (root.path is the container's rw mount)
    upper = root / "overlay2" / ps(root, c)["mount_id"] / "diff"
    assert (upper / "tmp" / "made-here").read_text() == "made\nmade\n"
    assert tree(upper) == {"tmp/", "tmp/made-here", "w/"}


@pytest.mark.parametrize(("argv", "needle"), [
    ((), "no command"),
    (("-u", "bob", "--", "true"), "unable to find user bob"),
])
def test_a_failed_bundle_is_one_line_and_leaves_no_mount(root: Path, tmp_path: Path,
                                                         argv: tuple[str, ...],
                                                         needle: str) -> None:
    c = create(root)
    for _ in range(2):
        r = oci(root, "bundle", c, str(tmp_path / "b"), *argv, check=False)
        assert_one_line_error(r.returncode, r.stderr, needle)
        assert ps(root, c)["mounted"] == []  # (each failure used to leave one mount user)
    assert not (tmp_path / "b" / "config.json").exists()


# --- the resolver and the spec, pure (no root, no runtime) ---


def rootfs(tmp_path: Path, files: dict[str, bytes | str]) -> Path:
    """A plain dir as a rootfs: bytes are files, str are symlink targets."""
    r = tmp_path / "rootfs"
    for rel, what in files.items():
        p = r / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, str):
            p.symlink_to(what)
        else:
            p.write_bytes(what)
    return r


PW = b"root:x:0:0::/:/bin/sh\nalice:x:1000:1000::/:/bin/sh\n"
GR = b"root:x:0:\nalice:x:1000:\nstaff:x:50:alice\naudio:x:29:bob,alice\nwheel:x:10:alice\n"


def test_resolve_user_names_numbers_and_groups(tmp_path: Path) -> None:
    r = rootfs(tmp_path, {"etc/passwd": PW, "etc/group": GR})
    assert resolve_user(str(r), "alice") == (1000, 1000, [50, 29, 10])
    assert resolve_user(str(r), "1000") == (1000, 1000, [50, 29, 10])
    assert resolve_user(str(r), "alice:staff") == (1000, 50, [])
    assert resolve_user(str(r), "alice:7") == (1000, 7, [])
    assert resolve_user(str(r), "4321") == (4321, 0, [])
    assert resolve_user(str(r), "0") == (0, 0, [])
    with pytest.raises(RunError, match="unable to find user bob"):
        resolve_user(str(r), "bob")
    with pytest.raises(RunError, match="unable to find group nope"):
        resolve_user(str(r), "alice:nope")


def test_resolve_user_without_passwd_takes_only_numbers(tmp_path: Path) -> None:
    r = rootfs(tmp_path, {"bin/sh": b""})
    assert resolve_user(str(r), "12:34") == (12, 34, [])
    with pytest.raises(RunError, match="unable to find user alice"):
        resolve_user(str(r), "alice")


@pytest.mark.parametrize("how", ["absolute", "relative-escape", "dir-link"])
def test_symlinked_passwd_never_resolves_on_the_host(tmp_path: Path, how: str) -> None:
    # the host side of each target holds a different passwd (planted under tmp_path)
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_bytes(b"alice:x:4242:4242::/:/bin/sh\n")
    inside = str(host).lstrip("/")
    files: dict[str, bytes | str] = {f"{inside}/passwd": PW}
    if how == "absolute":
        files["etc/passwd"] = str(host / "passwd")
    elif how == "relative-escape":
        files["etc/passwd"] = "../" * 30 + f"{inside}/passwd"
    else:  # /etc itself a link to an absolute dir
        files["etc"] = str(host)
    r = rootfs(tmp_path, files)
    assert resolve_user(str(r), "alice")[0] == 1000


def test_a_passwd_symlink_loop_is_an_error_not_a_hang(tmp_path: Path) -> None:
    r = rootfs(tmp_path, {"etc/passwd": "/etc/passwd2", "etc/passwd2": "/etc/passwd"})
    with pytest.raises(RunError, match="cannot read the container's /etc/passwd: Too many"):
        resolve_user(str(r), "alice")


@pytest.mark.parametrize("kind", ["fifo", "device", "dir", "fifo-via-link"])
def test_a_passwd_that_is_no_file_is_never_opened(tmp_path: Path, kind: str) -> None:
    # a FIFO would block the run for ever; a device node would be opened on the host, as
    # root (a watchdog's open arms it): both are refused from their lstat, unopened
    r = rootfs(tmp_path, {"etc/group": GR})
    passwd = r / "etc" / ("real" if kind == "fifo-via-link" else "passwd")
    if kind.startswith("fifo"):
        os.mkfifo(passwd)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("mknod of a character device needs root")
        os.mknod(passwd, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    else:
        passwd.mkdir()
    if kind == "fifo-via-link":
        (r / "etc" / "passwd").symlink_to("/etc/real")
    want = "it is a directory" if kind == "dir" else "not a regular file"
    with pytest.raises(RunError, match=f"cannot read the container's /etc/passwd: {want}"):
        resolve_user(str(r), "alice")


def test_runtime_spec_merges_env_and_defaults(tmp_path: Path) -> None:
    r = rootfs(tmp_path, {"etc/passwd": PW, "etc/group": GR})
    image = {"config": {"Env": ["PATH=/opt/bin", "A=1", "B=2"], "WorkingDir": "app",
                        "Entrypoint": ["/ep"], "Cmd": ["x"], "User": "alice"}}
    spec = runtime_spec(image, "f" * 64, str(r), RunOptions(env=["B=3", "C=4"]))
    p = spec["process"]
    assert p["args"] == ["/ep", "x"]
    assert p["env"] == ["PATH=/opt/bin", "A=1", "B=3", "C=4"]
    assert p["cwd"] == "/app"
    assert p["user"]["uid"] == 1000
    assert spec["hostname"] == "f" * 12
    with pytest.raises(RunError, match="unknown network"):
        runtime_spec(image, "f" * 64, str(r), RunOptions(network="bridge"))
    with pytest.raises(RunError, match="no command"):
        runtime_spec({"config": {}}, "f" * 64, str(r), RunOptions())

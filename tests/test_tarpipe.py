"""`pack.open_layer_tar`: the layer tar of an upper dir as a stream, written by a forked child
(or a thread where the process cannot fork). Both writers must give the bytes `pack` writes,
pass on the walk's warnings, raise the walk's error ahead of the reader's, and stop cleanly
when the reader stops first. The writer also hashes the tar: `finish()` gives its DiffID."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocilayers import differ, forking
from ocilayers.errors import UpperDirError
from ocilayers.pack import open_layer_tar, pack


@pytest.fixture(params=["child", "thread"])
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each writer, forced: the CLI's process has one thread and forks, but this test process
    may not (the session's registry servers serve from threads), and a one-core machine
    takes the thread."""
    monkeypatch.setattr(forking, "can_fork", lambda: request.param == "child")
    yield request.param


def _upper(root: Path) -> Path:
    up = root / "upper"
    (up / "etc").mkdir(parents=True)
    (up / "etc" / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    (up / "big").write_bytes(os.urandom(3 << 20))  # several pipe-fulls
    os.symlink("big", up / "link")
    os.mknod(up / "gone", 0o600 | 0o020000, 0)  # whiteout
    for p in up.rglob("*"):
        os.utime(p, (1700000000, 1700000000), follow_symlinks=False)
    return up


def test_same_bytes_as_pack(tmp_path: Path, writer: str) -> None:
    up = _upper(tmp_path)
    want = io.BytesIO()
    made = pack(str(up), want, compression="none")
    with open_layer_tar(str(up)) as tar:
        got = b"".join(iter(lambda: tar.read(1 << 16), b""))
    assert got == want.getvalue()
    assert f"sha256:{hashlib.sha256(got).hexdigest()}" == str(made.diff_id)
    with tarfile.open(fileobj=io.BytesIO(got)) as tf:
        names = tf.getnames()
    assert ".wh.gone" in names and "etc/hosts" in names


def test_walk_runs_in_a_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forking, "can_fork", lambda: True)
    threads = threading.active_count()
    up = _upper(tmp_path)
    seen = tmp_path / "pids"
    real = differ.write_layer

    def spy(*args: object, **kwargs: object) -> object:
        with open(seen, "a") as f:
            f.write(f"{os.getpid()} {threading.active_count()}\n")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(differ, "write_layer", spy)
    with open_layer_tar(str(up)) as tar:
        while tar.read(1 << 16):
            pass
    pid, _threads = seen.read_text().split()
    assert int(pid) != os.getpid()
    assert threading.active_count() == threads  # no thread was started or left behind


def test_warnings_are_passed_on(tmp_path: Path, writer: str) -> None:
    up = _upper(tmp_path)
    (up / "run").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(up / "run" / "sock"))
        said: list[str] = []
        with open_layer_tar(str(up), warn=said.append) as tar:
            while tar.read(1 << 16):
                pass
    assert said == ["skipping socket 'run/sock'"]


def test_the_walks_error_comes_first(tmp_path: Path, writer: str) -> None:
    threads = threading.active_count()
    up = _upper(tmp_path)
    (up / "etc" / ".wh.x").mkdir()  # a real dir no layer can carry under that name
    with pytest.raises(UpperDirError, match="cannot be stored in a layer"), \
            open_layer_tar(str(up)) as tar:
        data = b"".join(iter(lambda: tar.read(1 << 16), b""))
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            tf.getnames()  # the cut-off tar: ReadError, which the walk's error beats
    assert threading.active_count() == threads  # the writer is gone, whichever it was


def test_reader_stops_first(tmp_path: Path, writer: str) -> None:
    """The caller leaves after one read (its own error): the writer sees a broken pipe and
    ends, the caller's error is the one raised, nothing hangs or is left running."""
    threads = threading.active_count()
    up = _upper(tmp_path)
    with pytest.raises(KeyError, match="stop"), open_layer_tar(str(up)) as tar:
        assert tar.read(512)
        raise KeyError("stop")
    assert threading.active_count() == threads


def test_stop_twice(tmp_path: Path, writer: str) -> None:
    """A second stop (or close) neither waits again nor loses the writer's error."""
    up = _upper(tmp_path)
    (up / ".wh.y").write_bytes(b"")  # a regular file no layer can carry under that name
    with pytest.raises(UpperDirError), open_layer_tar(str(up)) as tar:
        pipe = tar
        while tar.read(1 << 16):
            pass
    assert isinstance(pipe.stop(), UpperDirError)
    with pytest.raises(UpperDirError):
        pipe.close()



def test_finish_gives_the_writers_diff_id(tmp_path: Path, writer: str) -> None:
    """The walker hashes what it writes; finish() reads the rest and hands that DiffID on:
    pack's, and the hash of every byte this side read."""
    up = _upper(tmp_path)
    whole = io.BytesIO()
    made = pack(str(up), whole, compression="none")
    with open_layer_tar(str(up)) as tar:
        tar.read(1000)  # part read by the caller, the rest by finish()
        diff_id = tar.finish()
    assert diff_id == made.diff_id
    assert tar.count == len(whole.getvalue())
    assert str(diff_id) == f"sha256:{hashlib.sha256(whole.getvalue()).hexdigest()}"


def test_finish_raises_the_walks_error(tmp_path: Path, writer: str) -> None:
    up = _upper(tmp_path)
    (up / ".wh.bad").write_bytes(b"x")  # a name no layer can carry: the walk fails
    with pytest.raises(UpperDirError, match="cannot be stored"), open_layer_tar(str(up)) as tar:
        tar.finish()

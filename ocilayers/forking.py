"""One call run in a forked child while the caller goes on: CPU-bound Python work on a second
core, without multiprocessing's start-up cost or its pickling of the arguments (the child has
the parent's memory). The result comes back pickled through a pipe; an error comes back as the
same exception. Used only where the process has one thread (a fork copies no other thread)."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar

T = TypeVar("T")


def can_fork() -> bool:
    """A second core to use, and no other thread whose locks a fork could copy held."""
    return (os.cpu_count() or 1) > 1 and threading.active_count() == 1 and hasattr(os, "fork")


class Forked(Generic[T]):
    """`fn()` running in a child; `result()` waits for it. Leaving the block without
    asking for the result kills the child."""

    def __init__(self, fn: Callable[[], T]) -> None:
        rfd, wfd = os.pipe()
        parent = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        if pid == 0:
            os.close(rfd)
            _child(fn, wfd, parent)
        os.close(wfd)
        self._pid: int | None = pid
        self._rfd = rfd

    def result(self) -> T:
        parts = []
        try:
            while data := os.read(self._rfd, 1 << 20):
                parts.append(data)
        finally:
            self.close()
        if not parts:
            raise RuntimeError("a forked worker died without a result")
        ok, value, _tb = pickle.loads(b"".join(parts))
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        with contextlib.suppress(OSError):
            os.close(self._rfd)
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:  # still running: not wanted any more
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)

    def __enter__(self) -> Forked[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_prctl: Any = None  # libc's prctl, once looked up (prepare_children)


def prepare_children() -> None:
    """Look up what start_child calls (ctypes and libc's prctl) in the parent, once, so that
    the children it forks inherit it instead of each loading ctypes (3-6 ms a child)."""
    global _prctl
    if _prctl is None:
        with contextlib.suppress(Exception):
            import ctypes

            _prctl = ctypes.CDLL(None).prctl


def start_child(parent: int) -> None:
    """First thing in a forked child: Ctrl-C is the parent's to handle, the child dies with
    the parent (prctl PR_SET_PDEATHSIG), and a parent already gone ends it at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prepare_children()
    if _prctl is not None:
        with contextlib.suppress(Exception):
            _prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def pickled_error(exc: BaseException) -> bytes:
    """(False, exc, traceback text), pickled; an error that does not survive pickling is
    sent as an OCILayersError with its text and notes."""
    import traceback

    from ocilayers.errors import OCILayersError

    tb = "".join(traceback.format_exception(exc))
    try:
        payload = pickle.dumps((False, exc, tb), pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)
        return payload
    except Exception:
        plain = OCILayersError(f"{type(exc).__name__}: {exc}")
        for note in getattr(exc, "__notes__", None) or []:
            plain.add_note(str(note))
        return pickle.dumps((False, plain, tb), pickle.HIGHEST_PROTOCOL)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _child(fn: Callable[[], object], wfd: int, parent: int) -> NoReturn:
    status = 1
    try:
        start_child(parent)
        try:
            payload = pickle.dumps((True, fn(), ""), pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            payload = pickled_error(exc)
        write_all(wfd, payload)
        status = 0
    finally:
        os._exit(status)

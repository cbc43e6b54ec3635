"""Unpack an image into the store: layers built in parallel staging dirs, registered in order."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from ocilayers.errors import ImageError, OCILayersError, StoreError
from ocilayers.forking import pickled_error, prepare_children, start_child, write_all
from ocilayers.sources import Image, ImageSource, Layer
from ocilayers.spec import Digest, normalize_reference
from ocilayers.store import MAX_DEPTH, LayerRecord, Staging, Store
from ocilayers.store.layers import Built, fill_staging
from ocilayers.store.layout import held_interrupt

# (layer index, compressed bytes read so far, blob size); called in the parent process.
ProgressFn = Callable[[int, int, int], None]


@dataclass(frozen=True)
class UnpackedLayer:
    diff_id: Digest
    chain_id: Digest
    cache_id: str
    diff_size: int
    reused: bool


@dataclass(frozen=True)
class UnpackResult:
    image_id: Digest
    tags: tuple[str, ...]
    layers: tuple[UnpackedLayer, ...]


def build_layer(src: ImageSource, layer: Layer, staging: Staging,
                progress: Callable[[int], None] | None = None, *, busy: int = 1,
                spare_core: Callable[[], bool] | None = None) -> Built:
    """Decompress, verify and apply one layer into its staging dir, recording tar-split.
    A big layer's small files are written by file writers on the cores the other `busy - 1`
    layer builds running now leave free (forked before the readahead thread starts).
    Decompression and hashing go to a thread of their own (a second core for this layer)
    at once, or with `spare_core` only once it says a core is free: while every core has a
    build of its own, the thread would only add its hand-overs to the work."""
    from ocilayers import filewriters
    from ocilayers.whiteout import OverlayFormat

    fmt = staging.fmt or OverlayFormat.native()
    writers = filewriters.start(staging.diff, layer.descriptor.size, rootless=fmt.rootless,
                                busy=busy)
    try:
        with src.open_layer(layer, progress=progress,
                            readahead=True if spare_core is None else spare_core) as reader:
            return fill_staging(staging, reader, fmt, writers=writers)
    except (OSError, OCILayersError) as exc:
        exc.add_note(f"unpack layer {layer.descriptor.digest.short}")
        raise
    finally:
        if writers is not None:
            writers.abort()


# --- worker processes ---
# Plain os.fork() children, one per layer, each sending its result back through a pipe: no
# multiprocessing, whose locks, queues and shared arrays need POSIX semaphores or a file in
# /dev/shm, which a minimal chroot or build sandbox may lack (issue 13). The progress counters
# are an anonymous shared mapping, which needs no file at all.


class _RemoteTraceback(Exception):
    """A worker's traceback (as text), chained as the cause of the error it raised."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _worker_main(src: ImageSource, layer: Layer, staging: Staging, counters: memoryview,
                 index: int, parent_pid: int, wfd: int, close_fds: list[int],
                 busy: int, spare_core: Callable[[], bool]) -> NoReturn:
    """The forked child: build one layer, pickle (True, Built) or (False, error, traceback)
    into `wfd`, and leave with os._exit (never back into the parent's stack)."""
    status = 1
    try:
        # The parent handles Ctrl-C and cleans up; the handler the child was born with may
        # be the parent's "hold it" one (see _start_worker), so this comes first. A killed
        # unpack must leave no writer behind: the child dies with its parent.
        start_child(parent_pid)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        import gc
        import pickle

        gc.disable()  # the entry loop makes no cycles; the cyclic GC only costs time here

        def progress(n: int) -> None:
            counters[index] += n

        try:
            payload = pickle.dumps((True, build_layer(src, layer, staging, progress,
                                                      busy=busy, spare_core=spare_core)),
                                   pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            payload = pickled_error(exc)
        write_all(wfd, payload)
        status = 0
    finally:
        os._exit(status)


@dataclass
class _Worker:
    index: int
    pid: int
    rfd: int
    data: bytearray


def _start_worker(src: ImageSource, image: Image, index: int, staging: Staging,
                  counters: memoryview, running: dict[int, _Worker], busy: int,
                  spare_core: Callable[[], bool]) -> _Worker:
    """Fork the worker for layer `index` and add it to `running` (keyed by its pipe's read
    end). Ctrl-C is held meanwhile, so it cannot come between the fork and the bookkeeping
    the clean-up relies on."""
    parent_pid = os.getpid()
    with held_interrupt():
        rfd, wfd = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        if pid == 0:  # the child; _worker_main never returns
            _worker_main(src, image.layers[index], Staging(staging.path, staging.cache_id, -1,
                                                            staging.fmt),
                         counters, index, parent_pid, wfd, [rfd, *running], busy, spare_core)
        os.close(wfd)
        worker = running[rfd] = _Worker(index, pid, rfd, bytearray())
    return worker


def _worker_result(layer: Layer, worker: _Worker, status: int) -> Built:
    """The Built a finished worker sent back, or the error it raised (type and notes kept,
    its traceback chained as the cause, as concurrent.futures does)."""
    import pickle

    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and worker.data:
        ok, *rest = pickle.loads(worker.data)
        if ok:
            built: Built = rest[0]
            return built
        exc, tb = rest
        raise exc from _RemoteTraceback(tb)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            how = f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            how = f"was killed by signal {sig}"
    else:
        how = f"exited with status {os.waitstatus_to_exitcode(status)}"
    err = OCILayersError(f"worker process {how} before it was done")
    err.add_note(f"unpack layer {layer.descriptor.digest.short}")
    raise err


def unpack_image(store: Store, src: ImageSource, image: Image, *, tags: Sequence[str] = (),
                 jobs: int | None = None, progress: ProgressFn | None = None) -> UnpackResult:
    """Unpack `image` into `store`. Layers already there (by ChainID) are reused untouched."""
    if len(image.layers) > MAX_DEPTH:
        raise ImageError(f"image has {len(image.layers)} layers; overlay2 allows {MAX_DEPTH}")
    norm_tags = tuple(dict.fromkeys(normalize_reference(t) for t in tags))
    store.init()
    for layer in image.layers:
        if store.layers.get(layer.chain_id) is None:
            src.check_layer_present(layer)
    stagings: dict[int, Staging] = {}
    records: list[tuple[LayerRecord, bool]] = []
    with contextlib.ExitStack() as claimed:
        try:
            with held_interrupt(), store.lock():
                store.layers.clean_stale()
                todo = [i for i, layer in enumerate(image.layers)
                        if store.layers.get(layer.chain_id) is None]
                if not todo:  # all there: record and write the image under this one lock
                    _build_all(src, image, [], {}, jobs, None, store, records)
                    image_id = _write_image(store, image, norm_tags)
                    return _result(image_id, norm_tags, records)
                # Until the image is written its layers are referenced by nothing but this
                # claim, which keeps a concurrent prune/rmi from taking them (it dies with us).
                claimed.enter_context(
                    store.layers.claim([layer.chain_id for layer in image.layers]))
                for i in todo:
                    stagings[i] = store.layers.begin()
            _build_all(src, image, todo, stagings, jobs, progress, store, records)
        finally:
            for st in stagings.values():
                if os.path.exists(st.path):
                    store.layers.discard(st)
        with held_interrupt(), store.lock():
            image_id = _write_image(store, image, norm_tags)
    return _result(image_id, norm_tags, records)


def _write_image(store: Store, image: Image, tags: tuple[str, ...]) -> Digest:
    image_id = store.images.put(image.config.raw)
    for t in tags:
        store.images.set_tag(t, image_id)
    return image_id


def _result(image_id: Digest, tags: tuple[str, ...],
            records: list[tuple[LayerRecord, bool]]) -> UnpackResult:
    layers = tuple(UnpackedLayer(rec.diff_id, rec.chain_id, rec.cache_id, rec.size, reused)
                   for rec, reused in records)
    return UnpackResult(image_id, tags, layers)


def _build_all(src: ImageSource, image: Image, todo: list[int], stagings: dict[int, Staging],
               jobs: int | None, progress: ProgressFn | None, store: Store,
               records: list[tuple[LayerRecord, bool]]) -> dict[int, Built]:
    """Build the missing layers (in parallel when it pays) and register every layer in chain
    order as soon as it and its parents are ready."""
    jobs = max(1, jobs or os.cpu_count() or 1)
    built: dict[int, Built] = {}
    next_to_register = 0

    def register_ready() -> None:
        nonlocal next_to_register
        while next_to_register < len(image.layers):
            i = next_to_register
            layer = image.layers[i]
            parent = image.layers[i - 1].chain_id if i else None
            if i in stagings:
                if i not in built:
                    return
                b = built[i]
                with held_interrupt(), store.lock():
                    rec, reused = store.layers.register_built(stagings[i], b, parent)
            else:
                rec = store.layers.get(layer.chain_id)  # type: ignore[assignment]
                if rec is None:
                    raise StoreError(f"layer {layer.chain_id} vanished from the store")
                reused = True
            if rec.diff_id != layer.diff_id:
                raise StoreError(f"layer {layer.chain_id}: store has diff {rec.diff_id}, "
                                 f"image says {layer.diff_id}")
            records.append((rec, reused))
            next_to_register += 1

    if len(todo) <= 1 or jobs == 1:
        import gc

        gc_was_on = gc.isenabled()
        gc.disable()  # the entry loop makes no cycles; the cyclic GC only costs time here
        try:
            _build_in_process(src, image, todo, stagings, progress, built, register_ready)
        finally:
            if gc_was_on:
                gc.enable()
        register_ready()
        return built
    return _build_in_pool(src, image, todo, stagings, jobs, progress, built, register_ready)


def _build_in_process(src: ImageSource, image: Image, todo: list[int],
                      stagings: dict[int, Staging], progress: ProgressFn | None,
                      built: dict[int, Built], register_ready: Callable[[], None]) -> None:
    for i in todo:
        layer = image.layers[i]
        cb = None
        if progress is not None:
            count = [0]

            def cb(n: int, i: int = i, count: list[int] = count) -> None:
                count[0] += n
                progress(i, count[0], image.layers[i].descriptor.size)
        built[i] = build_layer(src, layer, stagings[i], cb)
        register_ready()


def _preload(image: Image, todo: list[int]) -> None:
    """Import, once and before the first fork, what every worker would import for itself
    (the entry loop, tar-split, the file writers and the codecs the layers name): each worker
    inherits it. They load lazily elsewhere, so a command that builds nothing starts faster."""
    import gc  # noqa: F401
    import pickle  # noqa: F401
    import queue  # noqa: F401

    from ocilayers import extract, filewriters, tarsplit  # noqa: F401

    prepare_children()

    media = " ".join(image.layers[i].descriptor.media_type for i in todo)
    if "gzip" in media:
        from isal import igzip  # noqa: F401
    if "zstd" in media:
        import zstandard  # noqa: F401


def _build_in_pool(src: ImageSource, image: Image, todo: list[int],
                   stagings: dict[int, Staging], jobs: int, progress: ProgressFn | None,
                   built: dict[int, Built], register_ready: Callable[[], None]
                   ) -> dict[int, Built]:
    """Build `todo` in up to `jobs` forked workers (see _worker_main), registering each layer
    as soon as it and its parents are ready. On any error or Ctrl-C the workers still
    running are killed and reaped before it propagates."""
    import mmap
    import select

    _preload(image, todo)
    # One progress counter per layer, and then how many workers run: anonymous and
    # MAP_SHARED (no /dev/shm), written by the parent, read by the workers.
    shared = mmap.mmap(-1, 8 * (len(image.layers) + 1))
    counters = memoryview(shared).cast("q")
    n_running = len(image.layers)
    cores = os.cpu_count() or 1

    def spare_core() -> bool:  # (asked in the workers)
        return counters[n_running] < cores

    # Biggest layer first: the longest job starts earliest, so the others fill in around it.
    order = sorted(todo, key=lambda i: -image.layers[i].descriptor.size)
    order.reverse()  # popped from the end
    running: dict[int, _Worker] = {}
    poller = select.poll()

    def start_more() -> None:
        counters[n_running] = min(jobs, len(running) + len(order))  # (set before the forks)
        while order and len(running) < jobs:
            i = order.pop()
            # (builds running from now on, this one included: its file writers get the
            # cores the others leave)
            busy = min(jobs, len(running) + 1 + len(order))
            worker = _start_worker(src, image, i, stagings[i], counters, running, busy,
                                   spare_core)
            poller.register(worker.rfd, select.POLLIN)

    try:
        while order or running:
            start_more()
            for fd, _events in poller.poll(100):
                chunk = os.read(fd, 1 << 20)
                if chunk:
                    running[fd].data += chunk
                    continue
                poller.unregister(fd)
                worker = running.pop(fd)
                os.close(fd)
                _, status = os.waitpid(worker.pid, 0)
                built[worker.index] = _worker_result(image.layers[worker.index], worker, status)
            start_more()  # a freed core takes the next layer now, not after the registrations
            if progress is not None:
                for i in todo:
                    progress(i, counters[i], image.layers[i].descriptor.size)
            register_ready()
    except BaseException:
        for worker in running.values():
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGKILL)
        for worker in running.values():
            with contextlib.suppress(OSError):
                os.waitpid(worker.pid, 0)
            with contextlib.suppress(OSError):
                os.close(worker.rfd)
        running.clear()
        raise
    finally:
        counters.release()
        shared.close()
    register_ready()
    return built


def record_pull(store: Store, image: Image, repository: str,
                manifest_digest: Digest | None) -> None:
    """After an unpack from a registry: each layer's blob digest, media type and DiffID,
    the repository (HOST/REPO) they came from, and the manifest digest as a
    `HOST/REPO@sha256:...` name, as dockerd's pull records them."""
    with store.lock():
        for layer in image.layers:
            store.distribution.record(layer.diff_id, layer.descriptor.digest, repository,
                                      layer.descriptor.media_type)
        if manifest_digest is not None:
            store.images.set_tag(f"{repository}@{manifest_digest}", image.image_id)

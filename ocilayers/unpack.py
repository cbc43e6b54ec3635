"""Unpack an image into the store: layers built in parallel staging dirs, registered in order."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ocilayers.errors import ImageError, OCILayersError, StoreError
from ocilayers.sources import Image, ImageSource, Layer
from ocilayers.spec import Digest, normalize_reference
from ocilayers.store import MAX_DEPTH, LayerRecord, Staging, Store
from ocilayers.store.layers import Built, fill_staging

if TYPE_CHECKING:
    from concurrent.futures import Future

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
                progress: Callable[[int], None] | None = None) -> Built:
    """Decompress, verify and apply one layer into its staging dir, recording tar-split."""
    with src.open_layer(layer, progress=progress, readahead=True) as reader:
        try:
            return fill_staging(staging, reader)
        except (OSError, OCILayersError) as exc:
            exc.add_note(f"unpack layer {layer.descriptor.digest.short}")
            raise


# --- worker processes ---

_WORKER: dict[str, Any] = {}


def _worker_init() -> None:
    # Die with the parent: a killed unpack must leave no writer behind (prctl PR_SET_PDEATHSIG).
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _WORKER.get("parent_pid"):
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    import gc

    gc.disable()  # the entry loop makes no cycles; the cyclic GC only costs time here


def _worker_build(index: int, staging_path: str, cache_id: str) -> Built:
    src: ImageSource = _WORKER["source"]
    image: Image = _WORKER["image"]
    counters: Any = _WORKER["counters"]

    def progress(n: int) -> None:
        counters[index] += n

    staging = Staging(staging_path, cache_id, -1)
    return build_layer(src, image.layers[index], staging, progress)


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
            with _held_interrupt(), store.lock():
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
        with _held_interrupt(), store.lock():
            image_id = _write_image(store, image, norm_tags)
    return _result(image_id, norm_tags, records)


@contextlib.contextmanager
def _held_interrupt() -> Iterator[None]:
    """Hold Ctrl-C back while the store changes in steps that belong together (a layer's
    registration; an image and its tags): the KeyboardInterrupt comes right after them,
    never between two. Only Python's default SIGINT handler, in the main thread, is held."""
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            raise KeyboardInterrupt


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
                with _held_interrupt(), store.lock():
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


def _build_in_pool(src: ImageSource, image: Image, todo: list[int],
                   stagings: dict[int, Staging], jobs: int, progress: ProgressFn | None,
                   built: dict[int, Built], register_ready: Callable[[], None]
                   ) -> dict[int, Built]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("fork")
    counters = ctx.Array("q", len(image.layers), lock=False)
    _WORKER.update(source=src, image=image, counters=counters, parent_pid=os.getpid())
    # Biggest layer first: the longest job starts earliest, so the others fill in around it.
    order = sorted(todo, key=lambda i: -image.layers[i].descriptor.size)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx,
                               initializer=_worker_init)
    try:
        futures: dict[Future[Built], int] = {
            pool.submit(_worker_build, i, stagings[i].path, stagings[i].cache_id): i
            for i in order
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            if progress is not None:
                for i in todo:
                    progress(i, counters[i], image.layers[i].descriptor.size)
            for fut in finished:
                built[futures[fut]] = fut.result()
            register_ready()
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                p.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        _WORKER.clear()
    pool.shutdown(wait=True)
    register_ready()
    return built


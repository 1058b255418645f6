"""Decoding and preprocessing images for the CLIP stages, ahead of the model, in threads or processes.

The model's preprocessing (open_clip's ``Compose``: resize, centre crop, RGB, to-tensor, normalize) is
split where the image becomes a tensor. Each image goes through the PIL steps on its own — in a thread,
or in a pool of worker processes when the GIL would starve the model (on a GPU the model outruns a
dozen decoding threads) — and comes back as an ``uint8`` array; the tensor steps (scale to ``[0, 1]``,
normalize) then run once per batch, on the model's device, giving the per-image transform's values
(the 256 levels are divided by 255 on the CPU, as ``ToTensor`` does, then looked up). A preprocessing
that cannot be split so (a custom transform after the tensor step) runs whole, per image, in threads;
so does every decoding where processes cannot be started (a daemon process, such as a Dask worker, may
not have children) or the PIL steps do not pickle.

:func:`batches` yields ``(start, images on the device or None, [None or ImageProblem per image])``, up
to two batches ahead of the caller, and adds to ``timings``: ``decode_s`` (wall seconds spent decoding)
and ``wait_s`` (seconds the model waited for a batch: starvation). Problems are the images' own
(``undecodable_image``, ``image_too_large``); one bad image never stops a batch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from curate.images import ImageProblem, decode_rgb

#: Images per task sent to a decoding process (few enough to spread a batch, many enough that the
#: pickling and the round trip stay small beside the decoding).
PROCESS_CHUNK = 8

_POOLS: dict[int, ProcessPoolExecutor] = {}
_POOLS_FINALIZER: list = []
_POOLS_LOCK = threading.Lock()


def split(preprocess) -> tuple[Any, list] | None:
    """``(PIL steps as one callable, tensor steps)`` when ``preprocess`` is a ``Compose`` whose steps
    after its to-tensor step are all ``Normalize``; None otherwise (run it whole, per image)."""
    try:
        from torchvision import transforms as T
    except ImportError:
        return None
    steps = list(getattr(preprocess, "transforms", None) or [])
    at = next((k for k, s in enumerate(steps) if type(s).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if at is None or not all(isinstance(s, T.Normalize) for s in steps[at + 1:]):
        return None
    return T.Compose(steps[:at]), steps[at + 1:]


def _one(blob: bytes, steps, max_pixels: int, as_pixels: bool):
    """One image through decoding and ``steps``: ``(result, None)`` or ``(None, (reason, detail))``;
    with ``as_pixels`` the result is the H×W×3 ``uint8`` array of the (PIL) steps' image."""
    try:
        out = steps(decode_rgb(blob, max_pixels))
        if as_pixels:
            out = np.asarray(out if out.mode == "RGB" else out.convert("RGB"))
        return out, None
    except ImageProblem as problem:
        return None, (problem.reason, problem.detail)
    except Exception as e:  # noqa: BLE001 - a preprocessing error is this image's alone
        return None, ("undecodable_image", f"{type(e).__name__}: {e}")


def _pixels(blob: bytes, pil_steps, max_pixels: int):
    """One image through decoding and the PIL steps: ``(H×W×3 uint8, None)`` or ``(None, (reason, detail))``."""
    return _one(blob, pil_steps, max_pixels, True)


def _pixels_chunk(blobs: list[bytes], pil_steps, max_pixels: int) -> list:
    """A decoding process's task: several images (one pickling round trip)."""
    return [_pixels(b, pil_steps, max_pixels) for b in blobs]


def _whole(blob: bytes, preprocess, max_pixels: int):
    """One image through the whole preprocessing (a transform that cannot be split): a tensor or a problem."""
    return _one(blob, preprocess, max_pixels, False)


def _child_init(parent: int) -> None:
    """In a decoding process: exit when the process that started the pool is gone (killed, crashed), so
    no decoder outlives its worker."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="clip-decode-watch").start()


def _can_use_processes(pil_steps) -> bool:
    """Processes need a parent that may have children (a Dask worker is a daemon process: it may not)
    and PIL steps that pickle (a custom transform may not); otherwise threads decode."""
    import multiprocessing
    import pickle

    if multiprocessing.current_process().daemon:
        return False
    try:
        pickle.dumps(pil_steps)
    except Exception:  # noqa: BLE001 - any pickling failure means: decode in threads
        return False
    return True


def process_pool(workers: int) -> ProcessPoolExecutor:
    """This process's pool of ``workers`` decoding processes (spawned: safe beside CUDA and threads),
    started once and kept for every later batch and shard; shut down at exit."""
    import multiprocessing
    import multiprocessing.util

    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            if not _POOLS_FINALIZER:
                # A process started by multiprocessing (a local worker) joins its children at exit
                # before the interpreter's own shutdown would stop these pools: stop them first, or
                # the worker waits forever for decoders that wait for work.
                _POOLS_FINALIZER.append(multiprocessing.util.Finalize(None, _shutdown_pools, exitpriority=100))
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_child_init, initargs=(os.getpid(),))
            _POOLS[workers] = pool
        return pool


def _discard_pool(workers: int, broken: ProcessPoolExecutor) -> None:
    """Forget a broken pool (a decoding process died), unless it was replaced already: the next call
    starts a new one."""
    with _POOLS_LOCK:
        if _POOLS.get(workers) is broken:
            del _POOLS[workers]
    broken.shutdown(wait=False, cancel_futures=True)


def _submit(chunk: list[bytes], pil_steps, max_pixels: int, workers: int):
    """Queue a batch on the decoding processes, in tasks of ``PROCESS_CHUNK`` images: ``(pool, futures)``."""
    pool = process_pool(workers)
    try:
        return pool, [pool.submit(_pixels_chunk, chunk[k:k + PROCESS_CHUNK], pil_steps, max_pixels)
                      for k in range(0, len(chunk), PROCESS_CHUNK)]
    except BrokenProcessPool:
        return pool, None


def _collect(chunk: list[bytes], submitted, pil_steps, max_pixels: int, workers: int) -> list:
    """``_pixels`` of each blob of a submitted batch. A decoder that crashes its process (a hostile file
    can crash a native decoder) costs that image alone: the batch is redone one image at a time, and the
    image whose decoding breaks the pool again is reported as ``undecodable_image``."""
    pool, futures = submitted
    if futures is not None:
        with contextlib.suppress(BrokenProcessPool):  # a decoder died: redo this batch below
            return [r for f in futures for r in f.result()]
    _discard_pool(workers, pool)
    out = []
    for blob in chunk:
        pool = process_pool(workers)
        try:
            out.append(pool.submit(_pixels, blob, pil_steps, max_pixels).result())
        except BrokenProcessPool:
            _discard_pool(workers, pool)
            out.append((None, ("undecodable_image", "the image decoder crashed (its process died)")))
    return out


@atexit.register
def _shutdown_pools() -> None:
    """Stop every decoding pool of this process and wait for its processes to leave."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def batches(blobs: list[bytes], preprocess, size: int, *, torch, device: str, dtype, max_pixels: int,
            workers: int, processes: bool, timings: dict):
    """Decoded, preprocessed batches of ``blobs`` on ``device`` in ``dtype`` (see the module docstring)."""
    parts = split(preprocess)
    cuda = device.startswith("cuda")
    processes = processes and parts is not None and _can_use_processes(parts[0])
    threads = None if processes else ThreadPoolExecutor(workers, thread_name_prefix="clip-decode")

    def pixels(chunk: list[bytes]) -> list:
        if parts is None:
            return list(threads.map(lambda b: _whole(b, preprocess, max_pixels), chunk))
        return list(threads.map(lambda b: _pixels(b, parts[0], max_pixels), chunk))

    def assemble(done: list) -> tuple[Any, list]:
        """One batch: (a host tensor of the good images — uint8 N×H×W×3, or the whole transform's
        float N×C×H×W — or None, [None or ImageProblem per image])."""
        problems = [ImageProblem(*p) if p is not None else None for _, p in done]
        good = [x for x, _ in done if x is not None]
        if not good:
            return None, problems
        if parts is None:
            return torch.stack(good), problems
        if len({g.shape for g in good}) > 1:
            raise ValueError("the model's preprocessing gave images of different sizes "
                             f"({sorted({g.shape for g in good})}): it must resize and crop to one size")
        host = torch.from_numpy(np.stack(good))
        return (host.pin_memory() if cuda else host), problems

    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        ahead: dict[int, Any] = {}
        try:
            starts = list(range(0, len(blobs), size))
            # processes: the next batch is queued before this one is collected, so no process idles
            # at the end of a batch
            for n, start in enumerate(starts):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                if processes:
                    for s in starts[n:n + 2]:
                        if s not in ahead:
                            ahead[s] = _submit(blobs[s:s + size], parts[0], max_pixels, workers)
                    done = _collect(blobs[start:start + size], ahead.pop(start), parts[0], max_pixels, workers)
                else:
                    done = pixels(blobs[start:start + size])
                item = (start, *assemble(done))
                timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - t0
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
            q.put(e)
        finally:
            for _, futures in ahead.values():  # the consumer stopped early: drop the work queued ahead
                for f in futures or ():
                    f.cancel()
        q.put(None)

    thread = threading.Thread(target=produce, daemon=True, name="clip-prefetch")
    thread.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = q.get()
            timings["wait_s"] = timings.get("wait_s", 0.0) + time.perf_counter() - t0
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            start, host, problems = item
            if host is None:
                yield start, None, problems
                continue
            images = host.to(device, non_blocking=cuda)
            if parts is not None and host.dtype == torch.uint8:
                images = _finish(images, parts[1], torch)
            yield start, images.to(dtype), problems
    finally:
        stop.set()
        while thread.is_alive():  # drain, so a producer blocked on a full queue finishes and leaves
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        if threads is not None:
            threads.shutdown(wait=True)


_LEVELS: dict[str, Any] = {}


def _finish(pixels, normalizers: list, torch):
    """N×H×W×3 uint8 → N×3×H×W float32 in [0, 1] (as ``ToTensor``), then each ``Normalize``.

    The 256 levels are divided by 255 once, on the CPU, as ``ToTensor`` does, and looked up on the
    pixels' device: CUDA divides by a scalar as a multiplication by its reciprocal, which differs in
    the last bit for half the levels."""
    key = str(pixels.device)
    if key not in _LEVELS:
        _LEVELS[key] = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255).to(pixels.device)
    x = _LEVELS[key][pixels.permute(0, 3, 1, 2).long()]
    for norm in normalizers:
        x = norm(x)
    return x

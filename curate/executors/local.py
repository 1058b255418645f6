"""``executor: {kind: local, workers: N}``: a process pool on this machine (the default).

Workers are started with ``spawn`` and rebuild the plan from the resolved manifest (nothing live is
pickled). ``workers: 1`` runs in the driver process, which is simplest to debug.

The machine's cores are shared out among the workers: each worker's Rust thread pools (the
tokenizer's ``encode_batch``, polars) get ``cores // workers`` threads (at least one), so N workers do
not each start a pool as large as the machine (64 workers on 64 cores would otherwise run 4,096 encoder
threads). ``RAYON_NUM_THREADS`` / ``POLARS_MAX_THREADS`` set by the user win.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from pydantic import Field

from curate.allocator import tune_allocator
from curate.executors.base import Done, Executor, ExecutorParams, Progress
from curate.planner import Phase, Plan
from curate.plugins import register_executor
from curate.readers.base import Shard
from curate.runner import run_shard_retrying

_worker: dict[str, Any] = {}


@register_executor("local")
class LocalExecutor(Executor):
    class Params(ExecutorParams):
        workers: int | None = Field(None, gt=0, description="worker processes (null: one per core)")

    def map_shards(self, plan: Plan, phase: Phase, shards: list[Shard], done: Done, progress: Progress) -> None:
        workers = min(self.params.workers or os.cpu_count() or 1, len(shards))
        retry = {"retries": self.params.retries, "backoff": self.params.retry_backoff}
        if workers <= 1:
            for shard in shards:
                try:
                    done(shard, run_shard_retrying(plan, phase, shard, progress, **retry), None)
                except Exception as e:  # noqa: BLE001 - the driver reports failed shards together
                    done(shard, None, e)
            return
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        stop = threading.Event()
        pump = threading.Thread(target=_pump, args=(queue, progress, stop), daemon=True)
        pump.start()
        plan_dict = plan.to_dict()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                   initargs=(plan_dict, queue, os.getpid(), retry, threads_per_worker(workers)))
        try:
            futures = {pool.submit(_run, phase.index, s.name): s for s in shards}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    err = f.exception()
                    done(futures[f], None if err else f.result(), err)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or the driver failed: stop the workers now rather than
            # wait for their shards; a rerun redoes the unfinished ones.
            _terminate(pool)
            raise
        else:
            pool.shutdown(wait=True)
        finally:
            stop.set()
            pump.join(timeout=2)


def _terminate(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()


def _pump(queue, progress: Progress, stop: threading.Event) -> None:
    import queue as q

    while not stop.is_set():
        try:
            rows, tokens = queue.get(timeout=0.2)
        except q.Empty:
            continue
        except (EOFError, OSError):
            return
        progress(rows, tokens)


def cpu_share() -> int:
    """The cores this process may keep busy: its thread share in a local worker, else its usable cores."""
    if "threads" in _worker:
        return _worker["threads"]
    return threads_per_worker(1)


def threads_per_worker(workers: int) -> int:
    """Threads each worker's native pools get: this process's usable cores shared out, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


#: Environment variables sizing the native thread pools a worker may start (read when the pool starts).
THREAD_POOL_VARIABLES = ("RAYON_NUM_THREADS", "POLARS_MAX_THREADS")


def size_thread_pools(threads: int) -> dict[str, str]:
    """Size this process's native thread pools (unless the user did); returns the values in force.

    Must run before any stage imports polars or encodes a batch: the pools read these once, at start.
    """
    for name in THREAD_POOL_VARIABLES:
        os.environ.setdefault(name, str(threads))
    return {name: os.environ[name] for name in THREAD_POOL_VARIABLES}


def _init(plan_dict: dict, queue, driver_pid: int, retry: dict, threads: int) -> None:
    tune_allocator(threads)
    size_thread_pools(threads)
    _watch_driver(driver_pid)
    _worker["plan"] = Plan.from_dict(plan_dict)
    _worker["queue"] = queue
    _worker["retry"] = retry
    _worker["threads"] = threads


def _watch_driver(driver_pid: int) -> None:
    """Exit this worker as soon as the driver is gone (killed with -9 or -TERM, or crashed).

    Linux: the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``; workers are spawned
    by the driver's main thread, which lives as long as the driver). Everywhere: a daemon thread
    checks twice a second that the parent is still the driver.
    """
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):  # not Linux/glibc: the thread below suffices
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != driver_pid:  # the driver died before we armed the signal
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != driver_pid:
                os._exit(1)

    threading.Thread(target=watch, name="curate-driver-watch", daemon=True).start()


def _run(phase_index: int, shard_name: str) -> dict:
    plan: Plan = _worker["plan"]
    queue = _worker["queue"]
    shard = next(s for s in plan.shards if s.name == shard_name)
    return run_shard_retrying(plan, plan.phases[phase_index], shard, lambda r, t: queue.put((r, t)),
                              **_worker["retry"])

"""``executor: {kind: local, workers: N}``: a process pool on this machine (the default).

Workers are started with ``spawn`` and rebuild the plan from the resolved manifest (nothing live is
pickled). ``workers: 1`` runs in the driver process, which is simplest to debug.

The machine's cores are shared out among the workers: each worker's native thread pools (the
tokenizer's ``encode_batch``, polars, numpy's BLAS, OpenMP, MKL) get ``cores // workers`` threads (at
least one), so N workers do not each start a pool as large as the machine (64 workers on 64 cores would
otherwise run 4,096 encoder threads). Variables the user set (``RAYON_NUM_THREADS``,
``OPENBLAS_NUM_THREADS`` …) win.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pydantic import Field

from curate.allocator import tune_allocator
from curate.executors.base import Done, Executor, ExecutorParams, Progress, WorkerLost, say
from curate.planner import Phase, Plan
from curate.plugins import register_executor
from curate.readers.base import Shard
from curate.runner import run_shard_retrying

_worker: dict[str, Any] = {}
log = logging.getLogger("curate")


@register_executor("local")
class LocalExecutor(Executor):
    class Params(ExecutorParams):
        workers: int | None = Field(None, gt=0, description="worker processes (null: one per core)")
        task_retries: int = Field(
            3, ge=0, description="times a shard lost with its worker process (killed, out of memory, crashed) is "
                                 "run again")

    def __init__(self, params):
        super().__init__(params)
        self.console = None  # the driver's rich Console (set by the driver); stderr when None

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
        plan_dict = plan.to_dict()
        with load_time_pools_sized(threads_per_worker(workers)):
            self._map_pooled(ctx, plan_dict, phase, shards, workers, retry, done, progress)

    def _map_pooled(self, ctx, plan_dict: dict, phase: Phase, shards: list[Shard], workers: int, retry: dict,
                    done: Done, progress: Progress) -> None:
        losses: dict[str, int] = {}
        todo = list(shards)
        while todo:
            # A new pool, message pipe and pump each time. Workers write their messages straight into the
            # pipe (no feeder thread, no lock: a message this small is one atomic write), so a "started"
            # message is in the pipe before the shard runs, and a worker killed mid-write poisons nothing.
            inbox, outbox = ctx.Pipe(duplex=False)
            started: dict[str, int] = {}  # shard name → pid of the worker that started it
            stop = threading.Event()
            pump = threading.Thread(target=_pump, args=(inbox, progress, started, stop), daemon=True)
            pump.start()
            pool = None
            try:
                pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init,
                                           initargs=(plan_dict, outbox, os.getpid(), retry,
                                                     threads_per_worker(workers)))
                lost = _map(pool, phase, todo, done)
                if not lost:
                    pool.shutdown(wait=True)
                    return
                processes = dict(getattr(pool, "_processes", None) or {})  # pid → Process (CPython's pool)
                ours = _terminate(pool)  # the pool stops its other workers with SIGTERM; make sure they are gone
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM) or the driver failed: stop the workers now rather than
                # wait for their shards; a rerun redoes the unfinished ones.
                if pool is not None:
                    _terminate(pool)
                raise
            finally:
                stop.set()
                pump.join(timeout=2)
                if not pump.is_alive():
                    _drain(inbox, progress, started)  # what the workers wrote before they ended
                inbox.close()
                outbox.close()
            # processes we had to SIGKILL ourselves did not die of their own shard
            exits = {pid: p.exitcode for pid, p in processes.items() if pid not in ours}
            todo = self._requeue(phase, lost, dict(started), exits, losses, done)

    def _requeue(self, phase: Phase, lost: list[Shard], started: dict[str, int], exits: dict[int, int],
                 losses: dict[str, int], done: Done) -> list[Shard]:
        """The shards a broken pool took down, to run again in a new one.

        When one worker process dies, the pool stops the others (SIGTERM) and fails every shard it held.
        Only the shards that ran on a process that died otherwise are charged a loss; when that cannot be
        told, every shard that had started is, and when none had, every lost shard is (so a worker that
        dies at once cannot loop forever). Past ``task_retries`` losses a shard is reported as
        :class:`WorkerLost`; the others simply run again. Workers that all exited cleanly before any
        shard started could not start at all: every lost shard is reported as :class:`WorkerStartFailed`.
        """
        dead = {pid: code for pid, code in exits.items() if code not in (None, 0, -signal.SIGTERM)}
        if not dead and not started:
            # Every worker left by itself before starting a shard: they could not start (the pool's
            # initializer raised and printed its traceback above). Running them again would not help.
            for shard in lost:
                error = WorkerStartFailed("the worker processes exited before running a shard: they could not "
                                          "start (the error is printed above, before this report)")
                error.curate_stage = "worker start"
                done(shard, None, error)
            return []
        charged = ([s for s in lost if started.get(s.name) in dead] or [s for s in lost if s.name in started]
                   or lost)
        again: list[Shard] = []
        for shard in lost:
            if shard not in charged:
                again.append(shard)
                continue
            cause = _exit_words(dead.get(started.get(shard.name, -1)))
            n = losses[shard.name] = losses.get(shard.name, 0) + 1
            if n > self.params.task_retries:
                error = WorkerLost(f"its worker process died {n} time(s) while the shard ran (the last time "
                                   f"{cause}); a worker killed for using too much memory is the usual cause")
                error.curate_stage = "worker"
                done(shard, None, error)
                continue
            say(self.console, f"shard {shard.name} phase {phase.index}: its worker process died ({cause}); "
                              f"running it again ({n} of {self.params.task_retries})", logging.WARNING)
            again.append(shard)
        return again


class WorkerStartFailed(RuntimeError):
    """The local worker processes exited before running any shard (an error while starting them)."""


def _map(pool: ProcessPoolExecutor, phase: Phase, shards: list[Shard], done: Done) -> list[Shard]:
    """Run ``shards`` on ``pool``, reporting each to ``done``; returns those lost when the pool broke
    (including any not yet submitted when it broke: spawning a worker inside ``submit`` takes time, and
    an early worker may die meanwhile)."""
    futures = {}
    unsubmitted: list[Shard] = []
    for k, shard in enumerate(shards):
        try:
            futures[pool.submit(_run, phase.index, shard.name)] = shard
        except BrokenProcessPool:
            unsubmitted = shards[k:]
            break
    lost: list[Shard] = list(unsubmitted)
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for f in sorted(finished, key=lambda f: futures[f].name):
            err = f.exception()
            if isinstance(err, BrokenProcessPool):
                lost.append(futures[f])
            else:
                done(futures[f], None if err else f.result(), err)
    return sorted(lost, key=lambda s: s.name)


def _exit_words(code: int | None) -> str:
    """How a worker process ended, in words."""
    if code is None:
        return "it stopped abruptly"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (", as the out-of-memory killer does" if code == -signal.SIGKILL else "")
    return f"exit code {code}"


def _terminate(pool: ProcessPoolExecutor) -> set[int]:
    """Stop the pool's worker processes and then the pool; returns the pids that needed SIGKILL.

    SIGTERM first; the pool's manager thread then reaps them (a broken pool's thread joins every worker),
    and it is waited for, up to 5 s, before anything is read: a process reaped by that thread while this
    one polls it would look alive (its ``waitpid`` fails), and be counted as killed here. Whatever is
    still running after that gets SIGKILL. The pool itself is shut down last: on Python 3.12 a broken
    pool's clean-up holds the lock ``shutdown`` needs while it joins the workers.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for p in processes:
        with contextlib.suppress(OSError):
            p.terminate()  # harmless on a process that is already gone
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(timeout=5)
    deadline = time.monotonic() + 5
    killed: set[int] = set()
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            with contextlib.suppress(OSError):
                p.kill()
            p.join(timeout=5)
            killed.add(p.pid)
    pool.shutdown(wait=False, cancel_futures=True)
    return killed


def _pump(inbox, progress: Progress, started: dict[str, int], stop: threading.Event) -> None:
    """Workers' messages: ``(rows, tokens)`` progress, or ``(shard name, pid)`` when a shard starts."""
    while not stop.is_set():
        try:
            if not inbox.poll(0.2):
                continue
            message = inbox.recv()
        except (EOFError, OSError):
            return
        _take(message, progress, started)


def _drain(inbox, progress: Progress, started: dict[str, int]) -> None:
    """Take the messages still in the pipe (the pump has stopped; the workers are gone or done)."""
    try:
        while inbox.poll(0):
            _take(inbox.recv(), progress, started)
    except (EOFError, OSError):
        return


def _take(message, progress: Progress, started: dict[str, int]) -> None:
    first, second = message
    if isinstance(first, str):
        started[first] = second
        return
    try:
        progress(first, second)
    except Exception:  # noqa: BLE001 - a display problem must not stop the messages (workers would block)
        log.debug("progress callback failed", exc_info=True)


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
#: The same for pools that read their size when their library loads — before a spawned worker's first
#: line runs (numpy's OpenBLAS, OpenMP, MKL): set in the driver while it starts its workers.
LOAD_TIME_POOL_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Set by the user, any of these sizes those pools (OpenBLAS reads its own variable, then GOTO's, then
#: OpenMP's): then none is touched, so a lone ``OMP_NUM_THREADS`` is not overruled by the others.
_USER_POOL_VARIABLES = (*LOAD_TIME_POOL_VARIABLES, "GOTO_NUM_THREADS")


@contextlib.contextmanager
def load_time_pools_sized(threads: int):
    """Within this block, processes started from here size their load-time pools to ``threads`` (unless
    the user set any of them: then all are left as they are); this process's own environment is
    restored afterwards.

    numpy's OpenBLAS otherwise starts a thread per core in every worker; idle, those threads still
    spin for a while after each wake-up. Measured: 2 workers on 2 cores, tokenize → utk → pack of 45 MB
    of held-out text, 7.2–8.7 s with them against 6.7–7.8 s without (interleaved, 4 runs each).
    """
    saved = {name: os.environ.get(name) for name in LOAD_TIME_POOL_VARIABLES}
    if not any(os.environ.get(name) for name in _USER_POOL_VARIABLES):
        for name in LOAD_TIME_POOL_VARIABLES:
            os.environ[name] = str(threads)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def size_thread_pools(threads: int) -> dict[str, str]:
    """Size this process's native thread pools (unless the user did); returns the values in force.

    Must run before any stage imports polars or encodes a batch: the pools read these once, at start.
    """
    for name in THREAD_POOL_VARIABLES:
        os.environ.setdefault(name, str(threads))
    return {name: os.environ[name] for name in THREAD_POOL_VARIABLES}


def _init(plan_dict: dict, outbox, driver_pid: int, retry: dict, threads: int) -> None:
    from curate.quick_exit import skip_exit_collection

    tune_allocator(threads)
    skip_exit_collection()
    size_thread_pools(threads)
    _watch_driver(driver_pid)
    _worker["plan"] = Plan.from_dict(plan_dict)
    _worker["outbox"] = outbox
    _worker["retry"] = retry
    _worker["threads"] = threads


def _watch_driver(driver_pid: int) -> None:
    """Exit this worker as soon as the driver is gone (killed with -9 or -TERM, or crashed).

    Linux: the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``; workers are spawned
    by the driver's main thread, which lives as long as the driver). Everywhere: a daemon thread
    checks twice a second that the parent is still the driver.
    """
    import ctypes

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
    outbox = _worker["outbox"]
    shard = next(s for s in plan.shards if s.name == shard_name)
    outbox.send((shard_name, os.getpid()))  # written to the pipe before the shard starts
    return run_shard_retrying(plan, plan.phases[phase_index], shard, lambda r, t: outbox.send((r, t)),
                              **_worker["retry"])

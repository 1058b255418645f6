"""``executor: {kind: local, workers: N}``: a process pool on this machine (the default).

Workers are started with ``spawn`` and rebuild the plan from the resolved manifest (nothing live is
pickled). ``workers: 1`` runs in the driver process, which is simplest to debug.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from pydantic import Field

from curate.executors.base import Done, Executor, Progress
from curate.planner import Phase, Plan
from curate.plugins import register_executor
from curate.readers.base import Shard
from curate.runner import run_shard
from curate.stage import StageParams

_worker: dict[str, Any] = {}


@register_executor("local")
class LocalExecutor(Executor):
    class Params(StageParams):
        workers: int | None = Field(None, gt=0, description="worker processes (null: one per core)")

    def map_shards(self, plan: Plan, phase: Phase, shards: list[Shard], done: Done, progress: Progress) -> None:
        workers = min(self.params.workers or os.cpu_count() or 1, len(shards))
        if workers <= 1:
            for shard in shards:
                try:
                    done(shard, run_shard(plan, phase, shard, progress), None)
                except Exception as e:  # noqa: BLE001 - the driver reports failed shards together
                    done(shard, None, e)
            return
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        stop = threading.Event()
        pump = threading.Thread(target=_pump, args=(queue, progress, stop), daemon=True)
        pump.start()
        plan_dict = plan.to_dict()
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(plan_dict, queue)) as pool:
                futures = {pool.submit(_run, phase.index, s.name): s for s in shards}
                try:
                    pending = set(futures)
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            err = f.exception()
                            done(futures[f], None if err else f.result(), err)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        finally:
            stop.set()
            pump.join(timeout=2)


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


def _init(plan_dict: dict, queue) -> None:
    _worker["plan"] = Plan.from_dict(plan_dict)
    _worker["queue"] = queue


def _run(phase_index: int, shard_name: str) -> dict:
    plan: Plan = _worker["plan"]
    queue = _worker["queue"]
    shard = next(s for s in plan.shards if s.name == shard_name)
    return run_shard(plan, plan.phases[phase_index], shard, lambda r, t: queue.put((r, t)))

"""The local executor shares the machine's cores among its workers' native thread pools."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor

from curate.executors.local import (
    LOAD_TIME_POOL_VARIABLES,
    THREAD_POOL_VARIABLES,
    load_time_pools_sized,
    size_thread_pools,
    threads_per_worker,
)


def _pools() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in THREAD_POOL_VARIABLES}


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_threads_per_worker_shares_the_cores_and_never_drops_to_zero():
    assert threads_per_worker(1) == _cores()
    assert threads_per_worker(2) == max(1, _cores() // 2)
    assert threads_per_worker(10 * _cores()) == 1


def test_spawned_workers_get_the_share_unless_the_user_set_the_pools(monkeypatch):
    for name in THREAD_POOL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=size_thread_pools, initargs=(3,)) as pool:
        seen = [pool.submit(_pools).result() for _ in range(4)]
    assert all(s == dict.fromkeys(THREAD_POOL_VARIABLES, "3") for s in seen)

    monkeypatch.setenv("RAYON_NUM_THREADS", "5")  # the user's choice wins
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=size_thread_pools, initargs=(3,)) as pool:
        assert pool.submit(_pools).result() == {"RAYON_NUM_THREADS": "5", "POLARS_MAX_THREADS": "3"}


def _blas_threads() -> dict:
    """The load-time pool variables this process started with, and the threads numpy's BLAS runs."""
    import numpy as np

    np.ones((64, 64)) @ np.ones((64, 64))  # the BLAS pool exists once it has worked
    got = {name: os.environ.get(name) for name in LOAD_TIME_POOL_VARIABLES}
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_info

        got["blas"] = sum(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
    return got


def test_workers_load_their_blas_and_openmp_pools_at_the_share(monkeypatch):
    """numpy's OpenBLAS sizes its pool when it loads, before a spawned worker's first line runs: the
    driver sets the share while it starts workers, leaves the user's settings alone, and gets its own
    environment back afterwards."""
    for name in (*LOAD_TIME_POOL_VARIABLES, "GOTO_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    ctx = mp.get_context("spawn")
    with load_time_pools_sized(1):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            seen = pool.submit(_blas_threads).result()
    assert {k: seen[k] for k in LOAD_TIME_POOL_VARIABLES} == dict.fromkeys(LOAD_TIME_POOL_VARIABLES, "1")
    assert seen.get("blas", 1) == 1
    assert all(os.environ.get(name) is None for name in LOAD_TIME_POOL_VARIABLES)  # the driver's own, restored

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the usual single knob: the user's choice wins for every pool
    with load_time_pools_sized(1):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            seen = pool.submit(_blas_threads).result()
    assert {k: seen[k] for k in LOAD_TIME_POOL_VARIABLES} == {
        "OPENBLAS_NUM_THREADS": None, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": None}
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ.get("OPENBLAS_NUM_THREADS") is None


def test_the_tokenizer_pool_in_a_sized_worker_uses_that_many_threads(monkeypatch):
    """The variable is read by the encoder's pool when it starts: a sized worker encodes on 1 thread."""
    for name in THREAD_POOL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # another library may have turned it off in this process
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=size_thread_pools, initargs=(1,)) as pool:
        assert pool.submit(_encoder_threads).result() == 1


def _encoder_threads() -> int:
    """Threads the process gains when ``encode_batch`` starts its pool (the pool's size)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"a": 0, "[U]": 1}, unk_token="[U]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    before = len(os.listdir("/proc/self/task"))
    tk.encode_batch(["a a a"] * 2000)
    return len(os.listdir("/proc/self/task")) - before


def test_importing_open_clip_leaves_the_tokenizer_parallelism_alone():
    """open_clip sets TOKENIZERS_PARALLELISM=false on import; curate's import puts it back (unset here)."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    code = "import os; {}; print(os.environ.get('TOKENIZERS_PARALLELISM'))"
    plain = subprocess.run([sys.executable, "-c", code.format("import open_clip")], env=env, capture_output=True,
                           text=True, check=True).stdout.split()[-1]
    ours = subprocess.run([sys.executable, "-c", code.format("from filters.clip_model import import_open_clip; "
                                                             "import_open_clip()")],
                          env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    assert plain == "false"  # what the library does on its own
    assert ours == "None"

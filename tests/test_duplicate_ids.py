"""The duplicate-id count reads shards' sorted hash files in bounded ranges (``runner.duplicate_ids``)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from curate.rundir import RunDir
from curate.runner import _save_ids, duplicate_ids


def _reference(parts: list[np.ndarray]) -> dict[str, int]:
    _, counts = np.unique(np.concatenate(parts), return_counts=True)
    repeated = counts[counts > 1]
    return {"rows": int((repeated - 1).sum()), "ids": int(len(repeated))}


def _shards(rng: np.random.Generator, n_shards: int, rows: int) -> list[np.ndarray]:
    shared = rng.integers(0, 1 << 64, 300, dtype=np.uint64, endpoint=False)  # ids that recur across shards
    edges = np.array([0, (1 << 64) - 1, 1 << 63, (1 << 63) - 1], np.uint64)  # the ends of the hash space
    parts = []
    for s in range(n_shards):
        own = rng.integers(0, 1 << 64, rows, dtype=np.uint64, endpoint=False)
        part = np.concatenate([own, rng.choice(shared, 50), own[: rows // 20], edges[s % 4:s % 4 + 2]])
        if s == 3:
            part = np.concatenate([part, np.full(5000, shared[0], np.uint64)])  # one hot id
        rng.shuffle(part)
        parts.append(part)
    return parts


@pytest.mark.parametrize("budget", [50, 1000, 1 << 24])
def test_counts_equal_a_sort_of_everything(tmp_path, budget):
    rd = RunDir(tmp_path)
    rd.stats.mkdir(parents=True, exist_ok=True)
    parts = _shards(np.random.default_rng(budget), 9, 2000)
    for i, part in enumerate(parts):
        _save_ids(rd, f"p0-{i:05d}", [part[: len(part) // 2], part[len(part) // 2:]])
    assert duplicate_ids(rd, budget=budget) == _reference(parts)


def test_files_written_unsorted_by_an_older_version_still_count(tmp_path):
    rd = RunDir(tmp_path)
    rd.stats.mkdir(parents=True, exist_ok=True)
    parts = _shards(np.random.default_rng(5), 5, 1000)
    for i, part in enumerate(parts):
        np.save(rd.stats / f"ids-p0-{i:05d}.npy", part)  # as saved before: in row order
    assert duplicate_ids(rd, budget=500) == _reference(parts)
    assert duplicate_ids(RunDir(tmp_path / "empty")) == {"rows": 0, "ids": 0}


def test_memory_is_bounded_by_the_budget_not_the_corpus(tmp_path):
    rd = RunDir(tmp_path)
    rd.stats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 1 << 62, 250_000, dtype=np.uint64) for _ in range(16)]  # 32 MB of hashes
    parts[0][:1000] = parts[1][:1000]
    for i, part in enumerate(parts):
        _save_ids(rd, f"p0-{i:05d}", [part])
    tracemalloc.start()
    try:
        got = duplicate_ids(rd, budget=100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == _reference(parts)
    assert peak < 8 << 20, peak  # a few ranges of 100,000 hashes and one file's order check, not 32 MB


def test_more_shards_than_the_open_file_limit(tmp_path):
    """No file stays open while the shards' hash files are read (runs with thousands of shards)."""
    import os
    import resource

    rd = RunDir(tmp_path)
    rd.stats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    parts = [rng.integers(0, 1000, 20, dtype=np.uint64) for _ in range(300)]
    for i, part in enumerate(parts):
        _save_ids(rd, f"p0-{i:05d}", [part])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    try:
        got = duplicate_ids(rd, budget=1000)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert got == _reference(parts)


def test_doc_hashes_are_keyed_blake2b_of_each_id():
    """Per-document hashes (duplicate-id counts, per-document draws) are blake2b-64 of the id's UTF-8,
    keyed by (seed, stage), read little-endian: pinned so a faster version cannot change a decision."""
    import hashlib

    import numpy as np

    from curate.seeds import digest, doc_hashes

    ids = [f"doc-{i}" for i in range(300)] + ["", "é—x" * 40, "a\x00b"]
    key = digest(11, "ids")
    want = [int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8, key=key).digest(), "little") for d in ids]
    got = doc_hashes(11, "ids", ids)
    assert got.dtype == np.uint64 and got.tolist() == want
    assert doc_hashes(11, "ids", []).tolist() == [] and doc_hashes(12, "ids", ids[:1])[0] != got[0]

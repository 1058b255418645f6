"""pack: tokens conserved, rows within seq_len, offsets reconstruct documents, decomposition sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.stages.tokenize import id_lists


def _pack(tmp_path, docs: list[list[int]], **params):
    cls = get_stage("pack")
    stage = cls(cls.Params(**params))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(tmp_path))
    batch = pa.RecordBatch.from_pydict({"id": [f"d{i}" for i in range(len(docs))], "input_ids": id_lists(docs)})
    third = max(1, len(docs) // 3)
    batches = [batch.slice(0, third), batch.slice(third, third), batch.slice(2 * third)]
    out = list(stage.run(iter(batches), ctx))
    return (pa.Table.from_batches(out).to_pylist() if out else []), ctx


def _documents_back(rows) -> dict[str, list[int]]:
    """Rebuild each document from the rows' doc_offsets and lineage (pieces joined in order)."""
    docs: dict[str, list[int]] = {}
    for row in rows:
        offs = row["doc_offsets"]
        assert offs[0] == 0 and offs[-1] == row["n_tokens"] == len(row["input_ids"])
        assert all(a < b for a, b in zip(offs, offs[1:]))
        segments = [row["input_ids"][a:b] for a, b in zip(offs, offs[1:])]
        assert len(segments) == len(row["lineage"])
        for doc_id, seg in zip(row["lineage"], segments):
            docs.setdefault(doc_id, []).extend(seg)
    return docs


doc_lists = st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=400), min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(docs=doc_lists, seq_len=st.integers(16, 500), strategy=st.sampled_from(["best_fit", "concat_chunk"]))
def test_packing_conserves_tokens_and_offsets_rebuild_documents(tmp_path_factory, docs, seq_len, strategy):
    rows, _ = _pack(tmp_path_factory.mktemp("p"), docs, seq_len=seq_len, strategy=strategy, buffer_tokens=3 * seq_len)
    assert all(r["n_tokens"] <= seq_len for r in rows)
    assert Counter(t for r in rows for t in r["input_ids"]) == Counter(t for d in docs for t in d)
    assert _documents_back(rows) == {f"d{i}": d for i, d in enumerate(docs)}
    assert all(len(r["loss_mask"]) == r["n_tokens"] and set(r["loss_mask"]) <= {1} for r in rows)
    if strategy == "best_fit":  # a document is split only when longer than a row
        for i, d in enumerate(docs):
            pieces = sum(f"d{i}" in r["lineage"] for r in rows)
            assert pieces == max(1, -(-len(d) // seq_len))
    else:  # concat-and-chunk: every row but the last is full
        assert all(r["n_tokens"] == seq_len for r in rows[:-1])


@settings(max_examples=100, deadline=None)
@given(docs=doc_lists, plus_one=st.booleans(), randomize=st.booleans())
def test_decompose_rows_come_from_one_document_with_power_of_two_lengths(tmp_path_factory, docs, plus_one, randomize):
    rows, ctx = _pack(tmp_path_factory.mktemp("d"), docs, strategy="decompose", min_log2=2, max_log2=6,
                      plus_one=plus_one, randomize=randomize)
    extra = 1 if plus_one else 0
    for r in rows:
        assert len(r["lineage"]) == 1 and r["doc_offsets"] == [0, r["n_tokens"]]
        assert r["n_tokens"] == (1 << r["bucket"]) + extra and 2 <= r["bucket"] <= 6
    back = _documents_back(rows)
    dropped = 0
    for i, d in enumerate(docs):
        got = back.get(f"d{i}", [])
        assert d[: len(got)] == got  # pieces are consecutive, largest first from the start
        rest = len(d) - len(got)
        assert rest < (1 << 2) + extra or rest <= extra  # only a remainder below the smallest bucket is dropped
        dropped += rest
        sizes = [r["bucket"] for r in rows if r["lineage"] == [f"d{i}"]]
        if not randomize:
            assert sizes == sorted(sizes, reverse=True)
    metric = ctx.stats["pack"].metrics.get("tokens_dropped")
    assert (metric.total if metric else 0) == dropped


def test_best_fit_fill_rate_on_a_realistic_length_distribution(tmp_path):
    """Log-normal document lengths (median ~600 tokens, long tail) fill 4K rows ≥ 99%."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.4, 1.2, 3000).astype(int), 1, 20000)
    docs = [list(range(n)) for n in lengths]
    rows, _ = _pack(tmp_path, docs, seq_len=4096)
    fill = sum(r["n_tokens"] for r in rows) / (len(rows) * 4096)
    assert fill >= 0.99, fill


def test_repeat_upsamples_long_units(tmp_path):
    rows, _ = _pack(tmp_path, [[1] * 10, [2] * 100], seq_len=64, repeat=[{"min_tokens": 50, "times": 3}])
    counts = Counter(t for r in rows for t in r["input_ids"])
    assert counts == {1: 10, 2: 300}


def test_units_with_loss_masks_and_offsets_stay_whole(tmp_path):
    """A UtK-style unit (its own loss mask and one attention unit) is packed as given."""
    cls = get_stage("pack")
    stage = cls(cls.Params(seq_len=20))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(tmp_path))
    batch = pa.RecordBatch.from_pydict({
        "id": ["w0", "w1"], "input_ids": id_lists([[1, 2, 3, 4, 5, 6], [7, 8, 9]]),
        "loss_mask": pa.array([[1, 0, 1, 1, 0, 1], [1, 1, 0]], pa.list_(pa.uint8())),
        "doc_offsets": pa.array([[0, 6], [0, 2, 3]], pa.list_(pa.int32())),
        "lineage": pa.array([["a", "b"], ["c", "d"]], pa.list_(pa.string())),
    })
    row = next(stage.run(iter([batch]), ctx)).to_pylist()[0]
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert row["loss_mask"] == [1, 0, 1, 1, 0, 1, 1, 1, 0]
    assert row["doc_offsets"] == [0, 6, 8, 9]
    assert row["lineage"] == ["a", "b", "c", "d"]


def test_unknown_strategy_is_a_config_error():
    from curate.errors import ConfigError
    from curate.manifest import loads

    with pytest.raises(ConfigError, match="stages\\[0\\] \\(pack\\).strategy"):
        loads("name: x\nsource: {kind: stdlib_docs}\nstages:\n  - pack: {strategy: tetris}\nsink: {kind: parquet}\n", "m.yaml")

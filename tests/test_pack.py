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


def _pack(tmp_path, docs: list[list[int]], seed: int = 0, batches: int = 3, **params):
    cls = get_stage("pack")
    stage = cls(cls.Params(**params))
    ctx = RunContext(seed, Shard("00000", "k", "mem"), RunDir(tmp_path))
    batch = pa.RecordBatch.from_pydict({"id": [f"d{i}" for i in range(len(docs))], "input_ids": id_lists(docs)})
    step = max(1, -(-len(docs) // batches))
    batches = [batch.slice(a, step) for a in range(0, len(docs), step)]
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
    for r in rows:  # every token a target but the first of each document piece (never across documents)
        starts = set(r["doc_offsets"][:-1])
        assert len(r["loss_mask"]) == r["n_tokens"]
        assert r["loss_mask"] == [0 if t in starts else 1 for t in range(r["n_tokens"])]
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
                      plus_one=plus_one, randomize=randomize, shuffle=False)  # stream order: pieces in order
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


@pytest.mark.parametrize("pool", [{}, {"shuffle_pool": 3, "shuffle_rows": 2}])
def test_decompose_shuffles_each_bucket_the_same_way_every_time(tmp_path, pool):
    """Buckets leave shuffled (whole-shard pools, or small rolling pools), every row kept, bytes repeatable."""
    rng = np.random.default_rng(3)
    docs = [list(range(10_000 * i, 10_000 * i + n)) for i, n in enumerate(rng.integers(5, 300, 60))]
    params = {"strategy": "decompose", "min_log2": 2, "max_log2": 6, **pool}
    plain, _ = _pack(tmp_path / "a", docs, shuffle=False, **params)
    rows, _ = _pack(tmp_path / "b", docs, **params)
    again, _ = _pack(tmp_path / "c", docs, batches=1, **params)  # other batching, same shard: same bytes
    other, _ = _pack(tmp_path / "d", docs, seed=1, **params)
    assert rows == again
    key = lambda r: (r["bucket"], tuple(r["input_ids"]))  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, plain))  # all rows kept, none repeated
    assert len(set(map(key, rows))) == len(rows)
    for k in {r["bucket"] for r in plain}:
        before = [r["input_ids"] for r in plain if r["bucket"] == k]
        after = [r["input_ids"] for r in rows if r["bucket"] == k]
        if len(before) >= 8:
            assert after != before  # shuffled within the bucket
            assert after != [r["input_ids"] for r in other if r["bucket"] == k]  # by the run seed
    assert [r["id"] for r in rows] == [r["id"] for r in plain]  # row ids still number the output in order


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
    # the units' own masks, but never a target at a document start (row start, 6: w1's first token)
    assert row["loss_mask"] == [0, 0, 1, 1, 0, 1, 0, 1, 0]
    assert row["doc_offsets"] == [0, 6, 8, 9]
    assert row["lineage"] == ["a", "b", "c", "d"]


def test_unknown_strategy_is_a_config_error():
    from curate.errors import ConfigError
    from curate.manifest import loads

    with pytest.raises(ConfigError, match="stages\\[0\\] \\(pack\\).strategy"):
        loads("name: x\nsource: {kind: stdlib_docs}\nstages:\n  - pack: {strategy: tetris}\nsink: {kind: parquet}\n", "m.yaml")


def test_decompose_output_is_byte_identical_across_reruns_and_worker_counts(tmp_path, corpus):
    """The shuffle pools belong to input shards and are seeded from the run seed: workers change nothing."""
    import hashlib

    from tests.conftest import cli, write_manifest

    m = write_manifest(tmp_path / "m.yaml", f"""
        name: dd
        seed: 3
        source: {{kind: jsonl, paths: ["{corpus}/*.jsonl"], text_field: text, id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - tokenize: {{append_eos: true}}
          - pack: {{strategy: decompose, min_log2: 3, max_log2: 6}}
        sink: {{kind: parquet, partition_by: bucket}}
        """)

    def digests(run):
        files = sorted(run.glob("parquet/*/*.parquet"))
        assert len({f.parent.name for f in files}) >= 3
        return {f"{f.parent.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    cli("run", str(m), "-o", str(tmp_path / "one"), "-w", "1", "--no-progress")
    cli("run", str(m), "-o", str(tmp_path / "two"), "-w", "2", "--no-progress")
    assert digests(tmp_path / "one") == digests(tmp_path / "two")


def test_best_fit_keeps_a_bounded_number_of_rows_open(tmp_path):
    """Units a little short of fill_target (UtK windows) never fill a row; rows must still leave as the
    input streams, not all at the end of the shard (memory would grow with the shard)."""
    seq_len, n = 1000, 400
    docs = [[7] * 970 for _ in range(n)]  # 97% full: below fill_target 0.99, and no two fit together
    cls = get_stage("pack")
    stage = cls(cls.Params(seq_len=seq_len, buffer_tokens=8 * seq_len))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(tmp_path))
    batch = pa.RecordBatch.from_pydict({"id": [f"d{i}" for i in range(n)], "input_ids": id_lists(docs)})
    consumed = []

    def batches():
        for a in range(0, n, 10):
            consumed.append(a)
            yield batch.slice(a, 10)

    out, held = [], []
    for b in stage.run(batches(), ctx):
        out.append(b)
        held.append(len(consumed) * 10 - sum(x.num_rows for x in out))  # rows read but not yet out
    rows = pa.Table.from_batches(out).to_pylist()
    assert len(rows) == n and sorted(r["lineage"][0] for r in rows) == sorted(f"d{i}" for i in range(n))
    # read-ahead batch (10) + buffer (~9 units) + open rows (8) + the stage's 64-row output batches
    assert len(out) > 1 and max(held[:-1]) <= 10 + 9 + 8 + 64, held


def test_rows_left_open_do_not_pin_their_input_batches(tmp_path):
    """A unit is a view of its batch's token array; a row left open across buffers must hold its own
    copy, or each open row keeps a whole input batch alive and memory grows with the shard."""
    import tracemalloc

    seq_len, per_batch = 4096, 50
    cls = get_stage("pack")
    stage = cls(cls.Params(seq_len=seq_len, buffer_tokens=16 * seq_len))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(tmp_path))

    def batches(n: int):
        """Full-length units (rows at once) and one unit per batch that no other unit fits beside and
        that is emptier than every row open before it: the rows left open come from the newest batches."""
        for b in range(n):
            sizes = np.full(per_batch, seq_len)
            sizes[b % per_batch] = 3000 - 10 * b
            values = np.full(int(sizes.sum()), b, np.int32)  # numpy-owned (traced), wrapped by Arrow as is
            offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
            ids = pa.array([f"b{b}-{i}" for i in range(per_batch)])
            yield pa.RecordBatch.from_arrays([ids, pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))],
                                             ["id", "input_ids"])

    def peak_while_packing(n: int) -> tuple[int, int]:
        tracemalloc.start()
        try:
            base, peak, tokens = tracemalloc.get_traced_memory()[0], 0, 0
            for out in stage.run(batches(n), ctx):
                tokens += int(out.column("n_tokens").to_numpy().sum())
                peak = max(peak, tracemalloc.get_traced_memory()[0] - base)
        finally:
            tracemalloc.stop()
        return peak, tokens

    peak_while_packing(3)  # warm up: first-use imports and caches are not what is measured
    short, _ = peak_while_packing(4)
    long, tokens = peak_while_packing(60)
    batch_bytes = per_batch * seq_len * 4
    assert tokens > 0.9 * 60 * per_batch * seq_len
    # 8x the input, same memory: a few batches in flight (reader, buffer, output), not one per open row
    assert long < short + 2 * batch_bytes, (short, long, batch_bytes)

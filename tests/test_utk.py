"""UtK chunk-shuffle: property tests (hypothesis) of the invariants the reference implies."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.stages.tokenize import id_lists
from synthesizers.utk import D_CLOSE, D_OPEN, FIXED_KNOTS, S_CLOSE, S_OPEN, S_SEP, knot_pair
from tests.helpers_tokenizer import prepare_tokenizer

ALL_SPECIALS = [k for b in range(1, 6) for k in knot_pair(b)] + list(FIXED_KNOTS) + [D_OPEN, D_CLOSE, S_OPEN,
                                                                                      S_SEP, S_CLOSE]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("utk")
    prepare_tokenizer(root, ALL_SPECIALS)
    rd = RunDir(root)
    rd.create()
    return rd


def _run(rd: RunDir, docs: list[list[int]], seed: int = 0, **params):
    cls = get_stage("utk")
    stage = cls(cls.Params(**params))
    ctx = RunContext(seed, Shard("00000", "k", "mem"), rd)
    stage.setup(ctx)
    batch = pa.RecordBatch.from_pydict({"id": [f"doc{i}" for i in range(len(docs))], "input_ids": id_lists(docs)})
    half = len(docs) // 2  # two batches: windows must not depend on batching
    out = list(stage.run(iter([batch.slice(0, half), batch.slice(half)]), ctx))
    return stage, (pa.Table.from_batches(out).to_pylist() if out else [])


def _parse(stage, row: dict) -> dict:
    """Recover the structure of one output row from token identities alone."""
    sp = stage.sp
    knot_ids = {i for t, i in sp.items() if "knot" in t}
    tokens = row["input_ids"]
    parsed = {"bodies": {}, "ids": {}, "trailers": {}, "is_knot": [False] * len(tokens),
              "in_d": [False] * len(tokens), "order": []}
    for chunk in row["utk_chunks"]:
        doc, part, a, b = chunk["doc"], chunk["part"], chunk["start"], chunk["end"]
        parsed["order"].append((doc, part))
        seg = tokens[a:b]
        i = 0
        if D_OPEN in sp and seg and seg[0] == sp[D_OPEN]:
            j = seg.index(sp[D_CLOSE])
            parsed["ids"][(doc, part)] = seg[1:j]
            for k in range(a, a + j + 1):
                parsed["in_d"][k] = True
            i = j + 1
        end = len(seg)
        if S_OPEN in sp and sp[S_OPEN] in seg[i:]:
            s = seg.index(sp[S_OPEN], i)
            trailer = seg[s + 1:-1]
            assert seg[-1] == sp[S_CLOSE]
            ids, cur = [], []
            for t in trailer:
                if t == sp[S_SEP]:
                    ids.append(cur)
                    cur = []
                else:
                    cur.append(t)
            ids.append(cur)
            parsed["trailers"][doc] = ids
            end = s
        body = seg[i:end]
        if stage.params.split == "fixed":  # numbered knots: <open> digits <close>
            heads = (sp[FIXED_KNOTS[0]], sp[FIXED_KNOTS[1]])
            tails = (sp[FIXED_KNOTS[2]], sp[FIXED_KNOTS[3]])
            lo, hi = 0, len(body)
            if body and body[0] == heads[0]:
                lo = body.index(heads[1]) + 1
            if tails[0] in body:
                hi = body.index(tails[0])
                assert body[-1] == tails[1]
            for k in list(range(a + i, a + i + lo)) + list(range(a + i + hi, a + i + len(body))):
                parsed["is_knot"][k] = True
            body = body[lo:hi]
        else:
            for k, t in enumerate(seg[i:end]):
                if t in knot_ids:
                    parsed["is_knot"][a + i + k] = True
            body = [t for t in body if t not in knot_ids]
        parsed["bodies"][(doc, part)] = body
    return parsed


docs_strategy = st.lists(st.lists(st.integers(0, 250), min_size=1, max_size=300), min_size=1, max_size=12)
params_strategy = st.fixed_dictionaries({
    "seq_len": st.integers(120, 700),
    "chunks": st.lists(st.integers(1, 4), min_size=1, max_size=3),
    "augment_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "split": st.sampled_from(["random", "equal", "fixed"]),
    "span": st.integers(5, 60),
    "preserve_order": st.booleans(),
    "backtrace": st.booleans(),
})
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(docs=docs_strategy, params=params_strategy, seed=st.integers(0, 2**31))
def test_utk_invariants(run_dir, docs, params, seed):
    stage, rows = _run(run_dir, docs, seed, **params)
    seen: dict[str, list[int]] = {}
    for row in rows:
        tokens = row["input_ids"]
        assert len(tokens) <= params["seq_len"] and row["n_tokens"] == len(tokens)
        assert len(row["loss_mask"]) == len(tokens)
        parsed = _parse(stage, row)
        # every document (or piece) reassembles exactly from its chunk bodies, in part order
        for d, doc_id in enumerate(row["lineage"]):
            parts = sorted(p for (dd, p) in parsed["bodies"] if dd == d)
            assert parts == list(range(len(parts)))
            seen[doc_id] = [t for p in parts for t in parsed["bodies"][(d, p)]]
            order = [p for (dd, p) in parsed["order"] if dd == d]
            if params["preserve_order"]:
                assert order == sorted(order)
            # backtrace: the trailer lists the chunk ids in original order
            if params["backtrace"] and len(parts) > 1:
                assert parsed["trailers"][d] == [parsed["ids"][(d, p)] for p in parts]
                last_pos = max(k for k, (dd, _) in enumerate(parsed["order"]) if dd == d)
                assert row["utk_chunks"][last_pos]["end"] > row["utk_chunks"][last_pos]["start"]
        # the last chunk of the last document stays at the end
        last_doc = len(row["lineage"]) - 1
        assert parsed["order"][-1] == (last_doc, max(p for (dd, p) in parsed["order"] if dd == last_doc))
        # the loss mask: exactly knots, <D> … </D> inputs, label <D>/<S>, input </S>
        sp = stage.sp
        expect = []
        for t in range(len(tokens)):
            masked = parsed["is_knot"][t] or tokens[t] in (sp.get(D_OPEN), sp.get(S_OPEN))
            if t > 0:
                masked = masked or parsed["is_knot"][t - 1] or parsed["in_d"][t - 1] or tokens[t - 1] == sp.get(S_CLOSE)
            expect.append(0 if masked else 1)
        assert row["loss_mask"] == expect
        # a window with chunks from several documents is one attention unit
        if len(parsed["order"]) > len(row["lineage"]):
            assert row["doc_offsets"] == [0, len(tokens)]
    # the multiset (indeed the sequence) of every document's tokens is preserved
    rebuilt: dict[str, list[int]] = {}
    for doc_id, toks in seen.items():
        rebuilt.setdefault(doc_id.split("#")[0], []).extend(toks)
    assert rebuilt == {f"doc{i}": d for i, d in enumerate(docs)}
    assert Counter(t for d in docs for t in d) == Counter(t for v in rebuilt.values() for t in v)


def test_same_seed_same_bytes_other_seed_other_shuffle(run_dir):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 250, rng.integers(30, 200)).tolist() for _ in range(40)]
    params = {"seq_len": 1024, "augment_fraction": 1.0}
    stage, a = _run(run_dir, docs, 1, **params)
    _, b = _run(run_dir, docs, 1, **params)
    backtraces = sum(r["input_ids"].count(stage.sp[S_OPEN]) for r in a)
    assert backtraces >= 30  # most documents were split, each with its <S> … </S> target
    _, c = _run(run_dir, docs, 2, **params)
    assert a == b
    assert [r["input_ids"] for r in a] != [r["input_ids"] for r in c]


def test_scrambled_order_happens_when_asked(run_dir):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 250, 150).tolist() for _ in range(30)]
    stage, rows = _run(run_dir, docs, 3, seq_len=2048, augment_fraction=1.0, chunks=[3], preserve_order=False)
    out_of_order = 0
    for row in rows:
        order = _parse(stage, row)["order"]
        for d in range(len(row["lineage"])):
            parts = [p for (dd, p) in order if dd == d]
            out_of_order += parts != sorted(parts)
    assert out_of_order > 0


def test_augment_fraction_is_respected(run_dir):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 250, rng.integers(20, 60)).tolist() for _ in range(2000)]
    stage, rows = _run(run_dir, docs, 5, seq_len=200, augment_fraction=0.8, chunks=[2, 3])
    augmented = sum(len(r["utk_chunks"]) > len(r["lineage"]) for r in rows)
    assert 0.72 < augmented / len(rows) < 0.88, augmented / len(rows)

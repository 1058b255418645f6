"""mix: token shares per domain hit their targets, deterministically, with counted drops."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.stage import ShardPartial


def _batches(n_per_domain: dict[str, int], tokens: dict[str, int]):
    rows = [(f"{d}-{i}", d, tokens[d]) for d, n in n_per_domain.items() for i in range(n)]
    np.random.default_rng(0).shuffle(rows)
    table = pa.table({"id": [r[0] for r in rows], "meta": [json.dumps({"domain": r[1]}) for r in rows],
                      "n_tokens": pa.array([r[2] for r in rows], pa.int32())})
    return table.to_batches(max_chunksize=500)


def _mix(tmp_path, batches, seed=0, **params):
    cls = get_stage("mix")
    stage = cls(cls.Params(by="meta.domain", **params))
    rd = RunDir(tmp_path)
    rd.create()
    ctx = RunContext(seed, Shard("00000", "k", "mem"), rd, phase=1)
    partial = ShardPartial()
    for b in batches:
        stage.observe(b, ctx, partial)
    state = stage.combine([partial.table()], seed)
    rd.write_json(rd.global_dir / "mix" / "state.json", state)
    out = pa.Table.from_batches(list(stage.run(iter(batches), ctx)))
    shares = Counter()
    for meta, n in zip(out.column("meta").to_pylist(), out.column("n_tokens").to_pylist()):
        shares[json.loads(meta)["domain"]] += n
    return out, shares, state, ctx


def test_shares_follow_weights_without_repeats(tmp_path):
    batches = _batches({"web": 6000, "books": 300, "code": 900, "spam": 100}, {"web": 500, "books": 20000, "code": 4000, "spam": 10})
    out, shares, state, ctx = _mix(tmp_path, batches, weights={"web": 0.4, "books": 0.3, "code": 0.3})
    total = sum(shares.values())
    for d, w in {"web": 0.4, "books": 0.3, "code": 0.3}.items():
        assert abs(shares[d] / total - w) < 0.03, (d, shares)
    assert len(set(out.column("id").to_pylist())) == out.num_rows  # nothing repeated by default
    assert max(state["rates"].values()) == pytest.approx(1.0)
    drops = ctx.stats["mix"].drops
    assert drops["domain_not_in_mix"] == 100
    assert drops["downsampled"] == 7300 - out.num_rows - 100


def test_total_tokens_upsamples_and_is_deterministic(tmp_path):
    batches = _batches({"short": 1000, "long": 10}, {"short": 100, "long": 10000})
    a, shares, state, _ = _mix(tmp_path / "a", batches, weights={"short": 0.5, "long": 0.5}, total_tokens=400_000)
    b, _, _, _ = _mix(tmp_path / "b", batches, weights={"short": 0.5, "long": 0.5}, total_tokens=400_000)
    assert a.equals(b)
    assert state["rates"]["long"] == pytest.approx(2.0)
    assert Counter(a.column("id").to_pylist())["long-3"] == 2  # every long document twice
    assert abs(shares["long"] / sum(shares.values()) - 0.5) < 0.05

"""heuristics and select: scores are right, drops are counted with reasons, top fractions are exact."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.schema import documents_batch, score_column, with_scores
from curate.stage import ShardPartial


def _ctx(tmp_path) -> RunContext:
    rd = RunDir(tmp_path / "run")
    rd.create()
    return RunContext(5, Shard("00000", "k", "mem"), rd)


def _stage(name: str, **params):
    cls = get_stage(name)
    return cls(cls.Params(**params))


def test_heuristics_scores_match_hand_counts(tmp_path):
    text = "Hello World 42!\nSecond line, here."
    batch = documents_batch(["a"], [text])
    ctx = _ctx(tmp_path)
    out = next(_stage("heuristics").run(iter([batch]), ctx))
    s = out.column("scores").to_pylist()[0]["heuristics"]
    letters = sum(c.isalpha() for c in text)
    assert s["n_chars"] == len(text) == 34
    assert s["n_words"] == 6 and s["n_lines"] == 2
    assert s["alpha_ratio"] == pytest.approx(letters / 34)
    assert s["digit_ratio"] == pytest.approx(2 / 34)
    assert s["upper_ratio"] == pytest.approx(3 / letters)
    assert s["whitespace_ratio"] == pytest.approx(5 / 34)
    assert s["punct_ratio"] == pytest.approx(3 / 34)
    assert s["mean_word_length"] == pytest.approx((34 - 5) / 6)


def test_heuristics_drops_with_reasons_and_quarantine(tmp_path):
    texts = ["one two", "a b c d e f g h", "12345 67890 11111 22222 33333 x y", "fine words in a row here"]
    batch = documents_batch([f"d{i}" for i in range(4)], texts)
    ctx = _ctx(tmp_path)
    stage = _stage("heuristics", min_words=3, max_digit_ratio=0.3, quarantine=True)
    out = list(stage.run(iter([batch]), ctx))
    assert out[0].column("id").to_pylist() == ["d1", "d3"]
    assert dict(ctx.stats["heuristics"].drops) == {"n_words_below_min": 1, "digit_ratio_above_max": 1}
    ctx.close()
    import pyarrow.parquet as pq

    q = pq.read_table(tmp_path / "run" / "quarantine" / "heuristics" / "p0-00000.parquet")
    assert q.column("id").to_pylist() == ["d0", "d2"]
    assert q.column("drop_reason").to_pylist() == ["n_words_below_min", "digit_ratio_above_max"]


def _scored(values):
    batch = documents_batch([f"d{i}" for i in range(len(values))], ["t"] * len(values))
    return with_scores(batch, "m", {"v": pa.array(values, pa.float64())})


def test_select_where_bounds_and_missing(tmp_path):
    ctx = _ctx(tmp_path)
    stage = _stage("select", where=[{"column": "scores.m.v", "min": 0.2, "max": 0.8}])
    out = list(stage.run(iter([_scored([0.1, 0.5, None, 0.9, 0.8, float("nan")])]), ctx))
    assert out[0].column("id").to_pylist() == ["d1", "d4"]
    # NaN is outside every bound, like null
    assert dict(ctx.stats["select"].drops) == {"m_v_below_min": 1, "m_v_missing": 2, "m_v_above_max": 1}


@pytest.mark.parametrize("fraction,largest", [(0.3, True), (0.5, False), (1.0, True)])
def test_select_top_fraction_is_exact_with_ties(tmp_path, fraction, largest):
    values = [float(i % 5) for i in range(100)]  # heavy ties
    stage = _stage("select", top={"column": "scores.m.v", "fraction": fraction, "largest": largest})
    assert stage.is_global
    ctx = _ctx(tmp_path)
    batches = [_scored(values[:40]), _scored(values[40:])]
    batches[1] = pa.RecordBatch.from_arrays(
        [pa.array([f"e{i}" for i in range(60)])] + batches[1].columns[1:], schema=batches[1].schema)
    partial = ShardPartial()
    for b in batches:
        stage.observe(b, ctx, partial)
    state = stage.combine([partial.table()], ctx.seed)
    ctx.run_dir.write_json(ctx.run_dir.global_dir / "select" / "state.json", state)
    kept = [v for b in stage.run(iter(batches), ctx) for v in score_column(b, "scores.m.v").to_pylist()]
    assert len(kept) == round(fraction * 100)
    rest = sorted(values)
    expect = sorted(rest[::-1][: len(kept)]) if largest else sorted(rest[: len(kept)])
    assert sorted(kept) == expect


def test_select_rerun_on_scored_output_needs_no_scoring(tmp_path):
    """Score first, select later: a new threshold runs on the stored scores alone."""
    from tests.conftest import cli, make_text, write_jsonl, write_manifest

    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": make_text(i, 10 + i)} for i in range(60)])
    scored = write_manifest(tmp_path / "score.yaml", f"""
        name: score
        source: {{kind: jsonl, paths: ["{tmp_path}/in/a.jsonl"]}}
        stages: [heuristics]
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    cli("run", str(scored), "-o", str(tmp_path / "s"), "--no-progress")
    reselect = write_manifest(tmp_path / "select.yaml", f"""
        name: reselect
        source: {{kind: parquet, paths: ["{tmp_path}/s/parquet/*.parquet"], id_field: id}}
        stages:
          - select: {{where: [{{column: scores.heuristics.n_words, min: 40}}]}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    # the parquet reader passes the stored scores through; no heuristics stage runs again
    cli("run", str(reselect), "-o", str(tmp_path / "r"), "--no-progress")
    import json

    import pyarrow.parquet as pq

    stats = json.loads((tmp_path / "r" / "stats.json").read_text())
    assert list(stats["stages"]) == ["read", "select", "sink:parquet"]
    before = pq.read_table(sorted((tmp_path / "s" / "parquet").glob("*.parquet"))).to_pylist()
    after = pq.read_table(sorted((tmp_path / "r" / "parquet").glob("*.parquet"))).to_pylist()
    expect = [r for r in before if r["scores"]["heuristics"]["n_words"] >= 40]
    assert after == expect and 0 < len(after) < len(before)


@pytest.mark.parametrize("largest", [True, False])
def test_select_top_skips_nan_and_null_and_reports_the_scores_own_cut_off(tmp_path, largest):
    values = [5.0, float("nan"), 1.0, None, 3.0, 2.0, 4.0, float("nan")]
    stage = _stage("select", top={"column": "scores.m.v", "fraction": 0.4, "largest": largest})
    ctx = _ctx(tmp_path)
    batch = _scored(values)
    partial = ShardPartial()
    stage.observe(batch, ctx, partial)
    state = stage.combine([partial.table()], ctx.seed)
    assert (state["n"], state["k"]) == (5, 2)  # NaN/null rows are not candidates
    assert state["value"] == (4.0 if largest else 2.0)  # the score itself, never the negated sort key
    ctx.run_dir.write_json(ctx.run_dir.global_dir / "select" / "state.json", state)
    kept = [v for b in stage.run(iter([batch]), ctx) for v in score_column(b, "scores.m.v").to_pylist()]
    assert sorted(kept) == ([4.0, 5.0] if largest else [1.0, 2.0])
    assert dict(ctx.stats["select"].drops) == {"m_v_missing": 3, "m_v_not_in_top": 3}

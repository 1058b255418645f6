"""long_dependency (ProLong LDS), delta_perplexity (LongWanjuan) and homologous_gap (GATEAU HMG)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.schema import documents_batch
from filters.long_dependency import lds, sample_pairs
from tests.conftest import cli, make_stage, make_text, save_tiny_lm, write_jsonl, write_manifest


def _stage(name, **params):
    return make_stage(name, **params)


def test_lds_matches_a_hand_computed_example():
    # three segments; targets 1 and 2; PPL alone 10 and 20
    pairs = [(1, 0), (2, 0), (2, 1)]
    total, strong = lds(pairs, {1: 10.0, 2: 20.0}, [5.0, 18.0, 10.0], window_segments=3, threshold=0.1)
    # DST: 0.5, 0.1 (not above the threshold), 0.5; DDI: 1/2, 2/2, 1/2
    # DSP_1 = 1 (one sampled j); DSP_2 from deltas (2, 10): p = (1, e^8) / (1 + e^8)
    p1 = 1 / (1 + math.e ** 8)
    p2 = 1 - p1
    entropy = -(p1 * math.log(p1) + p2 * math.log(p2))
    dsp2 = (math.log(2) - entropy) / math.log(2)
    assert total == pytest.approx((0.5 + 0.5) * 1 + (0.5 + 0.5) * dsp2, rel=1e-12)
    assert strong == 2
    # the distance is normalized by the window's segment count, not the document's: with a window of
    # 5 segments the same three-segment document gets DDI 1/4, 2/4, 1/4
    total5, _ = lds(pairs, {1: 10.0, 2: 20.0}, [5.0, 18.0, 10.0], window_segments=5, threshold=0.1)
    assert total5 == pytest.approx((0.5 + 0.25) * 1 + (0.5 + 0.25) * dsp2, rel=1e-12)
    # uniform deltas mean no specificity: the pair terms vanish
    assert lds([(2, 0), (2, 1)], {2: 20.0}, [10.0, 10.0], window_segments=3, threshold=0.1)[0] == \
        pytest.approx(0.0, abs=1e-12)
    # a non-finite sum is 0, as in ProLong: a NaN pair perplexity makes target 2's specificity NaN, so the
    # strong pair (2, 0) adds NaN
    assert lds([(2, 0), (2, 1)], {2: 20.0}, [10.0, math.nan], window_segments=3, threshold=0.1) == (0.0, 1)


def test_pair_sampling_is_exact_and_prolong_scores_short_documents_zero():
    gen = np.random.default_rng(1)
    assert sample_pairs(4, -1, gen) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    sampled = sample_pairs(40, 500, gen)
    assert len(set(sampled)) == 500 and all(0 <= j < i < 40 for i, j in sampled)
    assert sample_pairs(10, 500, gen) == []  # 45 pairs < 500: ProLong computes nothing


def test_lds_stage_uses_the_models_segment_perplexities(tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = make_text(3, 120)
    stage, ctx = _stage("long_dependency", model=str(tiny_lm), chunk_size=16, sample_size=-1, threshold=-1.0)
    scores = stage.score(documents_batch(["doc"], [text]), ctx)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    segs = [ids[k * 16:(k + 1) * 16] for k in range(len(ids) // 16)]
    n = len(segs)
    assert scores["n_segments"][0].as_py() == n >= 5

    def ppl(context, target):
        x = torch.tensor([context + target])
        labels = torch.tensor([[-100] * (len(context) + 1) + target[1:]])  # the tokens after the first
        with torch.no_grad():
            return math.exp(model(x, labels=labels).loss.item())

    pairs = sample_pairs(n, -1, np.random.default_rng(0))
    alone = {i: ppl([], segs[i]) for i in range(1, n)}
    expected = lds(pairs, alone, [ppl(segs[j], segs[i]) for i, j in pairs], 256, threshold=-1.0)
    assert scores["lds"][0].as_py() == pytest.approx(expected[0], rel=1e-4)
    assert scores["n_pairs"][0].as_py() == len(pairs) == scores["strong_pairs"][0].as_py()


def test_lds_subsamples_segments_and_pairs_deterministically(tiny_lm):
    texts = [make_text(i, 200) for i in range(3)]
    a, ctx = _stage("long_dependency", model=str(tiny_lm), chunk_size=8, max_segments=12, sample_size=30)
    first = a.score(documents_batch(["x", "y", "z"], texts), ctx)
    again = a.score(documents_batch(["x", "y", "z"], texts), ctx)
    assert first["lds"].to_pylist() == again["lds"].to_pylist()
    assert first["n_segments"].to_pylist() == [12, 12, 12] and first["n_pairs"].to_pylist() == [30, 30, 30]
    few, ctx = _stage("long_dependency", model=str(tiny_lm), chunk_size=8, sample_size=500)
    assert few.score(documents_batch(["x"], texts[:1]), ctx)["lds"].to_pylist() == [0.0]


def test_delta_perplexity_compares_full_and_truncated_context(tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = make_text(5, 150)
    stage, ctx = _stage("delta_perplexity", model=str(tiny_lm), window=64, tail=16, short_window=32)
    s = stage.score(documents_batch(["d", "short"], [text, "too short"]), ctx)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[k:k + 64] for k in range(0, len(ids) - 63, 64)]
    assert len(chunks) >= 2

    def tail_stats(seq):
        x = torch.tensor([seq])
        with torch.no_grad():
            logits = model(x).logits[0, :-1]
        lp = torch.log_softmax(logits, -1)
        tgt = x[0, 1:]
        nll = -lp.gather(-1, tgt[:, None])[:, 0][-16:]
        acc = (lp.argmax(-1) == tgt)[-16:]
        return nll.sum().item(), acc.sum().item()

    full = [tail_stats(c) for c in chunks]
    short = [tail_stats(c[-32:]) for c in chunks]
    count = 16 * len(chunks)
    # LongWanjuan averages the chunks' perplexities (not the chunks' NLLs)
    ppl_f = np.mean([math.exp(f[0] / 16) for f in full])
    ppl_s = np.mean([math.exp(f[0] / 16) for f in short])
    assert s["ppl_full"][0].as_py() == pytest.approx(ppl_f, rel=1e-4)
    assert s["ppl_short"][0].as_py() == pytest.approx(ppl_s, rel=1e-4)
    assert s["ppl_delta"][0].as_py() == pytest.approx(ppl_s - ppl_f, rel=1e-3)
    assert s["acc_full"][0].as_py() == pytest.approx(sum(f[1] for f in full) / count)
    assert s["comp_rate"][0].as_py() == pytest.approx(len(ids) / len(text))
    assert s["ppl_delta"][1].as_py() is None and s["comp_rate"][1].as_py() is not None


def test_homologous_gap_normalizes_over_the_dataset(tmp_path, tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    long_lm = save_tiny_lm(tmp_path / "long", seed=1, n_positions=128)
    rows = [{"id": f"r{i}", "context": make_text(i, 20 + 7 * i), "instruction": "Summarize.",
             "response": make_text(100 + i, 5 + i)} for i in range(12)]
    write_jsonl(tmp_path / "in" / "a.jsonl", rows[:6])
    write_jsonl(tmp_path / "in" / "b.jsonl", rows[6:])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: hmg
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id, text_field: context}}
        stages:
          - homologous_gap: {{short_model: {tiny_lm}, long_model: {long_lm}, context_column: text}}
          - select: {{top: {{column: scores.homologous_gap.hmg, fraction: 0.25}}}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 2}}
        """)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress")
    table = pa.concat_tables(pq.read_table(f) for f in sorted((run / "parquet").glob("*.parquet")))
    assert table.num_rows == 3

    def response_ppl(folder, row):
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        # one tokenization of the whole text, left-truncated; the response's tokens found by offsets
        head = f"Context:\n{row['context']}\n\nInstruction: {row['instruction']}\n\nResponse: "
        enc = tok(head + row["response"], return_offsets_mapping=True)
        seq = enc["input_ids"][-model.config.n_positions:]
        ends = [end for _, end in enc["offset_mapping"]][-model.config.n_positions:]
        labels = [t if end > len(head) else -100 for t, end in zip(seq, ends)]
        with torch.no_grad():
            return math.exp(model(torch.tensor([seq]), labels=torch.tensor([labels])).loss.item())

    short = np.array([response_ppl(tiny_lm, r) for r in rows])
    long = np.array([response_ppl(long_lm, r) for r in rows])
    gap = (short - short.min()) / (short.max() - short.min()) - (long - long.min()) / (long.max() - long.min())
    hmg = np.exp(gap) / np.exp(gap).sum()
    top = {rows[i]["id"] for i in np.argsort(-hmg)[:3]}
    assert set(table.column("id").to_pylist()) == top
    got = table.column("scores").combine_chunks().field("homologous_gap")
    by_id = {r["id"]: k for k, r in enumerate(rows)}
    for rid, value in zip(table.column("id").to_pylist(), got.field("hmg").to_pylist()):
        assert value == pytest.approx(hmg[by_id[rid]], rel=1e-4)
    report = json.loads((run / "stats.json").read_text())["global"]["homologous_gap"]
    assert report["rows"] == 12 and report["ppl_short"]["max"] == pytest.approx(short.max(), rel=1e-4)


def test_select_on_saved_scores_needs_no_model(tmp_path):
    lm = save_tiny_lm(tmp_path / "lm")
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": f"d{i}", "text": make_text(i, 10 + i)} for i in range(20)])
    score = write_manifest(tmp_path / "score.yaml", f"""
        name: score
        source: {{kind: jsonl, paths: ["{tmp_path}/in/a.jsonl"], id_field: id}}
        stages: [{{perplexity: {{model: {lm}}}}}]
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    cli("run", str(score), "-o", str(tmp_path / "s"), "--no-progress")
    import shutil

    shutil.rmtree(lm)  # the model is gone: selecting again must not need it
    scored = pa.concat_tables(pq.read_table(f) for f in (tmp_path / "s" / "parquet").glob("*.parquet"))
    ppl = sorted(scored.column("scores").combine_chunks().field("perplexity").field("perplexity").to_pylist())
    for cut in (ppl[4], ppl[14]):
        reselect = write_manifest(tmp_path / "select.yaml", f"""
            name: reselect
            source: {{kind: parquet, paths: ["{tmp_path}/s/parquet/*.parquet"], id_field: id}}
            stages: [{{select: {{where: [{{column: scores.perplexity.perplexity, max: {cut!r}}}]}}}}]
            sink: {{kind: parquet}}
            executor: {{kind: local, workers: 1}}
            """)
        out = tmp_path / f"sel-{cut}"
        cli("run", str(reselect), "-o", str(out), "--no-progress")
        kept = pa.concat_tables(pq.read_table(f) for f in (out / "parquet").glob("*.parquet"))
        assert kept.num_rows == sum(1 for v in ppl if v <= cut)

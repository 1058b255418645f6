"""Long-dependency scores recomputed from the published methods, and `select` with missing scores.

Each reference below is written out here from the authors' description and released code (ProLong
``prolong/run.py``, LongWanjuan ``coherence/get_en_coherence.py``, GATEAU ``select/hmg`` and
``select/rank.py``) with plain ``transformers`` calls; none of it calls the stages' own helpers. Tiny
models trained here (GPT-2, and a Llama whose tokenizer adds a BOS token) keep the file fast.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest

from curate.schema import documents_batch, score_column, with_scores
from curate.stage import ShardPartial
from tests.conftest import WORDS, make_stage, make_text

torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip("transformers", reason="the `text` extra is not installed")


def lower_text(i: int, n_words: int) -> str:
    """Lower-case pseudo-text: every word after the first is a merged "Ġword" token of the tiny BPE."""
    return " ".join(WORDS[(i + 3 * k) % len(WORDS)] for k in range(n_words))


@functools.lru_cache(maxsize=8)
def load(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return tok, model


def loss_ppl(model, ids: list[int], labels: list[int]) -> float:
    """exp of the model's own mean loss (Hugging Face shifts the labels; -100 carries no loss)."""
    with torch.no_grad():
        return math.exp(model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item())


# ------------------------------------------------------------------------------------------------ ProLong
def prolong_ppl(model, segments: list[list[int]]) -> tuple[list[float], list[list[float]]]:
    """ProLong's single and pair perplexities (every pair ``j < i``; ``inf`` where none is computed)."""
    n = len(segments)
    single = [loss_ppl(model, s, s) for s in segments]  # loss on every token after the first
    pair = [[math.inf] * n for _ in range(n)]
    for i in range(n):
        for j in range(i):
            ids = segments[j] + segments[i]
            labels = [-100] * (len(segments[j]) + 1) + segments[i][1:]
            pair[i][j] = loss_ppl(model, ids, labels)
    return single, pair


def prolong_lds(single: list[float], pair: list[list[float]], chunk_num: int, threshold: float) -> float:
    """ProLong's LDS from those perplexities; ``chunk_num = window_size // chunk_size`` scales the distance."""
    n = len(single)

    def dependency_entropy(logits):
        if len(logits) == 1:
            return 1.0
        x = np.array(logits)
        p = np.exp(x - x.max())
        p = p / p.sum()
        if 0 in p:
            p = (p + 1e-12) / np.sum(p + 1e-12)
        entropy = -np.sum(p * np.log(p))
        return float(np.clip((np.log(len(x)) - entropy) / np.log(len(x)), 0, 1))

    de = [dependency_entropy([single[i] - pair[i][j] for j in range(i)]) if i else 0.0 for i in range(n)]
    total = 0.0
    for i in range(n):
        for j in range(i):
            dst = (single[i] - pair[i][j]) / single[i]
            if dst > threshold:
                total += (dst + np.clip((i - j) / (chunk_num - 1), 0, 1)) * de[i]
    return 0.0 if np.isnan(total) else float(total)


def test_lds_equals_prolong_on_documents_shorter_and_longer_than_the_window(tiny_lm):
    from curate.seeds import rng

    tok, model = load(tiny_lm)
    size, window = 16, 6  # segments of 16 tokens, a window of 6 segments
    short_text, long_text = make_text(3, 70), make_text(4, 130)

    def segments(text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return [ids[k:k + size] for k in range(0, len(ids) - size + 1, size)]

    short, every = segments(short_text), segments(long_text)
    assert 3 <= len(short) < window < len(every)
    # ProLong keeps an order-preserving random subset of `window` segments; the stage draws it from the
    # row's derived generator, which the test reproduces to know which segments were kept
    keep = np.sort(rng(0, "long_dependency", "long").choice(len(every), window, replace=False))
    ppl_short, ppl_long = prolong_ppl(model, short), prolong_ppl(model, [every[k] for k in keep])
    for threshold in (-1.0, 0.0):
        stage, ctx = make_stage("long_dependency", model=str(tiny_lm), chunk_size=size, max_segments=window,
                                sample_size=-1, threshold=threshold)
        assert ctx.seed == 0
        got = stage.score(documents_batch(["short", "long"], [short_text, long_text]), ctx)
        # float32 losses agree to ~1e-6; the specificity (1 − normalized entropy of near-uniform deltas)
        # is a difference of close numbers that can magnify that to ~1e-4
        expected = prolong_lds(*ppl_short, window, threshold)
        assert got["lds"][0].as_py() == pytest.approx(expected, rel=1e-3, abs=1e-9)
        assert got["n_segments"][0].as_py() == len(short)
        if threshold < 0:  # every pair counts: normalizing by the document's own segment count differs
            assert expected != pytest.approx(prolong_lds(*ppl_short, len(short), threshold), rel=1e-2)
        assert got["lds"][1].as_py() == pytest.approx(prolong_lds(*ppl_long, window, threshold), rel=1e-3, abs=1e-9)
        assert got["n_segments"][1].as_py() == window and got["n_pairs"][1].as_py() == window * (window - 1) // 2


# ------------------------------------------------------------------------------------------------ LongWanjuan
def longwanjuan(model, ids: list[int], max_context: int, med_context: int, min_context: int) -> dict:
    """LongWanjuan's coherence features over ``len(ids) // max_context`` chunks (one forward per pass)."""
    chunk_num = len(ids) // max_context
    chunks = torch.tensor(ids[: chunk_num * max_context]).reshape(chunk_num, max_context)

    def tail(inputs):
        with torch.no_grad():
            logits = model(input_ids=inputs).logits[:, -min_context - 1:-1]
        labels = inputs[:, -min_context:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 reduction="none").reshape(-1, min_context).mean(-1)
        acc = (logits.argmax(-1) == labels).float().mean(-1)
        return acc.mean().item(), torch.exp(loss).mean().item()  # the mean of the chunks' perplexities

    acc_wi, ppl_wi = tail(chunks)
    acc_wo, ppl_wo = tail(chunks[:, -med_context:])
    return {"acc_wi": acc_wi, "acc_wo": acc_wo, "ppl_wi": ppl_wi, "ppl_wo": ppl_wo,
            "ppl_ratio": (ppl_wo - ppl_wi) / (ppl_wo + 1e-5), "acc_ratio": (acc_wi - acc_wo) / (acc_wi + 1e-5)}


def test_delta_perplexity_equals_longwanjuan_on_documents_shorter_and_longer_than_the_window(tiny_lm):
    tok, model = load(tiny_lm)
    texts = [make_text(5, 160), make_text(6, 45), "tiny"]  # ≥ 2 windows; one partial window; too short
    stage, ctx = make_stage("delta_perplexity", model=str(tiny_lm), window=64, tail=16, short_window=32)
    got = stage.score(documents_batch(["long", "short", "tiny"], texts), ctx)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(ids[0]) >= 128 and 32 < len(ids[1]) < 64 and len(ids[2]) <= 32

    # the long document: LongWanjuan's chunks as they are; the short one: its documented extension here,
    # the whole document as one chunk (LongWanjuan's code scores no chunk at all: every feature is -1)
    for row, chunk_ids, width in ((0, ids[0], 64), (1, ids[1], len(ids[1]))):
        ref = longwanjuan(model, chunk_ids, width, 32, 16)
        assert got["ppl_full"][row].as_py() == pytest.approx(ref["ppl_wi"], rel=1e-4)
        assert got["ppl_short"][row].as_py() == pytest.approx(ref["ppl_wo"], rel=1e-4)
        assert got["ppl_delta"][row].as_py() == pytest.approx(ref["ppl_wo"] - ref["ppl_wi"], rel=1e-3, abs=1e-6)
        assert got["ppl_ratio"][row].as_py() == pytest.approx(ref["ppl_ratio"], rel=1e-3, abs=1e-6)
        assert got["acc_full"][row].as_py() == pytest.approx(ref["acc_wi"])
        assert got["acc_short"][row].as_py() == pytest.approx(ref["acc_wo"])
        if ref["acc_wi"] > 0:
            assert got["acc_ratio"][row].as_py() == pytest.approx(ref["acc_ratio"], rel=1e-3)
        else:  # LongWanjuan divides by acc + 1e-5; here a ratio over zero accuracy is missing
            assert not got["acc_ratio"].is_valid()[row].as_py()
        assert got["comp_rate"][row].as_py() == pytest.approx(len(ids[row]) / len(texts[row]))
        assert got["dedup_rate"][row].as_py() == pytest.approx(len(set(ids[row])) / len(ids[row]))
    assert len(ids[0]) // 64 >= 2  # several chunks: the mean of their perplexities is what is compared
    # too short to compare: null (never NaN) ppl/acc scores, but the rates are still there
    for name in ("ppl_full", "ppl_short", "ppl_delta", "ppl_ratio", "acc_full", "acc_short", "acc_delta", "acc_ratio"):
        assert got[name].null_count >= 1 and got[name][2].as_py() is None
        assert not np.isnan(got[name].drop_null().to_numpy()).any()
    assert got["comp_rate"][2].as_py() is not None


# ------------------------------------------------------------------------------------------------ GATEAU
GATEAU_TEMPLATE = "### Input:{context}\n\n ### Instruction: {instruction}\n\n ### Response: {response}"


def save_tiny_llama(folder: Path, bpe, n_positions: int, seed: int) -> Path:
    """A tiny Llama whose tokenizer adds a BOS token (as Llama-2's does), saved like a checkpoint."""
    from tokenizers.processors import TemplateProcessing

    bpe.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=n_positions,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def save_long_gpt2(folder: Path, short: Path, n_positions: int, seed: int) -> Path:
    """A sibling of the tiny GPT-2 (same tokenizer) with a longer context."""
    tok = transformers.AutoTokenizer.from_pretrained(short)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def gateau_response_ppl(folder, text: str, response: str) -> float:
    """Response-only perplexity of the whole text, left-truncated to the model's window by the tokenizer.

    The response's first token is found by character offsets in the one tokenization of the text (the
    first token that ends inside the response), not by tokenizing the prompt apart.
    """
    tok, model = load(folder)
    tok.truncation_side = "left"  # as GATEAU sets it
    enc = tok(text, truncation=True, max_length=model.config.max_position_embeddings, return_offsets_mapping=True,
              return_special_tokens_mask=True)
    cut = len(text) - len(response)
    labels = [t if not special and end > cut else -100
              for t, (_, end), special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])]
    if all(x == -100 for x in labels[1:]):
        return math.nan
    return loss_ppl(model, enc["input_ids"], labels)


def gateau_hmg(short_ppl: np.ndarray, long_ppl: np.ndarray) -> np.ndarray:
    """GATEAU's rank.py: min-max normalize each list, subtract, softmax over the rows (scored rows only)."""
    def normalize(x):
        return (x - min(x)) / (max(x) - min(x))

    diff = normalize(short_ppl) - normalize(long_ppl)
    return np.exp(diff) / np.sum(np.exp(diff))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, tiny_lm):
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer.from_file(str(tiny_lm / "tokenizer.json"))  # the tiny GPT-2's BPE, given a BOS below
    return save_tiny_llama(root / "short", bpe, 64, 2), save_tiny_llama(root / "long", bpe, 128, 3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hmg_equals_gateau_with_joint_tokenization_and_left_truncation(tmp_path, tiny_lm, llama_pair, family):
    short_lm, long_lm = (tiny_lm, save_long_gpt2(tmp_path / "long", tiny_lm, 128, 1)) if family == "gpt2" \
        else llama_pair
    rows = [(make_text(i, 4 + 9 * i), "Summarize the text.", lower_text(i, 3 + 4 * i)) for i in range(7)]
    rows.append((make_text(20, 10), "Summarize the text.", lower_text(20, 150)))  # response > both windows
    rows.append((make_text(21, 10), "Say nothing.", ""))  # nothing to score
    batch = documents_batch([f"r{k}" for k in range(len(rows))], [c for c, _, _ in rows],
                            metas=[{"instruction": i, "response": r} for _, i, r in rows])
    stage, ctx = make_stage("homologous_gap", short_model=str(short_lm), long_model=str(long_lm),
                            template=GATEAU_TEMPLATE, context_column="text", batch_size=3)
    partial = ShardPartial()
    stage.observe(batch, ctx, partial)
    state = stage.combine([partial.table()], ctx.seed)
    table = state["_tables"]["scores"]

    texts = [GATEAU_TEMPLATE.format(context=c, instruction=i, response=r) for c, i, r in rows]
    short = np.array([gateau_response_ppl(short_lm, t, r) for t, (_, _, r) in zip(texts, rows)])
    long = np.array([gateau_response_ppl(long_lm, t, r) for t, (_, _, r) in zip(texts, rows)])
    scored = ~np.isnan(short)
    assert scored.tolist() == [True] * (len(rows) - 1) + [False]
    hmg = np.full(len(rows), np.nan)
    hmg[scored] = gateau_hmg(short[scored], long[scored])
    for name, expected in (("ppl_short", short), ("ppl_long", long), ("hmg", hmg)):
        values = table.column(name).to_pylist()
        assert values[-1] is None  # the empty response: null, never NaN
        assert values[:-1] == pytest.approx(expected[:-1].tolist(), rel=1e-4)
    assert state["scored"] == len(rows) - 1 and state["ppl_short"]["max"] == pytest.approx(short[scored].max(), rel=1e-4)

    # the long response is longer than both windows: the references above scored its END (the
    # tokenizer's left truncation), and the stage agrees
    tok, model = load(short_lm)
    assert len(tok(rows[-2][2], add_special_tokens=False)["input_ids"]) > 128

    # tokenizing the prompt apart splits the response's first word from its space: another perplexity
    tok, model = load(long_lm)
    text, response = texts[1], rows[1][2]
    assert len(tok(text)["input_ids"]) <= 128
    head = tok(text[: len(text) - len(response)])["input_ids"]
    apart = head + tok(response, add_special_tokens=False)["input_ids"]
    assert apart != tok(text)["input_ids"]
    assert loss_ppl(model, apart, [-100] * len(head) + apart[len(head):]) != pytest.approx(long[1], rel=1e-4)


def test_slow_tokenizer_fallback_finds_the_same_response_start(tiny_lm):
    from filters.causal_lm import CausalLM

    lm = CausalLM.shared(str(tiny_lm), "cpu")
    heads = [f"Context: {make_text(i, 8)}\n\nResponse: " for i in range(4)]
    tails = [lower_text(i, 5) for i in range(3)] + [""]
    fast = lm.encode_joined(heads, tails)
    slow = lm._joined_by_prefix(heads, [h + t for h, t in zip(heads, tails)], True)
    assert [(j.ids, j.start) for j in fast] == [(j.ids, j.start) for j in slow]
    assert fast[-1].start == len(fast[-1].ids)  # an empty response has no token


# ------------------------------------------------------------------------------------------------ select
def _ctx(tmp_path):
    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.create()
    return RunContext(5, Shard("00000", "k", "mem"), rd)


def _scored(ids, values, column="v"):
    batch = documents_batch(ids, ["t"] * len(ids))
    return with_scores(batch, "m", {column: pa.array(values, pa.float64(), from_pandas=False)})


NAN = math.nan
VALUES = [3.0, None, NAN, 1.0, 7.0, NAN, 5.0, None, 2.0, 9.0, math.inf, -math.inf, 4.0, 6.0]


def _run_select(tmp_path, values, **params):
    """The global protocol as the driver runs it (two shards), state.json written and read as JSON."""
    from curate.registry import get_stage

    cls = get_stage("select")
    stage = cls(cls.Params(**params))
    ctx = _ctx(tmp_path)
    half = len(values) // 2
    shards = [_scored([f"a{i}" for i in range(half)], values[:half]),
              _scored([f"b{i}" for i in range(len(values) - half)], values[half:])]
    partials = []
    for b in shards:
        partial = ShardPartial()
        if stage.is_global:
            stage.observe(b, ctx, partial)
        partials.append(partial.table() or pa.table({"value": pa.array([], pa.float64())}))
    state = None
    if stage.is_global:
        state = stage.combine(partials, ctx.seed)
        ctx.run_dir.write_json(ctx.run_dir.global_dir / "select" / "state.json", state)
        state = orjson.loads((ctx.run_dir.global_dir / "select" / "state.json").read_bytes())
    kept = [v for b in stage.run(iter(shards), ctx) for v in score_column(b, "scores.m.v").to_pylist()]
    return kept, dict(ctx.stats["select"].drops), state


def test_select_where_drops_nan_and_null_as_missing(tmp_path):
    kept, drops, _ = _run_select(tmp_path, VALUES, where=[{"column": "scores.m.v", "min": 2.0, "max": 8.0}])
    assert sorted(kept) == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert drops == {"m_v_missing": 4, "m_v_below_min": 2, "m_v_above_max": 2}  # 1, -inf; 9, inf


@pytest.mark.parametrize("largest", [True, False])
def test_select_top_never_keeps_or_cuts_at_a_missing_score(tmp_path, largest):
    """`largest: false` keeps the smallest; NaN/null rows are never candidates, never the cut-off."""
    kept, drops, state = _run_select(tmp_path, VALUES, top={"column": "scores.m.v", "fraction": 0.5,
                                                            "largest": largest})
    finite_or_inf = sorted(v for v in VALUES if v is not None and not math.isnan(v))
    assert state["n"] == len(finite_or_inf) == 10 and state["k"] == 5
    expected = finite_or_inf[-5:] if largest else finite_or_inf[:5]
    assert sorted(kept) == expected
    assert not any(v is None or math.isnan(v) for v in kept)
    assert drops == {"m_v_missing": 4, "m_v_not_in_top": 5}
    # the reported cut-off is the kept boundary row's own score (not the internal, negated sort key)
    assert state["value"] == (min(kept) if largest else max(kept))
    assert state["value"] in kept


@pytest.mark.parametrize("largest", [True, False])
def test_select_reports_an_infinite_cut_off_as_a_string(tmp_path, largest):
    inf = math.inf if largest else -math.inf
    values = [inf, inf, NAN, None, 1.0, 2.0, inf]
    kept, drops, state = _run_select(tmp_path, values, top={"column": "scores.m.v", "fraction": 0.5,
                                                            "largest": largest})
    assert state["k"] == 3 and state["value"] == ("inf" if largest else "-inf")
    assert kept == [inf, inf, inf]
    assert drops == {"m_v_missing": 2, "m_v_not_in_top": 2}


def test_select_top_after_where_with_missing_scores_everywhere(tmp_path):
    kept, drops, state = _run_select(tmp_path, [NAN, None, NAN], top={"column": "scores.m.v", "fraction": 0.5},
                                     where=[{"column": "scores.m.v", "min": 0.0}])
    assert kept == [] and state["value"] is None and state["n"] == 0
    assert drops == {"m_v_missing": 3}


def test_scorers_write_null_not_nan(tiny_lm):
    stage, ctx = make_stage("perplexity", model=str(tiny_lm), max_perplexity=1e9)
    batch = documents_batch(["empty", "one", "ok"], ["", "a", make_text(1, 20)])
    scores = stage.score(batch, ctx)
    assert scores["perplexity"].to_pylist()[:2] == [None, None] and scores["mean_nll"][1].as_py() is None
    assert scores["perplexity"][2].as_py() > 0
    out = list(stage.run(iter([batch]), ctx))
    assert [r for b in out for r in b.column("id").to_pylist()] == ["ok"]
    assert dict(ctx.stats["perplexity"].drops) == {"perplexity_missing": 2}
    lds, ctx = make_stage("long_dependency", model=str(tiny_lm), chunk_size=8, sample_size=-1)
    assert lds.score(documents_batch(["e"], [""]), ctx)["lds"].to_pylist() == [0.0]

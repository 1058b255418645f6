"""perplexity: a tiny GPT-2 saved and loaded back like a user's checkpoint; scores match the model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.schema import documents_batch
from tests.conftest import make_stage, make_text


def _stage(folder, **params):
    return make_stage("perplexity", model=str(folder), **params)


def test_perplexity_equals_exp_mean_nll_of_the_model(tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [make_text(i, n) for i, n in enumerate((5, 12, 20, 30))]  # all shorter than the 64-token context
    stage, ctx = _stage(tiny_lm, batch_size=3)
    scores = stage.score(documents_batch([f"d{i}" for i in range(4)], texts), ctx)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        assert scores["mean_nll"][i].as_py() == pytest.approx(loss, rel=1e-4)
        assert scores["perplexity"][i].as_py() == pytest.approx(math.exp(loss), rel=1e-4)
        assert scores["n_scored"][i].as_py() == ids.shape[1] - 1
    assert 50 < scores["perplexity"][0].as_py() < 2000  # a random model: about the vocabulary size


def test_sliding_window_scores_every_token_once(tiny_lm):
    from transformers import AutoTokenizer

    text = make_text(7, 400)  # several windows of 64 tokens
    n = len(AutoTokenizer.from_pretrained(tiny_lm)(text)["input_ids"])
    assert n > 200
    for stride in (16, 32, 63):
        stage, ctx = _stage(tiny_lm, stride=stride)
        scores = stage.score(documents_batch(["d"], [text]), ctx)
        assert scores["n_scored"][0].as_py() == n - 1
        assert np.isfinite(scores["perplexity"][0].as_py())


def test_max_perplexity_drops_with_a_reason(tiny_lm):
    stage, ctx = _stage(tiny_lm, max_perplexity=1.0)  # every document is above 1
    out = list(stage.run(iter([documents_batch(["a", "b"], [make_text(1, 10), make_text(2, 10)])]), ctx))
    assert sum(b.num_rows for b in out) == 0
    assert dict(ctx.stats["perplexity"].drops) == {"perplexity_above_max": 2}


ARPA = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.3
-0.5\tthe\t-0.2
-0.7\tcat\t-0.1
-0.6\t</s>\t0

\\2-grams:
-0.2\t<s> the
-0.3\tthe cat
-0.1\tcat </s>

\\end\\
"""


def test_kenlm_backend_is_ccnet_document_perplexity(tmp_path):
    pytest.importorskip("kenlm", reason="the `kenlm` extra is not installed")
    model = tmp_path / "tiny.arpa"
    model.write_text(ARPA)
    stage, ctx = make_stage("perplexity", model=str(model))
    assert stage.kenlm and stage.requirements() == {"kenlm": "kenlm"}
    texts = ["The cat", "The Cät\nCAT  THE", "the dog", "", "the cat!", "the cat\n\nthe cat"]
    s = stage.score(documents_batch([f"d{i}" for i in range(len(texts))], texts), ctx)
    # "<s> the cat </s>": bigrams -0.2 -0.3 -0.1. "<s> cat the </s>": backoff(<s>) + p(cat) = -1.0,
    # backoff(cat) + p(the) = -0.6, backoff(the) + p(</s>) = -0.8. "the dog": -0.2, then backoff(the)
    # + p(<unk>) = -1.2, then p(</s> | <unk>) = -0.6. "cat!" keeps its ASCII punctuation (CCNet's
    # normalization), so it is unknown like "dog". An empty line is "<s> </s>": backoff(<s>) + p(</s>)
    # = -0.9 over 1. CCNet rounds the perplexity to 0.1.
    expected = [10 ** (0.6 / 3), 10 ** ((0.6 + 2.4) / 6), 10 ** ((0.2 + 1.2 + 0.6) / 3), None,
                10 ** (2.0 / 3), 10 ** ((0.6 + 0.9 + 0.6) / 7)]
    assert s["perplexity"].to_pylist() == [None if e is None else round(e, 1) for e in expected]
    assert s["perplexity"].to_pylist() == [1.6, 3.2, 4.6, None, 4.6, 2.0]
    assert s["mean_nll"][0].as_py() == pytest.approx(0.6 / 3 * np.log(10), rel=1e-6)  # not rounded
    assert s["n_scored"].to_pylist() == [3, 6, 3, 0, 3, 7]
    assert s["perplexity"][3].as_py() is None  # null (never NaN): nothing to score
    # lines: joined — the whole text normalized first (its newline deleted: "catthe" is one unknown word),
    # then one sentence: -0.2, backoff(the) + p(<unk>) = -1.2, backoff(<unk>) + p(cat) = -0.7, -0.1
    joined, ctx = make_stage("perplexity", model=str(model), lines="joined")
    s = joined.score(documents_batch(["j"], ["The cat\nthe cat"]), ctx)
    assert s["perplexity"].to_pylist() == [round(10 ** (2.2 / 4), 1)] and s["n_scored"].to_pylist() == [4]


def test_kenlm_and_shingle_caches_load_once_per_worker_process(tmp_path):
    pytest.importorskip("kenlm", reason="the `kenlm` extra is not installed")
    pytest.importorskip("datatrove", reason="the `quality` extra is not installed")
    from curate import models

    model = tmp_path / "tiny.arpa"
    model.write_text(ARPA)
    models.clear()
    for _ in range(3):  # three shards on one worker
        make_stage("perplexity", model=str(model))
        make_stage("minhash_dedup", shingles="fast")
    assert models.LOADS == {"kenlm": 1, "fast_shingles": 1}

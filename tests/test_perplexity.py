"""perplexity: a tiny GPT-2 saved and loaded back like a user's checkpoint; scores match the model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.schema import documents_batch
from tests.conftest import make_text


def _stage(folder, **params):
    cls = get_stage("perplexity")
    stage = cls(cls.Params(model=str(folder), **params))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir("/tmp/unused"))
    stage.setup(ctx)
    return stage, ctx


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

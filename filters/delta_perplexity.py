"""``delta_perplexity``: how much a long context helps the model, LongWanjuan-style, as score columns.

The document (tokenized without special tokens, as LongWanjuan's SentencePiece ``encode``) is cut into
``window``-token chunks (the last partial one dropped); a document shorter than one window but longer
than ``short_window`` is one chunk. In each chunk the last ``tail`` tokens are scored twice: (a) with
the whole chunk before them, (b) with only the chunk's last ``short_window`` tokens as input
(``short_window − tail`` tokens of context). Per chunk ``c``: ``ppl_c = exp(mean NLL of the tail)`` and
``acc_c`` = the tail's top-1 accuracy; over the document's chunks (up to ``max_windows``), as
LongWanjuan's code aggregates them:

* ``ppl_full``, ``ppl_short`` — the mean of the per-chunk perplexities of (a), (b);
  ``ppl_delta = ppl_short − ppl_full`` and ``ppl_ratio = ppl_delta / ppl_short`` (larger: the distant
  context helps more, a "holistic" text);
* ``acc_full``, ``acc_short`` — the mean of the per-chunk accuracies; ``acc_delta``,
  ``acc_ratio = acc_delta / acc_full``;
* ``comp_rate`` (tokens per character) and ``dedup_rate`` (distinct tokens / tokens).

A value that cannot be computed (a document too short to compare, ``acc_full = 0``) is null, never
NaN. Defaults are LongWanjuan's (4096 / 1024 / 2048).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.errors import ConfigError
from curate.registry import register_stage
from filters.causal_lm import LMScorer, nullable, safe_exp

METRICS = ("ppl_full", "ppl_short", "ppl_delta", "ppl_ratio", "acc_full", "acc_short", "acc_delta", "acc_ratio",
           "comp_rate", "dedup_rate")


@register_stage("delta_perplexity")
class DeltaPerplexity(LMScorer):
    """Perplexity and accuracy of each window's tail with full vs truncated context."""

    class Params(LMScorer.Params):
        window: int = Field(4096, ge=4, description="tokens per chunk (must fit the model's context)")
        tail: int = Field(1024, ge=1, description="tokens scored at the end of each chunk")
        short_window: int = Field(2048, ge=2, description="input length of the truncated-context pass")
        max_windows: int | None = Field(None, gt=0, description="score at most this many chunks per document")
        batch_size: int = Field(4, gt=0, description="sequences per forward pass")

        @model_validator(mode="after")
        def _sizes(self):
            if not self.tail < self.short_window <= self.window:
                raise ValueError("need tail < short_window <= window")
            return self

    def score_names(self) -> list[str]:
        return list(METRICS)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if self.params.window > self.lm.context:
            raise ConfigError(f"{self.label}: window {self.params.window} is longer than the model's context "
                              f"({self.lm.context})")

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        p = self.params
        texts = batch.column(p.text_column).to_pylist()
        ids = self.lm.encode(texts, special=False)
        chunks = []  # (doc, full chunk, short input)
        for d, row in enumerate(ids):
            starts = range(0, len(row) - p.window + 1, p.window) if len(row) >= p.window else \
                ([0] if len(row) > p.short_window else [])
            for k, s in enumerate(starts):
                if p.max_windows and k >= p.max_windows:
                    break
                chunk = row[s:s + p.window]
                chunks.append((d, chunk, chunk[-p.short_window:]))
        seqs = [c[1] for c in chunks] + [c[2] for c in chunks]
        scored = self.lm.nll(seqs, p.batch_size, correct=True)
        n = len(texts)
        # per document: sums over its chunks of the per-chunk perplexity and accuracy
        sums = {k: np.zeros(n) for k in ("ppl_f", "ppl_s", "acc_f", "acc_s")}
        count = np.zeros(n)
        for c, (d, _, _) in enumerate(chunks):
            full, short = scored[c], scored[len(chunks) + c]
            sums["ppl_f"][d] += safe_exp(float(full.nll[-p.tail:].mean()))
            sums["ppl_s"][d] += safe_exp(float(short.nll[-p.tail:].mean()))
            sums["acc_f"][d] += float(full.correct[-p.tail:].mean())
            sums["acc_s"][d] += float(short.correct[-p.tail:].mean())
            count[d] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.where(count > 0, count, np.nan)
            ppl_f, ppl_s = sums["ppl_f"] / c, sums["ppl_s"] / c
            acc_f, acc_s = sums["acc_f"] / c, sums["acc_s"] / c
            chars = np.array([max(len(t), 1) for t in texts], float)
            toks = np.array([len(r) for r in ids], float)
            values = {
                "ppl_full": ppl_f, "ppl_short": ppl_s, "ppl_delta": ppl_s - ppl_f, "ppl_ratio": (ppl_s - ppl_f) / ppl_s,
                "acc_full": acc_f, "acc_short": acc_s, "acc_delta": acc_f - acc_s,
                "acc_ratio": np.where(acc_f > 0, (acc_f - acc_s) / acc_f, np.nan),
                "comp_rate": toks / chars,
                "dedup_rate": np.array([len(set(r)) / len(r) if r else np.nan for r in ids]),
            }
        return {k: nullable(values[k]) for k in METRICS}

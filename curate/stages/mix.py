"""``mix``: sample documents so each domain makes up a chosen share of the output tokens.

ProLong-style mixtures ("30% code repositories, 30% books, 3% textbooks, 37% short data") need to
know how many tokens each domain has before deciding how much of each to keep, so ``mix`` is a global
stage: the phase before it counts tokens per domain, ``combine`` turns the target ``weights`` into a
rate per domain, and each document then appears ``floor(rate)`` times plus once more with probability
``rate - floor(rate)`` (a stable hash of ``(seed, stage, id)`` decides; no ambient randomness).

``total_tokens`` sets the output size; by default it is the largest size that repeats no document
(every rate ≤ 1). Set it higher to upsample scarce domains. A domain not in ``weights`` is dropped
(``domain_not_in_mix``); a document not drawn is counted as ``downsampled``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from pydantic import Field, field_validator

from curate.arrays import numeric, strings
from curate.registry import register_stage
from curate.seeds import doc_uniform
from curate.stage import Stage, StageParams


@register_stage("mix")
class Mix(Stage):
    """Sample documents to target token shares per domain (a global step)."""

    class Params(StageParams):
        by: str = Field("source", description="the domain: `source`, or `meta.<key>` from the JSON meta")
        weights: dict[str, float] = Field(description="target share of output tokens per domain")
        total_tokens: int | None = Field(None, gt=0, description="output size (default: the most without repeats)")

        @field_validator("weights")
        @classmethod
        def _positive(cls, v: dict[str, float]) -> dict[str, float]:
            if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
                raise ValueError("weights must be non-negative with a positive sum")
            return v

    requires = ("id", "n_tokens")

    @property
    def is_global(self) -> bool:
        return True

    def _domains(self, batch: pa.RecordBatch) -> list[str | None]:
        by = self.params.by
        if not by.startswith("meta."):
            return batch.column(by).to_pylist()
        key = by[5:]
        return [(orjson.loads(m).get(key) if m else None) for m in batch.column("meta").to_pylist()]

    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        counts: dict[str, int] = {}
        for domain, n in zip(self._domains(batch), batch.column("n_tokens").to_pylist()):
            counts[str(domain)] = counts.get(str(domain), 0) + n
        partial.add(pa.table({"domain": strings(list(counts)),
                              "tokens": numeric(np.array(list(counts.values()), np.int64))}))

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        have: dict[str, int] = {}
        for t in partials:
            for d, n in zip(t.column("domain").to_pylist(), t.column("tokens").to_pylist()):
                have[d] = have.get(d, 0) + n
        total_w = sum(self.params.weights.values())
        share = {d: w / total_w for d, w in self.params.weights.items()}
        listed = [d for d in share if share[d] > 0 and have.get(d, 0) > 0]
        target = self.params.total_tokens or (min(have[d] / share[d] for d in listed) if listed else 0)
        rates = {d: (share[d] * target / have[d] if have.get(d) else 0.0) for d in share}
        return {"available": have, "rates": rates, "total_tokens": int(target)}

    def run(self, batches, ctx):
        rates: dict[str, float] = ctx.global_state(self.label)["rates"]
        stats = ctx.stats[self.label]
        for batch in batches:
            domains = [str(d) for d in self._domains(batch)]
            rate = np.array([rates.get(d, -1.0) for d in domains])
            u = doc_uniform(ctx.seed, self.label, batch.column("id").to_pylist())
            copies = np.where(rate < 0, 0, np.floor(np.maximum(rate, 0)) + (u < (rate - np.floor(rate))))
            copies = copies.astype(np.int64)
            stats.drop("domain_not_in_mix", int((rate < 0).sum()))
            stats.drop("downsampled", int(((rate >= 0) & (copies == 0)).sum()))
            if copies.any():
                yield batch.take(numeric(np.repeat(np.arange(batch.num_rows), copies)))

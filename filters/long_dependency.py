"""``long_dependency``: ProLong's long-dependency score (LDS) of each document, as a score column.

The document is tokenized without special tokens and cut into ``chunk_size``-token segments (the last
partial one dropped); above ``max_segments`` (ProLong's window of ``window_size / chunk_size``
segments) an order-preserving random subset (seeded per document) is kept, ``n`` segments in all. For
sampled pairs ``j < i`` (``sample_size`` of the ``n(n−1)/2``, all with ``-1``; a document with fewer
pairs than ``sample_size`` scores 0, as ProLong does) the scorer LM gives ``PPL(s_i)`` (the segment
alone) and ``PPL(s_i | s_j)`` (the input ``[s_j; s_i]``, loss on ``s_i``). Both are measured on the
same tokens — those of ``s_i`` after its first, which the segment alone cannot predict — so they are
comparable. Then, with ``N = max_segments``:

* dependency strength ``DST_ij = (PPL(s_i) − PPL(s_i|s_j)) / PPL(s_i)``;
* dependency distance ``DDI_ij = clip((i − j) / (N − 1), 0, 1)`` — normalized by the window's segment
  count, a constant, as ProLong's code does, so a short document gets no more credit per segment of
  distance than a long one;
* dependency specificity ``DSP_i = clip((log m_i − H(softmax_j δ_ij)) / log m_i, 0, 1)`` with
  ``δ_ij = PPL(s_i) − PPL(s_i|s_j)`` over the ``m_i`` sampled ``j`` of target ``i`` (1 when ``m_i = 1``);
* ``LDS = Σ_{DST_ij > threshold} (α·DST_ij + β·DDI_ij) · DSP_i`` (α = β = 1); a non-finite sum is 0,
  as in ProLong's code.

Scores: ``lds``, ``n_segments``, ``n_pairs`` and ``strong_pairs`` (pairs above the threshold).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import numeric
from curate.errors import ConfigError
from curate.registry import register_stage
from curate.seeds import rng
from filters.causal_lm import LMScorer, safe_exp


@register_stage("long_dependency")
class LongDependency(LMScorer):
    """ProLong long-dependency score (strength, distance, specificity over segment pairs)."""

    class Params(LMScorer.Params):
        chunk_size: int = Field(128, ge=2, description="tokens per segment")
        max_segments: int = Field(256, ge=2, description="segments kept per document (window 32768 / 128)")
        sample_size: int = Field(500, description="(i, j) pairs sampled per document; -1 for all pairs")
        threshold: float = Field(0.1, description="only pairs with dependency strength above this count")
        alpha: float = Field(1.0, description="weight of dependency strength")
        beta: float = Field(1.0, description="weight of dependency distance")
        batch_size: int = Field(16, gt=0, description="sequences per forward pass")

    def score_names(self) -> list[str]:
        return ["lds", "n_segments", "n_pairs", "strong_pairs"]

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if 2 * self.params.chunk_size > self.lm.context:
            raise ConfigError(f"{self.label}: two segments of {self.params.chunk_size} tokens do not fit the "
                              f"model's context ({self.lm.context})")

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        ids = self.lm.encode(batch.column(self.params.text_column).to_pylist(), special=False)
        doc_ids = batch.column("id").to_pylist()
        out = [self.document(row, rng(ctx.seed, self.label, doc_id)) for row, doc_id in zip(ids, doc_ids)]
        return {"lds": numeric([o[0] for o in out]), "n_segments": numeric([o[1] for o in out], np.int32),
                "n_pairs": numeric([o[2] for o in out], np.int32), "strong_pairs": numeric([o[3] for o in out], np.int32)}

    def document(self, ids: list[int], gen: np.random.Generator) -> tuple[float, int, int, int]:
        """(LDS, segments, pairs scored, pairs above the threshold) of one tokenized document."""
        p = self.params
        size = p.chunk_size
        segments = [ids[k * size:(k + 1) * size] for k in range(len(ids) // size)]
        if len(segments) > p.max_segments:
            keep = np.sort(gen.choice(len(segments), p.max_segments, replace=False))
            segments = [segments[k] for k in keep]
        n = len(segments)
        pairs = sample_pairs(n, p.sample_size, gen)
        if not pairs:
            return 0.0, n, 0, 0
        targets = sorted({i for i, _ in pairs})
        alone = self.lm.nll([segments[i] for i in targets], p.batch_size)
        ppl_alone = {i: safe_exp(float(s.nll.mean())) for i, s in zip(targets, alone)}
        joined = self.lm.nll([segments[j] + segments[i] for i, j in pairs], p.batch_size)
        ppl_pair = [safe_exp(float(s.nll[size:].mean())) for s in joined]
        total, strong = lds(pairs, ppl_alone, ppl_pair, p.max_segments, p.threshold, p.alpha, p.beta)
        return total, n, len(pairs), strong


def sample_pairs(n: int, sample_size: int, gen: np.random.Generator) -> list[tuple[int, int]]:
    """All ``(i, j)`` with ``j < i < n``, or ``sample_size`` of them without replacement (none if fewer)."""
    total = n * (n - 1) // 2
    if total == 0 or (sample_size != -1 and total < sample_size):
        return []
    flat = np.arange(total) if sample_size == -1 else np.sort(gen.choice(total, sample_size, replace=False))
    # pair number k ↔ (i, j): i is the largest with i(i−1)/2 ≤ k
    i = np.floor((1 + np.sqrt(1 + 8 * flat)) / 2).astype(np.int64)
    i -= (i * (i - 1) // 2 > flat)
    j = flat - i * (i - 1) // 2
    return list(zip(i.tolist(), j.tolist()))


def lds(pairs, ppl_alone: dict[int, float], ppl_pair: list[float], window_segments: int, threshold: float,
        alpha: float = 1.0, beta: float = 1.0) -> tuple[float, int]:
    """(LDS, pairs above the threshold) from segment perplexities alone and given each sampled earlier segment.

    ``window_segments`` is the constant that normalizes the distance (``max_segments``: ProLong's
    ``window_size // chunk_size``), not the document's own segment count. A non-finite LDS is 0.
    """
    delta: dict[int, list[float]] = {}
    for (i, _), p_ij in zip(pairs, ppl_pair):
        delta.setdefault(i, []).append(ppl_alone[i] - p_ij)
    specificity = {i: _specificity(np.array(d)) for i, d in delta.items()}
    scale = 1.0 / (window_segments - 1)
    total, strong = 0.0, 0
    for (i, j), p_ij in zip(pairs, ppl_pair):
        strength = (ppl_alone[i] - p_ij) / ppl_alone[i] if ppl_alone[i] else math.nan
        if not strength > threshold:  # a NaN strength never counts (a comparison with NaN is false)
            continue
        distance = min(max((i - j) * scale, 0.0), 1.0)
        total += (alpha * strength + beta * distance) * specificity[i]  # a NaN term makes the sum NaN
        strong += 1
    return (float(total) if math.isfinite(total) else 0.0), strong


def _specificity(deltas: np.ndarray) -> float:
    """1 − normalized entropy of ``softmax(deltas)``, clipped to [0, 1]; 1 for a single delta (NaN if not finite)."""
    m = len(deltas)
    if m == 1:
        return 1.0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        z = np.exp(deltas - deltas.max())
        p = z / z.sum()
        if (p == 0).any():  # as ProLong: lift exact zeros so that log p is defined, then renormalize
            p = (p + 1e-12) / (p + 1e-12).sum()
        entropy = float(-(p * np.log(p)).sum())
    return float(np.clip((math.log(m) - entropy) / math.log(m), 0.0, 1.0))

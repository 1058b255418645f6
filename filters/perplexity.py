"""``perplexity``: per-document perplexity under any Hugging Face causal LM (score first, select later).

Writes ``scores.<label>.perplexity`` (``exp`` of the mean token NLL), ``mean_nll`` and ``n_scored``
(tokens scored: every token but the first). Documents longer than the model's context are scored with a
sliding window: windows of ``max_length`` tokens advancing by ``stride``; each token is scored once, in
the first window where it is new, with up to ``max_length − stride`` tokens of context before it.
Windows from many documents are batched by length (sorted, so padding is small). ``device: auto`` uses
CUDA when present, in float16 there; float32 on the CPU. ``max_perplexity`` drops documents above it
(reason ``perplexity_above_max``), though the usual way is to keep the score and ``select`` later.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import numeric, strings
from curate.registry import register_stage
from curate.stage import Filter
from filters.causal_lm import CausalLM


@register_stage("perplexity")
class Perplexity(Filter):
    """Perplexity and mean token NLL of each document under a causal LM."""

    class Params(Filter.Params):
        model: str = Field(description="a causal LM folder or Hub name (AutoModelForCausalLM)")
        text_column: str = Field("text", description="the column to score")
        max_length: int | None = Field(None, ge=2, description="window length (default: the model's context)")
        stride: int | None = Field(None, ge=1, description="window step (default: half a window)")
        batch_size: int = Field(8, gt=0, description="windows per forward pass")
        max_chars: int | None = Field(None, gt=0, description="score only the first characters of each document")
        device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1 …")
        max_perplexity: float | None = Field(None, gt=0, description="drop documents above this perplexity")

    requires = ("text",)
    provides = ("scores",)
    needs = {"torch": "text", "transformers": "text"}

    def setup(self, ctx) -> None:
        p = self.params
        self.lm = CausalLM.shared(p.model, p.device)
        self.max_length = min(p.max_length or self.lm.context, self.lm.context)
        self.stride = min(p.stride or max(1, self.max_length // 2), self.max_length - 1)

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        texts = batch.column(self.params.text_column).to_pylist()
        if self.params.max_chars:
            texts = [t[: self.params.max_chars] for t in texts]
        ids = self.lm.encode(texts)
        windows = [w for d, row in enumerate(ids) for w in self._windows(d, row)]
        nll = np.zeros(len(ids))
        count = np.zeros(len(ids), np.int64)
        scored = self.lm.nll([w for _, w, _ in windows], self.params.batch_size)
        for (d, _, new), tokens in zip(windows, scored):
            nll[d] += float(tokens.nll[len(tokens.nll) - new:].sum())
            count[d] += new
        mean = np.where(count > 0, nll / np.maximum(count, 1), np.nan)
        return {"perplexity": numeric(np.exp(mean)), "mean_nll": numeric(mean), "n_scored": numeric(count)}

    def _windows(self, doc: int, ids: list[int]):
        """(doc, window ids, number of new tokens at its end) covering every token but the first once."""
        if len(ids) < 2:
            return
        scored_to = 1  # tokens [0, scored_to) are done (the first is never a target)
        start = 0
        while scored_to < len(ids):
            end = min(start + self.max_length, len(ids))
            yield doc, ids[start:end], end - scored_to
            scored_to = end
            if end == len(ids):
                break
            start = end - (self.max_length - self.stride)

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        if self.params.max_perplexity is None:
            return pa.nulls(batch.num_rows, pa.string())
        ppl = scores["perplexity"].to_numpy(zero_copy_only=False)
        over = ~(ppl <= self.params.max_perplexity)  # NaN (nothing to score) counts as over
        return strings(["perplexity_above_max" if o else None for o in over])

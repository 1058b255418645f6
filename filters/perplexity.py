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

import os

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import numeric, strings
from curate.errors import MissingDependency
from curate.registry import register_stage
from curate.stage import Filter


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
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise MissingDependency(e.name or "transformers", "text") from None
        p = self.params
        local = os.path.isdir(os.path.expanduser(p.model))
        path = os.path.expanduser(p.model) if local else p.model
        device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.torch, self.device = torch, device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, dtype=dtype).to(device).eval()
        context = getattr(self.model.config, "max_position_embeddings", None) or 1024
        self.max_length = min(p.max_length or context, context)
        self.stride = min(p.stride or max(1, self.max_length // 2), self.max_length - 1)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        texts = batch.column(self.params.text_column).to_pylist()
        if self.params.max_chars:
            texts = [t[: self.params.max_chars] for t in texts]
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        nll = np.zeros(len(ids))
        count = np.zeros(len(ids), np.int64)
        windows = [w for d, row in enumerate(ids) for w in self._windows(d, row)]
        windows.sort(key=lambda w: -len(w[1]))  # length-sorted batches: little padding
        for start in range(0, len(windows), self.params.batch_size):
            for d, total, n in self._forward(windows[start:start + self.params.batch_size]):
                nll[d] += total
                count[d] += n
        mean = np.where(count > 0, nll / np.maximum(count, 1), np.nan)
        ppl = np.exp(mean)
        return {"perplexity": numeric(ppl), "mean_nll": numeric(mean), "n_scored": numeric(count)}

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

    def _forward(self, windows):
        torch = self.torch
        width = max(len(w) for _, w, _ in windows)
        input_ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(windows), width), dtype=torch.long)
        for i, (_, w, _) in enumerate(windows):
            input_ids[i, : len(w)] = torch.tensor(w)
            attention[i, : len(w)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = input_ids[:, 1:].to(self.device)
        token_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu().numpy()
        for i, (d, w, new) in enumerate(windows):
            n = len(w)
            yield d, float(token_nll[i, n - 1 - new: n - 1].sum()), new

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        if self.params.max_perplexity is None:
            return pa.nulls(batch.num_rows, pa.string())
        ppl = scores["perplexity"].to_numpy(zero_copy_only=False)
        over = ~(ppl <= self.params.max_perplexity)  # NaN (nothing to score) counts as over
        return strings(["perplexity_above_max" if o else None for o in over])

"""A Hugging Face causal LM loaded once per worker, and per-token NLL for many sequences at once.

Shared by the model-based text scorers (``perplexity``, ``long_dependency``, ``delta_perplexity``,
``homologous_gap``). ``model`` is a local folder (loaded with ``local_files_only``) or a Hub name;
``device: auto`` takes CUDA when present, in float16 there, float32 on the CPU. :meth:`CausalLM.nll`
takes token-id sequences of any lengths, sorts them by length into batches (little padding) and returns,
per sequence, the NLL of every token after the first (and, when asked, whether the model's top guess
was that token).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pydantic import Field

from curate.errors import MissingDependency
from curate.stage import Filter

_LOADED: dict[tuple[str, str], CausalLM] = {}
#: On the CPU a batch holds at most this many padded tokens: bigger batches run slower there, because
#: the (batch × length × vocabulary) logits fall out of cache (measured in benchmarks/perplexity_throughput.py).
CPU_BATCH_TOKENS = 1024


@dataclass
class TokenScores:
    """Per-token results for one sequence: ``nll[k]`` and ``correct[k]`` are for token ``k + 1``."""

    nll: np.ndarray
    correct: np.ndarray | None


class CausalLM:
    """A tokenizer + causal LM pair on one device."""

    def __init__(self, model: str, device: str = "auto"):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise MissingDependency(e.name or "transformers", "text") from None
        local = os.path.isdir(os.path.expanduser(model))
        path = os.path.expanduser(model) if local else model
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local, dtype=dtype).to(self.device)
        self.model.eval()
        self.context = getattr(self.model.config, "max_position_embeddings", None) or 1024
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    @classmethod
    def shared(cls, model: str, device: str = "auto") -> CausalLM:
        """One instance per (model, device) per process: several stages may score with one model."""
        key = (model, device)
        if key not in _LOADED:
            _LOADED[key] = cls(model, device)
        return _LOADED[key]

    def encode(self, texts: list[str], special: bool = True) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=special)["input_ids"]

    def nll(self, seqs: list[list[int]], batch_size: int = 8, correct: bool = False) -> list[TokenScores]:
        """Token NLLs of each sequence (length-sorted batches; sequences must fit the context).

        With ``correct``, also whether the model's top guess was each token (one more pass over the logits).
        """
        out: list[Any] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        cap = CPU_BATCH_TOKENS if self.device == "cpu" else None
        start = 0
        while start < len(order):
            width = len(seqs[order[start]])  # the longest of the batch: it is sorted
            size = batch_size if cap is None else max(1, min(batch_size, cap // max(width, 1)))
            part = order[start:start + size]
            for i, scores in zip(part, self._forward([seqs[i] for i in part], correct)):
                out[i] = scores
            start += size
        return out

    def _forward(self, seqs: list[list[int]], want_correct: bool) -> list[TokenScores]:
        torch = self.torch
        width = max(len(s) for s in seqs)
        if width > self.context:
            raise ValueError(f"a sequence of {width} tokens is longer than the model's context ({self.context})")
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        ids_t = torch.from_numpy(ids).to(self.device)
        with torch.no_grad():
            # Right padding under causal attention: a real token never sees the pads after it, so no
            # attention mask is needed, and without one the attention takes its fast causal path.
            logits = self.model(input_ids=ids_t).logits
            # targets shifted left (the last position has none): no copy of the logits is made
            targets = torch.nn.functional.pad(ids_t[:, 1:], (0, 1), value=-100)
            vocab = logits.shape[-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1),
                                                    reduction="none").view(targets.shape)[:, :-1]
            correct = (logits[:, :-1].argmax(-1) == ids_t[:, 1:]).cpu().numpy() if want_correct else None
        nll = nll.cpu().numpy()
        return [TokenScores(nll[i, : len(s) - 1], correct[i, : len(s) - 1] if correct is not None else None)
                for i, s in enumerate(seqs)]


class LMScorer(Filter):
    """Base of the stages that score a text column with one causal LM (loaded once per process)."""

    class Params(Filter.Params):
        model: str = Field(description="scorer causal LM: a local folder or a Hub name (AutoModelForCausalLM)")
        text_column: str = Field("text", description="the column to score")
        device: str = Field("auto", description="auto (CUDA in float16 when present), cpu, cuda, cuda:1 …")

    requires = ("text",)
    provides = ("scores",)
    needs = {"torch": "text", "transformers": "text"}

    def setup(self, ctx) -> None:
        self.lm = CausalLM.shared(self.params.model, self.params.device)

"""A Hugging Face causal LM loaded once per worker, and per-token NLL for many sequences at once.

Shared by the model-based text scorers (``perplexity``, ``long_dependency``, ``delta_perplexity``,
``homologous_gap``). ``model`` is a local folder (loaded with ``local_files_only``) or a Hub name;
``device: auto`` takes CUDA when present, in float16 there, float32 on the CPU. :meth:`CausalLM.nll`
takes token-id sequences of any lengths, sorts them by length into batches (little padding) and returns,
per sequence, the NLL of every token after the first and whether the model's top guess was that token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate.errors import MissingDependency

_LOADED: dict[tuple[str, str], CausalLM] = {}


@dataclass
class TokenScores:
    """Per-token results for one sequence: ``nll[k]`` and ``correct[k]`` are for token ``k + 1``."""

    nll: np.ndarray
    correct: np.ndarray


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

    def nll(self, seqs: list[list[int]], batch_size: int = 8) -> list[TokenScores]:
        """Token NLLs of each sequence (length-sorted batches; sequences must fit the context)."""
        out: list[Any] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            for i, scores in zip(part, self._forward([seqs[i] for i in part])):
                out[i] = scores
        return out

    def _forward(self, seqs: list[list[int]]) -> list[TokenScores]:
        torch = self.torch
        width = max(len(s) for s in seqs)
        if width > self.context:
            raise ValueError(f"a sequence of {width} tokens is longer than the model's context ({self.context})")
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = ids[:, 1:].to(self.device)
            nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            correct = logprobs.argmax(-1) == targets
        nll, correct = nll.cpu().numpy(), correct.cpu().numpy()
        return [TokenScores(nll[i, : len(s) - 1], correct[i, : len(s) - 1]) for i, s in enumerate(seqs)]

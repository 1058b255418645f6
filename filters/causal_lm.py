"""A Hugging Face causal LM loaded once per worker, and per-token NLL for many sequences at once.

Shared by the model-based text scorers (``perplexity``, ``long_dependency``, ``delta_perplexity``,
``homologous_gap``). ``model`` is a local folder (loaded with ``local_files_only``) or a Hub name;
``device: auto`` takes CUDA when present, in float16 there, float32 on the CPU. :meth:`CausalLM.nll`
takes token-id sequences of any lengths, sorts them by length into batches (little padding) and returns,
per sequence, the NLL of every token after the first (and, when asked, whether the model's top guess
was that token). :meth:`CausalLM.encode_joined` tokenizes a prompt and its continuation as one text and
says where the continuation starts (from the tokenizer's character offsets). Scores a stage cannot
compute are written with :func:`nullable`: null, never NaN.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.errors import MissingDependency
from curate.stage import Filter

_LOADED: dict[tuple[str, str], CausalLM] = {}
#: On the CPU a batch holds at most this many padded tokens: bigger batches run slower there, because
#: the (batch × length × vocabulary) logits fall out of cache (measured in benchmarks/perplexity_throughput.py).
CPU_BATCH_TOKENS = 1024


def nullable(values) -> pa.Array:
    """A float64 score column in which NaN (a row that could not be scored) is written as null."""
    arr = np.ascontiguousarray(values, dtype=np.float64)
    return pa.array(arr, pa.float64(), mask=np.isnan(arr))


def safe_exp(x: float) -> float:
    """``exp`` that overflows to ``inf`` (as torch and numpy do) instead of raising."""
    return math.exp(x) if x < 709.0 else math.inf


@dataclass
class Joined:
    """One ``head + tail`` text tokenized as one: its ids, how many added special tokens lead and trail
    them, and ``start``, the index of the first token whose character span ends inside ``tail``
    (``len(ids) - trail`` when none does: an empty tail)."""

    ids: list[int]
    lead: int
    trail: int
    start: int


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

    def encode_joined(self, heads: list[str], tails: list[str], special: bool = True) -> list[Joined]:
        """Tokenize each ``head + tail`` as ONE text and find where ``tail`` starts among its tokens.

        Tokenizing the two parts apart would split a word from the space before it (``"Response: "`` +
        ``"Paris"`` is not ``"Response: Paris"``); here the tail starts at the first token whose character
        span ends inside the tail (from the fast tokenizer's offsets), so a token that straddles the join
        belongs to the tail. Slow tokenizers have no offsets: the tail then starts where the joint ids stop
        agreeing with the ids of the head tokenized alone.
        """
        texts = [h + t for h, t in zip(heads, tails)]
        if not getattr(self.tokenizer, "is_fast", False):
            return self._joined_by_prefix(heads, texts, special)
        enc = self.tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True,
                             return_special_tokens_mask=True)
        out = []
        for head, ids, offsets, mask in zip(heads, enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]):
            lead, trail = _ends(mask)
            cut = len(head)
            start = next((k for k in range(lead, len(ids) - trail) if not mask[k] and offsets[k][1] > cut),
                         len(ids) - trail)
            out.append(Joined(list(ids), lead, trail, start))
        return out

    def _joined_by_prefix(self, heads: list[str], texts: list[str], special: bool) -> list[Joined]:
        enc = self.tokenizer(texts, add_special_tokens=special, return_special_tokens_mask=True)
        alone = self.tokenizer(heads, add_special_tokens=special)["input_ids"]
        out = []
        for ids, mask, head in zip(enc["input_ids"], enc["special_tokens_mask"], alone):
            lead, trail = _ends(mask)
            same = 0
            while same < min(len(ids) - trail, len(head)) and ids[same] == head[same]:
                same += 1
            out.append(Joined(list(ids), lead, trail, max(same, lead)))
        return out

    def nll(self, seqs: list[list[int]], batch_size: int = 8, correct: bool = False) -> list[TokenScores]:
        """Token NLLs of each sequence (length-sorted batches; sequences must fit the context).

        With ``correct``, also whether the model's top guess was each token (one more pass over the logits).
        On CUDA the next batch is queued before the previous one's results are read back (ids and
        results go through pinned memory without blocking; each read waits for its own batch only), so
        the GPU works on one batch while Python reads the one before and builds the one after.
        """
        out: list[Any] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        cap = CPU_BATCH_TOKENS if self.device == "cpu" else None
        start = 0
        in_flight = None
        while start < len(order):
            width = len(seqs[order[start]])  # the longest of the batch: it is sorted
            size = batch_size if cap is None else max(1, min(batch_size, cap // max(width, 1)))
            part = order[start:start + size]
            launched = (part, self._launch([seqs[i] for i in part], correct))
            if in_flight is not None:
                self._collect(*in_flight, seqs, out)
            in_flight = launched
            start += size
        if in_flight is not None:
            self._collect(*in_flight, seqs, out)
        return out

    def _launch(self, seqs: list[list[int]], want_correct: bool):
        """Queue one batch on the device: ``(nll, correct, event)``, host tensors that are complete once
        ``event`` (None off CUDA) has happened."""
        torch = self.torch
        cuda = self.device.startswith("cuda")
        width = max(len(s) for s in seqs)
        if width > self.context:
            raise ValueError(f"a sequence of {width} tokens is longer than the model's context ({self.context})")
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        ids_t = torch.from_numpy(ids)
        if cuda:
            ids_t = ids_t.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":
            ids_t = ids_t.to(self.device)
        with torch.no_grad():
            # Right padding under causal attention: a real token never sees the pads after it, so no
            # attention mask is needed, and without one the attention takes its fast causal path.
            logits = self.model(input_ids=ids_t).logits
            # targets shifted left (the last position has none): no copy of the logits is made
            targets = torch.nn.functional.pad(ids_t[:, 1:], (0, 1), value=-100)
            vocab = logits.shape[-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1),
                                                    reduction="none").view(targets.shape)[:, :-1]
            correct = (logits[:, :-1].argmax(-1) == ids_t[:, 1:]) if want_correct else None
        # The read-back is queued right behind this batch's kernels (into pinned memory on CUDA) and
        # marked by an event, so reading it later waits for this batch only, not for the batches queued
        # after it.
        out = [_to_host(t, torch, cuda) for t in (nll, correct)]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return out[0], out[1], event

    @staticmethod
    def _collect(part: list[int], launched, seqs: list[list[int]], out: list) -> None:
        """Read a launched batch back into ``out`` (``part``: the positions of its sequences)."""
        nll_t, correct_t, event = launched
        if event is not None:
            event.synchronize()
        nll = nll_t.numpy()
        correct = correct_t.numpy() if correct_t is not None else None
        for row, i in enumerate(part):
            n = len(seqs[i]) - 1
            out[i] = TokenScores(nll[row, :n], correct[row, :n] if correct is not None else None)


def _to_host(t, torch, cuda: bool):
    """``t`` on the CPU: on CUDA a copy queued into pinned memory (complete once the stream gets there)."""
    if t is None:
        return None
    if not cuda:
        return t.cpu()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _ends(mask: list[int]) -> tuple[int, int]:
    """How many added special tokens lead and trail a sequence (from its special-tokens mask)."""
    lead = 0
    while lead < len(mask) and mask[lead]:
        lead += 1
    trail = 0
    while trail < len(mask) - lead and mask[len(mask) - 1 - trail]:
        trail += 1
    return lead, trail


class LMScorer(Filter):
    """Base of the stages that score a text column with one causal LM (loaded once per process)."""

    class Params(Filter.Params):
        model: str = Field(description="scorer causal LM: a local folder or a Hub name (AutoModelForCausalLM)")
        text_column: str = Field("text", description="the column to score")
        device: str = Field("auto", description="auto (CUDA in float16 when present), cpu, cuda, cuda:1 …")

    requires = ("text",)
    provides = ("scores",)
    needs = {"torch": "text", "transformers": "text"}

    def model_refs(self) -> dict[str, str]:
        return {"model": self.params.model}

    def setup(self, ctx) -> None:
        self.lm = CausalLM.shared(self.params.model, self.params.device)

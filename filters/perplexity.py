"""``perplexity``: per-document perplexity under any Hugging Face causal LM (score first, select later).

Writes ``scores.<label>.perplexity`` (``exp`` of the mean token NLL), ``mean_nll`` and ``n_scored``
(tokens scored: every token but the first). Documents longer than the model's context are scored with a
sliding window: windows of ``max_length`` tokens advancing by ``stride``; each token is scored once, in
the first window where it is new, with up to ``max_length − stride`` tokens of context before it.
Windows from many documents are batched by length (sorted, so padding is small). ``device: auto`` uses
CUDA when present, in float16 there; float32 on the CPU. ``max_perplexity`` drops documents above it
(reason ``perplexity_above_max``; a document with nothing to score — fewer than two tokens — has null
scores and is dropped as ``perplexity_missing``), though the usual way is to keep the score and
``select`` later.

**KenLM backend** (``backend: kenlm``, or automatically when ``model`` is a ``.arpa``/``.bin``/``.klm``
file): CCNet's document perplexity ``10^(−Σ_lines log10 P(line) / Σ_lines (tokens(line) + 1))`` (the
``+ 1`` is the end-of-sentence token), rounded to 0.1 as CCNet stores it, over every ``\n``-separated
line (an empty one scores ``<s> </s>``), each normalized as CCNet does (``normalize``: lower case,
accents stripped, digits → 0, non-ASCII punctuation mapped to ASCII, control characters deleted) and
split into SentencePiece pieces when ``sentencepiece`` names a model file (CCNet's setting) or else on
whitespace. ``lines: joined`` scores the whole text as one sentence instead, normalized first — CCNet's
normalization deletes newlines, so its mining pipeline (normalize, then SentencePiece, then score)
saw each document as one line, and its bucket cut-offs come from that. CCNet's English buckets:
head < 340 ≤ middle < 520 ≤ tail. ``mean_nll`` is then in nats
per token, as above, not rounded; an empty document has null scores.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import numeric, strings
from curate.errors import MissingDependency
from curate.registry import register_stage
from filters.causal_lm import LMScorer, nullable


@register_stage("perplexity")
class Perplexity(LMScorer):
    """Perplexity and mean token NLL of each document under a causal LM."""

    class Params(LMScorer.Params):
        max_length: int | None = Field(None, ge=2, description="window length (default: the model's context)")
        stride: int | None = Field(None, ge=1, description="window step (default: half a window)")
        batch_size: int = Field(8, gt=0, description="windows per forward pass")
        max_chars: int | None = Field(None, gt=0, description="score only the first characters of each document")
        max_perplexity: float | None = Field(None, gt=0, description="drop documents above this perplexity")
        backend: Literal["auto", "hf", "kenlm"] = Field(
            "auto", description="hf (a causal LM), kenlm (an n-gram model file); auto: kenlm for .arpa/.bin/.klm")
        sentencepiece: str | None = Field(None, description="kenlm: SentencePiece model splitting lines into pieces")
        normalize: bool = Field(True, description="kenlm: CCNet-style text normalization before scoring")
        lines: Literal["each", "joined"] = Field(
            "each", description="kenlm: each: every \\n line is a sentence (CCNet's document formula); joined: the "
            "whole text is one sentence, normalized first (which deletes its newlines), as CCNet's mining "
            "pipeline scored documents")

    @property
    def kenlm(self) -> bool:
        p = self.params
        return p.backend == "kenlm" or (p.backend == "auto" and p.model.endswith((".arpa", ".bin", ".klm", ".arpa.gz")))

    def requirements(self) -> dict[str, str]:
        if self.kenlm:
            return {"kenlm": "kenlm", **({"sentencepiece": "text"} if self.params.sentencepiece else {})}
        return dict(self.needs)

    def score_names(self) -> list[str]:
        return ["perplexity", "mean_nll", "n_scored"]

    def model_refs(self) -> dict[str, str]:
        from curate.checks import LOCAL

        p = self.params
        if not self.kenlm:
            return {"model": p.model}
        return {"model": LOCAL + p.model, **({"sentencepiece": LOCAL + p.sentencepiece} if p.sentencepiece else {})}

    def setup(self, ctx) -> None:
        p = self.params
        if self.kenlm:
            self._setup_kenlm()
            return
        super().setup(ctx)
        self.max_length = min(p.max_length or self.lm.context, self.lm.context)
        self.stride = min(p.stride or max(1, self.max_length // 2), self.max_length - 1)

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        texts = batch.column(self.params.text_column).to_pylist()
        if self.params.max_chars:
            texts = [t[: self.params.max_chars] for t in texts]
        if self.kenlm:
            return self._score_kenlm(texts)
        ids = self.lm.encode(texts)
        windows = [w for d, row in enumerate(ids) for w in self._windows(d, row)]
        nll = np.zeros(len(ids))
        count = np.zeros(len(ids), np.int64)
        scored = self.lm.nll([w for _, w, _ in windows], self.params.batch_size)
        for (d, _, new), tokens in zip(windows, scored):
            nll[d] += float(tokens.nll[len(tokens.nll) - new:].sum())
            count[d] += new
        mean = np.where(count > 0, nll / np.maximum(count, 1), np.nan)
        with np.errstate(over="ignore", invalid="ignore"):
            ppl = np.exp(mean)
        return {"perplexity": nullable(ppl), "mean_nll": nullable(mean), "n_scored": numeric(count)}

    def _setup_kenlm(self) -> None:
        try:
            import kenlm
        except ImportError:
            raise MissingDependency("kenlm", "kenlm") from None
        from curate.models import file_key, shared

        model = os.path.expanduser(self.params.model)
        self.ngram = shared("kenlm", file_key(model), lambda: kenlm.Model(model))
        self.spm = None
        if self.params.sentencepiece:
            try:
                import sentencepiece
            except ImportError:
                raise MissingDependency("sentencepiece", "text") from None
            spm = os.path.expanduser(self.params.sentencepiece)
            self.spm = shared("sentencepiece", file_key(spm),
                              lambda: sentencepiece.SentencePieceProcessor(model_file=spm))

    def _score_kenlm(self, texts: list[str]) -> dict[str, pa.Array]:
        log10 = np.zeros(len(texts))
        count = np.zeros(len(texts), np.int64)
        for d, text in enumerate(texts):
            if not text:
                continue  # nothing to score: null, as CCNet leaves an empty document without a score
            for line in (text,) if self.params.lines == "joined" else text.split("\n"):  # empty ones too
                if self.params.normalize:
                    line = ccnet_normalize(line)
                pieces = self.spm.encode(line, out_type=str) if self.spm is not None else line.split()
                log10[d] += self.ngram.score(" ".join(pieces), bos=True, eos=True)
                count[d] += len(pieces) + 1
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mean = np.where(count > 0, -log10 * np.log(10) / np.maximum(count, 1), np.nan)
            ppl = 10.0 ** np.where(count > 0, -log10 / np.maximum(count, 1), np.nan)
        ppl = np.array([round(float(x), 1) for x in ppl])  # Python's rounding, as CCNet (not numpy's rint)
        return {"perplexity": nullable(ppl), "mean_nll": nullable(mean), "n_scored": numeric(count)}

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

    def thresholds(self, ctx) -> dict[str, dict[str, float | None]]:
        """``max_perplexity`` as a bound on ``perplexity``."""
        p = self.params.max_perplexity
        return {} if p is None else {"perplexity": {"min": None, "max": p}}

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        if self.params.max_perplexity is None:
            return pa.nulls(batch.num_rows, pa.string())
        ppl = scores["perplexity"].to_numpy(zero_copy_only=False)  # null (nothing to score) → NaN
        missing = np.isnan(ppl)
        with np.errstate(invalid="ignore"):
            over = ppl > self.params.max_perplexity
        return strings(["perplexity_missing" if m else "perplexity_above_max" if o else None
                        for m, o in zip(missing, over)])


#: CCNet's mapping of non-ASCII punctuation to ASCII (its ``punct=1`` setting); other punctuation stays.
_UNICODE_PUNCT = str.maketrans({
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"', "」": '"',
    "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!", "（": "(", "）": ")",
    "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'", "…": "...", "━": "-", "〈": "<", "〉": ">",
    "【": "[", "】": "]", "％": "%", "►": "-",
})
#: Control characters (C0, DEL and C1), which CCNet deletes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_DIGITS = re.compile(r"\d")


def ccnet_normalize(line: str) -> str:
    """CCNet's line normalization: stripped, lower case, accents removed (NFD without combining marks),
    every digit → 0, non-ASCII punctuation mapped to ASCII (ASCII punctuation stays), control characters
    deleted. Spaces inside the line are kept; pieces are split on whitespace afterwards."""
    line = line.strip()
    if not line:
        return line
    line = unicodedata.normalize("NFD", line.lower())
    line = "".join(c for c in line if unicodedata.category(c) != "Mn")
    line = _DIGITS.sub("0", line)
    return _CONTROL.sub("", line.translate(_UNICODE_PUNCT))

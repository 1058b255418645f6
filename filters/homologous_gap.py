"""``homologous_gap``: GATEAU's Homologous Models' Guidance (HMG) for long instruction data (global).

Each row is rendered with ``template`` from its ``context``, ``instruction`` and ``response`` fields
(columns, or keys of the row's ``meta`` JSON — where readers keep a record's other fields);
two models of one family score the **response only** (the rendered text is tokenized as one and the
prompt's tokens carry no loss): ``short_model`` (a short-context model) and ``long_model`` (its
long-context sibling). Inputs longer than a model's window keep their last tokens (left truncation, as
GATEAU's tokenizer truncates), so a response longer than the window keeps its end. Over the whole
dataset each perplexity list is min-max normalized (rows with no score — an empty response — take no
part and get null scores); per row

* ``gap = norm(PPL_short) − norm(PPL_long)`` — high when the response is hard for the short model but
  easy for the long one, i.e. it needs the long context;
* ``hmg = softmax(gap)`` over all rows (GATEAU's form; same order as ``gap``).

Scores: ``ppl_short``, ``ppl_long``, ``gap``, ``hmg``. The models run in the phase before the stage (its
``observe`` step), the normalization once in the driver, so ``select`` can then keep a top fraction.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.registry import register_stage
from curate.stage import Filter, concat_partials
from filters.causal_lm import CausalLM, nullable, safe_exp


@register_stage("homologous_gap")
class HomologousGap(Filter):
    """Response perplexity under a short- and a long-context model; normalized gap and softmax."""

    class Params(Filter.Params):
        short_model: str = Field(description="short-context causal LM (folder or Hub name)")
        long_model: str = Field(description="long-context causal LM of the same family")
        template: str = Field("Context:\n{context}\n\nInstruction: {instruction}\n\nResponse: {response}",
                              description="how a row is rendered; {response} must come last")
        context_column: str = Field("context", description="column with the long input")
        instruction_column: str = Field("instruction", description="column with the instruction")
        response_column: str = Field("response", description="column with the response that is scored")
        max_length: int | None = Field(None, ge=2, description="tokens per input (default: each model's context)")
        batch_size: int = Field(4, gt=0, description="sequences per forward pass")
        device: str = Field("auto", description="auto (CUDA when present), cpu, cuda …")

    requires = ()
    provides = ("scores",)
    needs = {"torch": "text", "transformers": "text"}

    def __init__(self, params, label=None):
        super().__init__(params, label)
        if not params.template.rstrip().endswith("{response}"):
            from curate.errors import ConfigError

            raise ConfigError(f"{self.label}: template must end with {{response}}")

    def score_names(self) -> list[str]:
        return ["ppl_short", "ppl_long", "gap", "hmg"]

    def model_refs(self) -> dict[str, str]:
        return {"short_model": self.params.short_model, "long_model": self.params.long_model}

    @property
    def is_global(self) -> bool:
        return True

    # ---------------------------------------------------------------- models (observe step)
    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        p = self.params
        prefix, response = self._split(batch)
        short = response_perplexity(CausalLM.shared(p.short_model, p.device), prefix, response, p.max_length,
                                    p.batch_size)
        long = response_perplexity(CausalLM.shared(p.long_model, p.device), prefix, response, p.max_length,
                                   p.batch_size)
        partial.add(pa.table({"id": batch.column("id"), "ppl_short": nullable(short), "ppl_long": nullable(long)}))

    def _split(self, batch: pa.RecordBatch) -> tuple[list[str], list[str]]:
        p = self.params
        head = p.template.rstrip()[: -len("{response}")]
        cols = {name: field_values(batch, getattr(p, f"{name}_column")) for name in ("context", "instruction", "response")}
        prefix = [head.format(context=c or "", instruction=i or "") for c, i in zip(cols["context"], cols["instruction"])]
        return prefix, [r or "" for r in cols["response"]]

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        table = concat_partials(partials)
        if table is None:
            return {"rows": 0}
        # null (nothing scored) → NaN here; NaN or infinite perplexities take no part in the ranges
        short, long = (_finite(table.column(c).to_numpy()) for c in ("ppl_short", "ppl_long"))
        gap = _minmax(short) - _minmax(long)
        finite = np.isfinite(gap)
        hmg = np.full(len(gap), np.nan)
        if finite.any():
            z = np.exp(gap[finite] - gap[finite].max())
            hmg[finite] = z / z.sum()
        scores = table.append_column("gap", nullable(gap)).append_column("hmg", nullable(hmg))
        return {"rows": table.num_rows, "scored": int(finite.sum()), "ppl_short": _range(short),
                "ppl_long": _range(long), "_tables": {"scores": scores}}

    # ---------------------------------------------------------------- per row
    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        table = ctx.global_columns(self.label, "scores")
        at = pc.index_in(batch.column("id"), value_set=table["id"])
        return {name: pc.take(table[name], at) for name in ("ppl_short", "ppl_long", "gap", "hmg")}


def response_perplexity(lm: CausalLM, prefix: list[str], response: list[str], max_length: int | None,
                        batch_size: int) -> np.ndarray:
    """Perplexity of each response given its prefix; NaN where no response token is scored.

    ``prefix + response`` is tokenized as ONE text (special tokens as the tokenizer adds them) and the
    prompt's tokens carry no loss; the response starts at the first token that covers one of its
    characters (:meth:`CausalLM.encode_joined`). A text longer than the window keeps its LAST tokens
    (left truncation, the added special tokens at both ends kept, as a left-truncating Hugging Face
    tokenizer does): the prompt is cut first, then the response's beginning.
    """
    width = min(max_length or lm.context, lm.context)
    seqs, first = [], []
    for j in lm.encode_joined(prefix, response):
        ids, start = j.ids, j.start
        over = len(ids) - width
        if over > 0:
            if j.lead + j.trail < width:
                body = ids[j.lead:len(ids) - j.trail]
                ids = ids[:j.lead] + body[over:] + ids[len(ids) - j.trail:]
                start = max(start - over, j.lead)
            else:  # no room for the special tokens: plain left truncation
                ids, start = ids[over:], max(start - over, 0)
        seqs.append(ids)
        first.append(max(start, 1))  # the first token has no context and is never scored
    out = np.full(len(seqs), np.nan)
    todo = [i for i, s in enumerate(seqs) if first[i] < len(s)]
    for i, s in zip(todo, lm.nll([seqs[i] for i in todo], batch_size)):
        out[i] = safe_exp(float(s.nll[first[i] - 1:].mean()))  # nll[k] is the loss of token k + 1
    return out


def field_values(batch: pa.RecordBatch, name: str) -> list:
    """A column's values, or (when there is no such column) that key of each row's ``meta`` JSON."""
    if name in batch.schema.names:
        return batch.column(name).to_pylist()
    if "meta" not in batch.schema.names:
        raise KeyError(f"no column or meta field {name!r}")
    import orjson

    return [orjson.loads(m).get(name) if m else None for m in batch.column("meta").to_pylist()]


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, np.nan)


def _minmax(x: np.ndarray) -> np.ndarray:
    """Min-max normalization over the finite values; NaN stays NaN; all equal → 0."""
    ok = np.isfinite(x)
    if not ok.any():
        return np.full(len(x), np.nan)
    lo, hi = x[ok].min(), x[ok].max()
    return np.where(ok, 0.0, np.nan) if hi == lo else (x - lo) / (hi - lo)


def _range(x: np.ndarray) -> dict[str, float | None]:
    ok = np.isfinite(x)
    return {"min": float(x[ok].min()), "max": float(x[ok].max())} if ok.any() else {"min": None, "max": None}

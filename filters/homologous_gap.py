"""``homologous_gap``: GATEAU's Homologous Models' Guidance (HMG) for long instruction data (global).

Each row is rendered with ``template`` from its ``context``, ``instruction`` and ``response`` fields
(columns, or keys of the row's ``meta`` JSON — where readers keep a record's other fields);
two models of one family score the **response only** (the prompt before it is context, its tokens carry
no loss): ``short_model`` (a short-context model) and ``long_model`` (its long-context sibling). Inputs
longer than a model's window keep their last tokens (left truncation). Over the whole dataset each
perplexity list is min-max normalized; per row

* ``gap = norm(PPL_short) − norm(PPL_long)`` — high when the response is hard for the short model but
  easy for the long one, i.e. it needs the long context;
* ``hmg = softmax(gap)`` over all rows (GATEAU's form; same order as ``gap``).

Scores: ``ppl_short``, ``ppl_long``, ``gap``, ``hmg``. The models run in the phase before the stage (its
``observe`` step), the normalization once in the driver, so ``select`` can then keep a top fraction.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.arrays import numeric
from curate.registry import register_stage
from curate.stage import Filter, concat_partials
from filters.causal_lm import CausalLM


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

    @property
    def is_global(self) -> bool:
        return True

    # ---------------------------------------------------------------- models (observe step)
    def observe(self, batch: pa.RecordBatch, ctx) -> None:
        p = self.params
        prefix, response = self._split(batch)
        short = response_perplexity(CausalLM.shared(p.short_model, p.device), prefix, response, p.max_length,
                                    p.batch_size)
        long = response_perplexity(CausalLM.shared(p.long_model, p.device), prefix, response, p.max_length,
                                   p.batch_size)
        self.keep_partial(pa.table({"id": batch.column("id"), "ppl_short": numeric(short),
                                    "ppl_long": numeric(long)}))

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
        short, long = (table.column(c).to_numpy() for c in ("ppl_short", "ppl_long"))
        gap = _minmax(short) - _minmax(long)
        finite = np.isfinite(gap)
        hmg = np.full(len(gap), np.nan)
        if finite.any():
            z = np.exp(gap[finite] - gap[finite].max())
            hmg[finite] = z / z.sum()
        scores = table.append_column("gap", numeric(gap)).append_column("hmg", numeric(hmg))
        return {"rows": table.num_rows, "ppl_short": _range(short), "ppl_long": _range(long),
                "_tables": {"scores": scores}}

    # ---------------------------------------------------------------- per row
    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        if not hasattr(self, "_table"):
            table = ctx.global_table(self.label, "scores").combine_chunks()
            self._table = {name: table.column(name).chunk(0) for name in table.column_names}
        at = pc.index_in(batch.column("id"), value_set=self._table["id"])
        return {name: pc.take(self._table[name], at) for name in ("ppl_short", "ppl_long", "gap", "hmg")}


def response_perplexity(lm: CausalLM, prefix: list[str], response: list[str], max_length: int | None,
                        batch_size: int) -> np.ndarray:
    """Perplexity of each response given its prefix (left-truncated to the window); NaN if empty."""
    width = min(max_length or lm.context, lm.context)
    heads = lm.encode(prefix)
    tails = lm.encode(response, special=False)
    seqs, scored_len = [], []
    for h, t in zip(heads, tails):
        t = t[: width - 1]
        seq = (h + t)[-width:]
        seqs.append(seq)
        scored_len.append(min(len(t), len(seq) - 1))
    out = np.full(len(seqs), np.nan)
    todo = [i for i, n in enumerate(scored_len) if n > 0]
    for i, s in zip(todo, lm.nll([seqs[i] for i in todo], batch_size)):
        out[i] = math.exp(float(s.nll[-scored_len[i]:].mean()))
    return out


def field_values(batch: pa.RecordBatch, name: str) -> list:
    """A column's values, or (when there is no such column) that key of each row's ``meta`` JSON."""
    if name in batch.schema.names:
        return batch.column(name).to_pylist()
    if "meta" not in batch.schema.names:
        raise KeyError(f"no column or meta field {name!r}")
    import orjson

    return [orjson.loads(m).get(name) if m else None for m in batch.column("meta").to_pylist()]


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = np.nanmin(x), np.nanmax(x)
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def _range(x: np.ndarray) -> dict[str, float]:
    return {"min": float(np.nanmin(x)), "max": float(np.nanmax(x))}


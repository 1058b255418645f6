"""``select``: keep rows by thresholds and/or a top fraction of score columns, without re-scoring.

Score first, select later: model stages write ``scores.<stage>.<metric>``; this cheap stage applies
``where`` bounds (inclusive ``min``/``max`` on any column path) and, optionally, keeps the ``top``
fraction of the survivors by one column. A top fraction is global: every shard's scores are
gathered first (the planner starts a phase here), the cut-off is exact, and ties at the cut-off are
broken by a stable hash of ``(seed, stage, id)``, so exactly ``round(fraction * n)`` rows stay.

A null or NaN score is *missing*: outside every bound, never a ``top`` candidate (so never the
cut-off, never kept, not counted in ``n``). ``±inf`` are ordinary values. The cut-off reported in the
combined state (``stats.json → global.<label>``) is the score's own value; JSON has no infinity, so
``±inf`` are written as the strings ``"inf"`` / ``"-inf"``.

Drop reasons: ``<column>_below_min``, ``<column>_above_max``, ``<column>_missing`` (null or NaN score),
``<column>_not_in_top``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.registry import register_stage
from curate.schema import score_column
from curate.seeds import doc_hashes
from curate.stage import Filter, concat_partials
from curate.stats import merge_bounds


class Bound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    column: str = Field(description="a column path, e.g. scores.heuristics.n_words")
    min: float | None = Field(None, description="drop rows below this value (inclusive bound)")
    max: float | None = Field(None, description="drop rows above this value (inclusive bound)")

    @model_validator(mode="after")
    def _some_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        return self


class Top(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    column: str = Field(description="the column path to rank by")
    fraction: float = Field(gt=0, le=1, description="share of the rows (after `where`) to keep")
    largest: bool = Field(True, description="keep the largest values (false: the smallest)")


@register_stage("select")
class Select(Filter):
    """Keep rows by score bounds and/or an exact top fraction, without re-running any model."""

    class Params(Filter.Params):
        where: list[Bound] = Field(default_factory=list, description="bounds every kept row must meet")
        top: Top | None = Field(None, description="keep only this top fraction (a global step)")

        @model_validator(mode="after")
        def _something(self):
            if not self.where and self.top is None:
                raise ValueError("select needs `where` bounds, a `top` fraction, or both")
            return self

    @property
    def is_global(self) -> bool:
        return self.params.top is not None

    def thresholds(self, ctx) -> dict[str, dict[str, float | None]]:
        """The ``where`` bounds and the ``top`` cut-off (a min when keeping the largest, else a max),
        by column path as written (``scores.heuristics.n_words``); on one column, the tighter of each
        side. The cut-off is the combined state's own score value, so it is known in the phase that
        applies it; a ``top`` that kept nothing, or an infinite cut-off, draws no line."""
        out: dict[str, dict[str, float | None]] = {}
        bounds = [(b.column, b.min, b.max) for b in self.params.where]
        top = self.params.top
        if top is not None:
            cut = ctx.global_state(self.label).get("value")
            if cut is not None and math.isfinite(_from_json(cut)):
                cut = _from_json(cut)
                bounds.append((top.column, cut, None) if top.largest else (top.column, None, cut))
        for column, lo, hi in bounds:
            out[column] = merge_bounds(out.get(column), {"min": lo, "max": hi})
        return out

    # ---------------------------------------------------------------- per row
    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        reasons = self._bounds(batch)
        top = self.params.top
        if top is None:
            return reasons
        state = ctx.global_state(self.label)
        value = _values(batch, top.column)
        missing = np.isnan(value)
        key, tb = _key(batch, value, top, ctx.seed, self.label)
        if state["value"] is None:  # nothing survived the bounds anywhere
            inside = np.zeros(batch.num_rows, bool)
        else:
            # compare sort keys, never raw values: the key of the cut-off row is rebuilt from its value
            cut = _from_json(state["value"])
            cut_key = cut if top.largest else -cut
            inside = (key > cut_key) | ((key == cut_key) & (tb >= np.uint64(state["tiebreak"])))
        name = _key_name(top.column)
        reason = pc.if_else(pa.array(missing), f"{name}_missing",
                            pc.if_else(pa.array(inside & ~missing), _NULL, f"{name}_not_in_top"))
        return pc.coalesce(reasons, reason)

    def _bounds(self, batch: pa.RecordBatch) -> pa.Array:
        """The first failed bound of each row (``where`` order), null where every bound holds."""
        reason = pa.nulls(batch.num_rows, pa.string())
        for bound in reversed(self.params.where):  # reversed: an earlier bound's reason wins
            value = _values(batch, bound.column)
            name = _key_name(bound.column)
            if bound.max is not None:
                reason = pc.if_else(pa.array(value > bound.max), f"{name}_above_max", reason)
            if bound.min is not None:
                reason = pc.if_else(pa.array(value < bound.min), f"{name}_below_min", reason)
            reason = pc.if_else(pa.array(np.isnan(value)), f"{name}_missing", reason)  # null or NaN
        return reason

    # ---------------------------------------------------------------- global protocol
    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        top = self.params.top
        value = _values(batch, top.column)
        has = pc.is_null(self._bounds(batch)).to_numpy(zero_copy_only=False) & ~np.isnan(value)
        if not has.any():
            return
        rows = batch.filter(pa.array(has))
        key, tb = _key(rows, value[has], top, ctx.seed, self.label)
        partial.add(pa.table({"value": key, "tiebreak": tb}))

    def combine(self, partials: list[pa.Table], seed: int) -> dict:
        """The cut-off row (the k-th by sort key): its own score ``value``, ``tiebreak``, ``n`` and ``k``."""
        table = concat_partials(partials)
        top = self.params.top
        n = table.num_rows if table is not None else 0
        k = int(math.floor(top.fraction * n + 0.5)) if n else 0
        if k == 0:
            return {"value": None, "tiebreak": None, "n": n, "k": 0, "largest": top.largest}
        key, tb = table.column("value").to_numpy(), table.column("tiebreak").to_numpy()
        pick = int(np.lexsort((tb, key))[::-1][k - 1])
        own = float(key[pick]) if top.largest else -float(key[pick])  # the sort key back to the score
        return {"value": _to_json(own + 0.0), "tiebreak": int(tb[pick]), "n": n, "k": k, "largest": top.largest}


_NULL = pa.scalar(None, pa.string())


def _values(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """A column as float64, null → NaN (both are "missing")."""
    return score_column(batch, column).cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _key(batch: pa.RecordBatch, value: np.ndarray, top: Top, seed: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Sort key of each row (larger is better): the score, negated to keep the smallest; and a tiebreak hash."""
    return (value if top.largest else -value), doc_hashes(seed, label, batch.column("id").to_pylist())


def _to_json(x: float) -> float | str:
    """JSON has no infinity: ``±inf`` become the strings ``"inf"`` / ``"-inf"``."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _from_json(x: float | str) -> float:
    return float(x)  # float("inf"), float("-inf") and plain numbers


def _key_name(column: str) -> str:
    return column.replace("scores.", "", 1).replace(".", "_")

"""``select``: keep rows by thresholds and/or a top fraction of score columns, without re-scoring.

Score first, select later: model stages write ``scores.<stage>.<metric>``; this cheap stage applies
``where`` bounds (inclusive ``min``/``max`` on any column path) and, optionally, keeps the ``top``
fraction of the survivors by one column. A top fraction is global: every shard's scores are
gathered first (the planner starts a phase here), the cut-off is exact, and ties at the cut-off are
broken by a stable hash of ``(seed, stage, id)``, so exactly ``round(fraction * n)`` rows stay.

Drop reasons: ``<column>_below_min``, ``<column>_above_max``, ``<column>_missing`` (null score),
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

    # ---------------------------------------------------------------- per row
    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        reasons = self._bounds(batch)
        top = self.params.top
        if top is None:
            return reasons
        state = ctx.global_state(self.label)
        value, tb = _key(batch, top, ctx.seed, self.label)
        cut_v, cut_t = state["value"], state["tiebreak"]
        if cut_v is None:  # nothing survived the bounds anywhere
            inside = pa.array(np.zeros(batch.num_rows, bool))
        else:
            above = (value > cut_v) | ((value == cut_v) & (tb >= np.uint64(cut_t)))
            inside = pa.array(above)
        missing = pc.is_null(score_column(batch, top.column))
        reason = pc.if_else(missing, f"{_key_name(top.column)}_missing",
                            pc.if_else(inside, pa.scalar(None, pa.string()), f"{_key_name(top.column)}_not_in_top"))
        return pc.coalesce(reasons, reason)

    def _bounds(self, batch: pa.RecordBatch) -> pa.Array:
        reason = pa.nulls(batch.num_rows, pa.string())
        for bound in reversed(self.params.where):
            col = score_column(batch, bound.column)
            name = _key_name(bound.column)
            if bound.max is not None:
                reason = pc.if_else(pc.fill_null(pc.greater(col, bound.max), False), f"{name}_above_max", reason)
            if bound.min is not None:
                reason = pc.if_else(pc.fill_null(pc.less(col, bound.min), False), f"{name}_below_min", reason)
            reason = pc.if_else(pc.is_null(col), f"{name}_missing", reason)
        return reason

    # ---------------------------------------------------------------- global protocol
    def observe(self, batch: pa.RecordBatch, ctx) -> None:
        keep = pc.is_null(self._bounds(batch))
        top = self.params.top
        has = pc.and_(keep, pc.is_valid(score_column(batch, top.column)))
        if not pc.any(has).as_py():
            return
        rows = batch.filter(has)
        value, tb = _key(rows, top, ctx.seed, self.label)
        self.keep_partial(pa.table({"value": value, "tiebreak": tb}))

    def combine(self, partials: list[pa.Table], seed: int) -> dict:
        table = concat_partials(partials)
        n = table.num_rows if table is not None else 0
        k = int(math.floor(self.params.top.fraction * n + 0.5)) if n else 0
        if k == 0:
            return {"value": None, "tiebreak": None, "n": n, "k": 0}
        order = np.lexsort((table.column("tiebreak").to_numpy(), table.column("value").to_numpy()))[::-1]
        pick = int(order[k - 1])
        return {"value": float(table.column("value")[pick].as_py()),
                "tiebreak": int(table.column("tiebreak")[pick].as_py()), "n": n, "k": k}


def _key(batch: pa.RecordBatch, top: Top, seed: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Sort key of each row: the score (negated to keep the smallest) and a stable tiebreak hash."""
    value = score_column(batch, top.column).cast(pa.float64()).to_numpy(zero_copy_only=False)
    value = np.nan_to_num(value, nan=-np.inf)
    if not top.largest:
        value = -value
    return value, doc_hashes(seed, label, batch.column("id").to_pylist())


def _key_name(column: str) -> str:
    return column.replace("scores.", "", 1).replace(".", "_")


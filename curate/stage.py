"""The stage protocol: a registered name, frozen ``Params``, columns, ``setup()`` and one generator.

A stage sees ``pyarrow.RecordBatch`` objects and a :class:`~curate.context.RunContext`, never a Dask
or Slurm object. Workers rebuild stages from the resolved manifest; nothing live is pickled.

Global stages (dedup clustering, top-fraction selection, grouping) need to see every shard before
they can act. They say so with ``is_global`` and implement the three-step protocol
``observe`` (per shard, in the phase before them) → ``combine`` (once, in the driver) → ``run``
(per shard, in the next phase, with the combined state from ``ctx.global_state``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from curate.context import RunContext


class StageParams(BaseModel):
    """Base of every stage's parameters: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(ABC):
    """Base class of all stages. Subclasses set ``Params``, ``requires``, ``provides`` and ``run``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = StageParams
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    #: Optional modules and the extra that installs them, checked at validation time.
    needs: ClassVar[dict[str, str]] = {}
    #: True when the stage uses the run tokenizer (the manifest must then have `tokenizer:`).
    needs_tokenizer: ClassVar[bool] = False

    def __init__(self, params: StageParams, label: str | None = None):
        self.params = params
        self.label = label or self.name

    @property
    def is_global(self) -> bool:
        """True when this stage must see all shards first (the planner starts a phase here)."""
        return False

    def setup(self, ctx: RunContext) -> None:
        """Heavy imports and model loading go here, called once per worker process and shard."""

    def requirements(self) -> dict[str, str]:
        """Modules this configured stage imports, and the extra that installs each (checked by the planner)."""
        return dict(self.needs)

    def special_tokens(self) -> list[str]:
        """Special-token strings this stage inserts; the run tokenizer gets an id for each."""
        return []

    def columns_out(self, columns_in: list[str]) -> list[str]:
        """The columns after this stage, given those before it (used by ``curate plan``)."""
        return columns_in + [c for c in self.provides if c not in columns_in]

    @abstractmethod
    def run(self, batches: Iterator[pa.RecordBatch], ctx: RunContext) -> Iterator[pa.RecordBatch]:
        """Consume batches and yield batches; the only method every stage must write."""

    # ---- the global protocol (only for stages whose is_global is True) ----
    def observe(self, batch: pa.RecordBatch, ctx: RunContext) -> None:
        """See one batch of the previous phase's output (per shard)."""

    def keep_partial(self, table: pa.Table) -> None:
        """Add rows to what this shard contributes; the default ``partial`` returns them all."""
        self.__dict__.setdefault("_observed", []).append(table)

    def kept_partial_rows(self) -> int:
        """Rows passed to :meth:`keep_partial` so far on this shard."""
        return sum(t.num_rows for t in self.__dict__.get("_observed", []))

    def partial(self, ctx: RunContext) -> pa.Table | None:
        """What this shard contributes to the global state, as an Arrow table (None: nothing).

        The default concatenates what ``observe`` passed to :meth:`keep_partial` and forgets it, so the
        stage object is clean for the next shard.
        """
        parts = self.__dict__.pop("_observed", [])
        return pa.concat_tables(parts) if parts else None

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        """Reduce all shards' partials to the JSON-serializable state ``run`` will read.

        Large results go under the key ``_tables`` (name → Arrow table); the driver stores them beside
        ``state.json`` and ``run`` reads them with ``ctx.global_table(label, name)``.
        """
        return {}


def concat_partials(partials: list[pa.Table]) -> pa.Table | None:
    """All shards' non-empty partials as one contiguous table (None when every shard was empty)."""
    partials = [p for p in partials if p.num_rows]
    if not partials:
        return None
    return pa.concat_tables(partials, promote_options="default").combine_chunks()


class Synthesizer(Stage):
    """A stage that creates new samples (chunk shuffles, packed sequences, teacher outputs)."""


class Filter(Stage):
    """Score → keep. Subclasses implement :meth:`score` and/or :meth:`decide`.

    The base writes the scores as ``scores.<label>.<metric>``, counts every drop under its reason in
    ``stats.json`` and, with ``quarantine: true``, writes the rejected rows (with a ``drop_reason``
    column) to ``quarantine/<label>/`` in the run directory instead of only counting them.
    """

    class Params(StageParams):
        quarantine: bool = Field(False, description="also write dropped rows to quarantine/<stage>/ with their reason")

    def score(self, batch: pa.RecordBatch, ctx: RunContext) -> dict[str, pa.Array]:
        """Per-row metrics to store under ``scores.<label>``; empty when the filter keeps none."""
        return {}

    def decide(self, batch: pa.RecordBatch, scores: dict[str, pa.Array], ctx: RunContext) -> pa.Array:
        """A string array of drop reasons, null where the row is kept."""
        return pa.nulls(batch.num_rows, pa.string())

    def run(self, batches: Iterator[pa.RecordBatch], ctx: RunContext) -> Iterator[pa.RecordBatch]:
        stats = ctx.stats[self.label]
        for batch in batches:
            scores = self.score(batch, ctx)
            if scores:
                batch = _with_scores(batch, self.label, scores)
            reasons = self.decide(batch, scores, ctx)
            yield _apply_reasons(batch, reasons, stats, ctx, self.label, self.params)


def _with_scores(batch: pa.RecordBatch, label: str, scores: dict[str, pa.Array]) -> pa.RecordBatch:
    from curate.schema import with_scores

    return with_scores(batch, label, scores)


def _apply_reasons(batch, reasons, stats, ctx, label, params) -> pa.RecordBatch:
    """Count and (optionally) quarantine the rows whose reason is set; return the kept rows."""
    import pyarrow.compute as pc

    if reasons.null_count == len(reasons):
        return batch
    for item in pc.value_counts(reasons.drop_null()).to_pylist():
        stats.drop(item["values"], item["counts"])
    keep = reasons.is_null()
    if getattr(params, "quarantine", False):
        rejected = batch.filter(pc.invert(keep)).append_column("drop_reason", reasons.drop_null())
        ctx.quarantine(label, rejected)
    return batch.filter(keep)

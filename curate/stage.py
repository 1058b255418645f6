"""The stage protocol: a registered name, frozen ``Params``, columns, ``setup()`` and one generator.

A stage sees ``pyarrow.RecordBatch`` objects and a :class:`~curate.context.RunContext`, never a Dask
or Slurm object. Workers rebuild stages from the resolved manifest; nothing live is pickled.

Global stages (dedup clustering, top-fraction selection, grouping) need to see every shard before
they can act. They say so with ``is_global`` and implement the three-step protocol
``observe`` (per shard, in the phase before them, into a :class:`ShardPartial` the runner creates for
that shard) → ``combine`` (once, in the driver) → ``run`` (per shard, in the next phase, with the
combined state from ``ctx.global_state``). A stage object may serve many shards in one worker, so
nothing that belongs to one shard is ever kept on it.
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

    def score_names(self) -> list[str] | None:
        """The metrics this configured stage writes under ``scores.<label>``; None when not known in
        advance (the planner then accepts any ``scores.<label>.<metric>`` path after it), ``[]`` when it
        writes none."""
        return None

    def model_refs(self) -> dict[str, str]:
        """The models this configured stage loads: parameter name → reference, checked by the planner
        (:func:`curate.checks.check_model_ref`) before any work. A reference is a local file or folder or
        a Hugging Face Hub name; ``local:<path>`` marks a local path that is never downloaded. A stage
        that can tell a parameter is wrong without loading anything may raise ConfigError here."""
        return {}

    @abstractmethod
    def run(self, batches: Iterator[pa.RecordBatch], ctx: RunContext) -> Iterator[pa.RecordBatch]:
        """Consume batches and yield batches; the only method every stage must write."""

    # ---- the global protocol (only for stages whose is_global is True) ----
    def observe(self, batch: pa.RecordBatch, ctx: RunContext, partial: ShardPartial) -> None:
        """See one batch of the previous phase's output (per shard) and add to ``partial``.

        ``partial`` belongs to this shard alone: the runner creates it when the shard starts and
        throws it away with the shard, so rows observed by a shard that then fails never reach
        another shard's contribution. Keep nothing per shard on ``self``.
        """

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        """Reduce all shards' partials to the JSON-serializable state ``run`` will read.

        Large results go under the key ``_tables`` (name → Arrow table); the driver stores them beside
        ``state.json`` and ``run`` reads them with ``ctx.global_table(label, name)``.
        """
        return {}


class ShardPartial:
    """What one shard contributes to one global stage: Arrow tables added by ``observe``.

    Created by the runner for each (shard, global stage) and saved as
    ``global/<label>/<phase>-<shard>.arrow`` only when the shard completes.
    """

    def __init__(self) -> None:
        self._tables: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        """Add rows to this shard's contribution."""
        self._tables.append(table)
        self.rows += table.num_rows

    def table(self) -> pa.Table | None:
        """Everything added, as one table (None when nothing was added)."""
        if not self._tables:
            return None
        return pa.concat_tables(self._tables, promote_options="default")


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
    column) to ``quarantine/<label>/`` in the run directory instead of only counting them. It also
    records, in the stage's stats, the distribution of every numeric or boolean score it stores
    (``scores``) and the bounds :meth:`thresholds` reports (``thresholds``), for ``curate report``.
    """

    class Params(StageParams):
        quarantine: bool = Field(False, description="also write dropped rows to quarantine/<stage>/ with their reason")

    def score(self, batch: pa.RecordBatch, ctx: RunContext) -> dict[str, pa.Array]:
        """Per-row metrics to store under ``scores.<label>``; empty when the filter keeps none.

        Keys starting with ``_`` are handed to :meth:`decide` with the others but not stored: the
        way to pass per-batch working values from ``score`` to ``decide`` without keeping them on
        the stage object.
        """
        return {}

    def decide(self, batch: pa.RecordBatch, scores: dict[str, pa.Array], ctx: RunContext) -> pa.Array:
        """A string array of drop reasons, null where the row is kept."""
        return pa.nulls(batch.num_rows, pa.string())

    def thresholds(self, ctx: RunContext) -> dict[str, dict[str, float | None]]:
        """The fixed bounds this configured filter drops rows by: metric → ``{"min": x, "max": y}``
        (either may be None). A key is one of this stage's own metrics, or a column path
        (``scores.<label>.<metric>``) for a bound on another stage's score. Called once per shard,
        before the first batch; ``{}`` (the default) when the filter has none."""
        return {}

    def run(self, batches: Iterator[pa.RecordBatch], ctx: RunContext) -> Iterator[pa.RecordBatch]:
        """Score and decide each batch. A :class:`~curate.errors.BadRecord` raised by ``score`` or
        ``decide`` sends that batch through row by row: the rows that raise it are dropped under its
        reason and written to ``failures/``; the others go on."""
        from curate.errors import BadRecord

        stats = ctx.stats[self.label]
        for name, bound in self.thresholds(ctx).items():
            stats.threshold(name, bound.get("min"), bound.get("max"))
        for batch in batches:
            try:
                out = self._filter(batch, ctx)
            except BadRecord:
                out = self._filter_rows(batch, ctx)
            if out is not None:
                yield out

    def _filter(self, batch: pa.RecordBatch, ctx: RunContext) -> pa.RecordBatch:
        scores = self.score(batch, ctx)
        stored = {k: v for k, v in scores.items() if not k.startswith("_")}
        if stored:
            batch = _with_scores(batch, self.label, stored)
        reasons = self.decide(batch, scores, ctx)
        record_scores(ctx.stats[self.label], stored)  # after decide: a BadRecord retries row by row
        return _apply_reasons(batch, reasons, ctx.stats[self.label], ctx, self.label, self.params)

    def _filter_rows(self, batch: pa.RecordBatch, ctx: RunContext) -> pa.RecordBatch | None:
        from curate.errors import BadRecord

        kept = []
        for i in range(batch.num_rows):
            row = batch.slice(i, 1)
            try:
                kept.append(self._filter(row, ctx))
            except BadRecord as e:
                doc_id = row.column("id")[0].as_py() if "id" in row.schema.names else None
                ctx.failure(e.reason, f"stage {self.label}, row {doc_id!r}: {e.detail}", file=e.file,
                            line=e.line, record=doc_id, stage=self.label, dropped=True)
        kept = [b for b in kept if b.num_rows]
        if not kept:
            return None
        table = pa.Table.from_batches(kept) if all(b.schema.equals(kept[0].schema) for b in kept) else \
            pa.concat_tables([pa.Table.from_batches([b]) for b in kept], promote_options="default")
        return table.combine_chunks().to_batches()[0]


def record_scores(stats, scores: dict[str, pa.Array]) -> None:
    """Add each numeric or boolean score array to ``stats.scores[metric]`` (vectorized; nulls and NaNs
    are counted, not bucketed). Other types (strings, lists, structs) are skipped."""
    for name, values in scores.items():
        if name not in stats.scores:
            from curate.stats import ScoreHistogram

            histogram = ScoreHistogram()
            if histogram.add_array(values):
                stats.scores[name] = histogram
        else:
            stats.scores[name].add_array(values)


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

"""One adapter that runs a datatrove filter over Arrow rows, so its rules need no rewriting here.

Each row becomes a ``datatrove.data.Document`` (``text`` and ``id``); the filter's verdict comes back as
a counted drop reason (datatrove's own reason string, e.g. ``gopher_short_doc``; ``dropped`` when the
filter gives none). Filters that edit the text (C4 removes lines) write the edited text back into the
text column of the rows they keep; quarantined rows keep their original text. The line-level counters
datatrove keeps (``line-filter-javascript`` …) are added to the stage's metrics in ``stats.json``.
Subclasses say which datatrove class to build and map their ``Params`` to its constructor.

``engine: fast`` runs the same rules vectorized over the Arrow column instead (a :class:`FastRule` of
the stage's own, in ``filters/fast_*.py``): no per-document Python and no datatrove or spaCy needed.
Its word splitting is a regular expression rather than spaCy's tokenizer, so a few verdicts differ
from datatrove's; ``docs/filters/quality.md`` lists every kind of difference and the measured
agreement. ``engine: datatrove`` stays for users who need datatrove's verdicts exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from curate.arrays import strings
from curate.errors import MissingDependency
from curate.stage import Filter, _apply_reasons


class DatatroveFilter(Filter):
    """Base of the stages that wrap a ``datatrove.pipeline.filters`` class."""

    class Params(Filter.Params):
        text_column: str = Field("text", description="the column the filter reads")
        language: str = Field("en", description="language for datatrove's word tokenizer (spaCy blank pipeline)")
        engine: Literal["datatrove", "fast"] = Field(
            "datatrove", description="datatrove: its per-document rules, verdicts identical to datatrove's; "
            "fast: the same rules vectorized over the column (no datatrove or spaCy needed; a few verdicts "
            "differ, see the filter's docs)")

        @model_validator(mode="after")
        def _fast_is_english(self):
            if self.engine == "fast" and self.language != "en":
                raise ValueError(f"engine: fast splits words like spaCy's English tokenizer; language "
                                 f"{self.language!r} needs engine: datatrove")
            return self

    requires = ("text",)
    needs = {"datatrove": "quality", "spacy": "quality"}
    #: The class in ``datatrove.pipeline.filters`` this stage runs; its keyword arguments are the
    #: stage's parameters (minus ``quarantine``, ``text_column`` and ``engine``), with lists turned into tuples.
    datatrove_class: ClassVar[str] = ""
    #: True when the filter edits ``doc.text`` and the edit is the point (C4 line removal).
    rewrites_text: ClassVar[bool] = False

    def requirements(self) -> dict[str, str]:
        """datatrove and spaCy for ``engine: datatrove``; the fast engine needs only polars (a core dependency)."""
        return {} if self.params.engine == "fast" else dict(self.needs)

    @abstractmethod
    def fast_rule(self) -> FastRule:
        """The vectorized rule set of ``engine: fast`` (every wrapped datatrove filter has one)."""

    def score_names(self) -> list[str]:
        """No scores: a datatrove rule only keeps or drops (its counters go to the stage's metrics)."""
        return []

    def build(self) -> Any:
        """The configured datatrove filter instance."""
        import datatrove.pipeline.filters as filters

        kwargs = self.params.model_dump(exclude={"quarantine", "text_column", "engine"})
        kwargs = {k: _tuples(v) if k not in ("stop_words",) else v for k, v in kwargs.items()}
        return getattr(filters, self.datatrove_class)(**kwargs)

    def setup(self, ctx) -> None:
        if self.params.engine == "fast":
            self.fast = self.fast_rule()
            return
        try:
            from datatrove.data import Document
            self.filter = self.build()
        except ImportError as e:
            raise MissingDependency(e.name or "datatrove", "quality") from None
        self.Document = Document

    def run(self, batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
        stats = ctx.stats[self.label]
        column = self.params.text_column
        if self.params.engine == "fast":
            yield from self._run_fast(batches, ctx)
            return
        for batch in batches:
            texts = batch.column(column).to_pylist()
            docs = [self.Document(text=t or "", id=str(i)) for i, t in enumerate(texts)]
            before = _counters(self.filter)
            verdicts = self.filter.filter_batch(docs)
            for name, value in _counters(self.filter).items():
                delta = value - before.get(name, 0)
                if delta:  # per batch: sum is the run's count of such lines
                    stats.metric(name).add_many(1, delta, delta, delta)
            reasons = [None if _kept(v) else (_reason(v) or "dropped") for v in verdicts]
            if self.rewrites_text:
                new = [d.text if r is None else t for d, t, r in zip(docs, texts, reasons, strict=True)]
                if new != texts:
                    i = batch.schema.get_field_index(column)
                    batch = batch.set_column(i, column, strings(new))
            yield _apply_reasons(batch, strings(reasons), stats, ctx, self.label, self.params)


    def _run_fast(self, batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
        stats = ctx.stats[self.label]
        column = self.params.text_column
        for batch in batches:
            texts = batch.column(column)
            verdict = self.fast.verdicts(texts)
            for name, value in verdict.counters.items():
                if value:
                    stats.metric(name).add_many(1, value, value, value)
            reasons = verdict.reasons
            if verdict.texts is not None:  # rewritten text for kept rows; dropped rows keep the original
                import pyarrow.compute as pc

                new = pc.if_else(reasons.is_null(), verdict.texts, texts)
                i = batch.schema.get_field_index(column)
                batch = batch.set_column(i, batch.schema.field(i), new.cast(texts.type))
            yield _apply_reasons(batch, reasons.cast(pa.string()), stats, ctx, self.label, self.params)


@dataclass
class FastVerdicts:
    """What a :class:`FastRule` says about one column of texts.

    ``reasons``: one string per row, null for a kept row, else datatrove's reason name. ``texts``: the
    rewritten texts (same length; only read for kept rows), or None when the rule does not edit text.
    ``counters``: datatrove's line counters for this batch (``line-filter-javascript`` …), when it has any.
    """

    reasons: pa.Array
    texts: pa.Array | None = None
    counters: dict[str, int] = field(default_factory=dict)


class FastRule(ABC):
    """A datatrove rule set computed on a whole Arrow column at once (``engine: fast``)."""

    @abstractmethod
    def verdicts(self, texts: pa.Array) -> FastVerdicts:
        """The verdict of every row of ``texts`` (a string or large_string array; nulls are empty texts)."""


def _tuples(value):
    """Lists (from YAML) as the tuples datatrove expects, recursively; None and scalars unchanged."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _kept(verdict) -> bool:
    return bool(verdict[0] if isinstance(verdict, tuple) else verdict)


def _reason(verdict) -> str | None:
    return verdict[1] if isinstance(verdict, tuple) and len(verdict) > 1 else None


def _counters(step) -> dict[str, float]:
    """datatrove's per-step counters (``line-kept`` …), excluding the totals we count ourselves."""
    out = {}
    for name, stat in step.stats.stats.items():
        if name.startswith("line-"):
            out[name] = getattr(stat, "total", 0)
    return out

"""``language_id``: fastText language identification from a model file you provide (nothing downloaded).

Each text (newlines replaced by spaces, as fastText expects one line) gets the model's top label and its
probability: ``scores.<label>.language`` (``__label__`` stripped, e.g. ``en`` or GlotLID's ``eng_Latn``)
and ``language_score``. Rows are dropped as ``language_not_kept`` when ``languages`` is set and the top
label is not among them, and as ``language_score_below_min`` when the probability is below
``min_score`` (datatrove's and FineWeb's default: 0.65). Works with fastText's ``lid.176.bin``,
GlotLID's ``model.bin`` or any supervised fastText model.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.arrays import numeric, strings
from curate.checks import LOCAL
from curate.errors import ConfigError, MissingDependency
from curate.registry import register_stage
from curate.stage import Filter


@register_stage("language_id")
class LanguageId(Filter):
    """Top fastText language label and probability; drops by language list and minimum score."""

    class Params(Filter.Params):
        model: str = Field(description="local fastText model file (lid.176.bin, GlotLID model.bin …)")
        text_column: str = Field("text", description="the column to identify")
        languages: list[str] | None = Field(None, description="labels to keep (default: every language)")
        min_score: float | None = Field(0.65, ge=0, le=1, description="drop below this top-label probability")
        max_chars: int | None = Field(10_000, gt=0, description="identify from the first characters only")

    requires = ("text",)
    provides = ("scores",)
    needs = {"fasttext": "quality"}

    def score_names(self) -> list[str]:
        return ["language", "language_score"]

    def model_refs(self) -> dict[str, str]:
        """The fastText model file: a local path only (nothing is downloaded)."""
        return {"model": LOCAL + self.params.model}

    def setup(self, ctx) -> None:
        try:
            import fasttext
        except ImportError:
            raise MissingDependency("fasttext", "quality") from None
        path = os.path.expanduser(self.params.model)
        if not os.path.isfile(path):
            raise ConfigError(f"{self.label}: no fastText model file at {path} (give a local path; nothing is downloaded)")
        from curate.models import file_key, shared

        self.ft = shared("fasttext", file_key(path), lambda: fasttext.load_model(path))

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        limit = self.params.max_chars
        lines = [(t or "")[:limit].replace("\n", " ").replace("\r", " ") for t in batch.column(self.params.text_column).to_pylist()]
        labels, probs = self.ft.predict(lines, k=1)
        lang = [lab[0].removeprefix("__label__") if lab else None for lab in labels]
        score = np.array([min(float(p[0]), 1.0) if len(p) else 0.0 for p in probs])
        return {"language": strings(lang), "language_score": numeric(score)}

    def thresholds(self, ctx) -> dict[str, dict[str, float | None]]:
        """``min_score`` as a bound on ``language_score``."""
        s = self.params.min_score
        return {} if s is None else {"language_score": {"min": s, "max": None}}

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        p = self.params
        reason = pa.nulls(batch.num_rows, pa.string())
        if p.min_score is not None:
            low = pc.less(scores["language_score"], p.min_score)
            reason = pc.if_else(low, pa.scalar("language_score_below_min"), reason)
        if p.languages is not None:
            other = pc.invert(pc.fill_null(pc.is_in(scores["language"], value_set=pa.array(p.languages)), False))
            reason = pc.if_else(other, pa.scalar("language_not_kept"), reason)
        return reason

"""``heuristics``: cheap text statistics as scores, and drops outside the bounds you set.

Scores (always written, under ``scores.<label>``): ``n_chars``, ``n_words`` (runs of non-space),
``n_lines``, ``mean_word_length`` (non-space characters per word), and the ratios of letters
(``alpha_ratio``), digits, upper-case letters among letters, whitespace and punctuation to all
characters. Every bound is off (``null``) unless set; a row outside a bound is dropped with the
reason ``<metric>_below_min`` or ``<metric>_above_max``. The counts come from one pass over the column's
code points (:mod:`curate.char_classes`); the bounds are applied in Polars.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.char_classes import class_counts
from curate.registry import register_stage
from curate.stage import Filter

METRICS = ("n_chars", "n_words", "n_lines", "mean_word_length", "alpha_ratio", "digit_ratio", "upper_ratio",
           "whitespace_ratio", "punct_ratio")


@register_stage("heuristics")
class Heuristics(Filter):
    """Length, word count and character-ratio scores; drops outside the bounds you set."""

    class Params(Filter.Params):
        text_column: str = Field("text", description="the column to measure")
        min_chars: int | None = Field(None, ge=0, description="drop below this many characters")
        max_chars: int | None = Field(None, ge=0, description="drop above this many characters")
        min_words: int | None = Field(None, ge=0, description="drop below this many words")
        max_words: int | None = Field(None, ge=0, description="drop above this many words")
        min_mean_word_length: float | None = Field(None, description="drop below this mean word length")
        max_mean_word_length: float | None = Field(None, description="drop above this mean word length")
        min_alpha_ratio: float | None = Field(None, ge=0, le=1, description="drop below this share of letters")
        max_digit_ratio: float | None = Field(None, ge=0, le=1, description="drop above this share of digits")
        max_upper_ratio: float | None = Field(None, ge=0, le=1, description="drop above this share of upper-case letters")
        max_whitespace_ratio: float | None = Field(None, ge=0, le=1, description="drop above this share of whitespace")
        max_punct_ratio: float | None = Field(None, ge=0, le=1, description="drop above this share of punctuation")

    requires = ("text",)
    provides = ("scores",)

    def score_names(self) -> list[str]:
        """Every metric of :data:`METRICS`, always written."""
        return list(METRICS)

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        counts = class_counts(batch.column(self.params.text_column))
        chars = counts["chars"]
        per_char = np.maximum(chars, 1).astype(np.float64)
        with np.errstate(invalid="ignore"):
            metrics = {
                "n_chars": chars, "n_words": counts["words"], "n_lines": counts["newlines"] + 1,
                "mean_word_length": (chars - counts["spaces"]) / np.maximum(counts["words"], 1),
                "alpha_ratio": counts["letters"] / per_char, "digit_ratio": counts["numbers"] / per_char,
                "upper_ratio": counts["upper"] / np.maximum(counts["letters"], 1).astype(np.float64),
                "whitespace_ratio": counts["spaces"] / per_char, "punct_ratio": counts["punct"] / per_char,
            }
        return {m: pa.array(metrics[m]) for m in METRICS}

    def bounds(self) -> list[tuple[str, float | None, float | None]]:
        """``(metric, min, max)`` of every bounded metric, in the order that names a drop."""
        p = self.params
        return [
            ("n_chars", p.min_chars, p.max_chars), ("n_words", p.min_words, p.max_words),
            ("mean_word_length", p.min_mean_word_length, p.max_mean_word_length),
            ("alpha_ratio", p.min_alpha_ratio, None), ("digit_ratio", None, p.max_digit_ratio),
            ("upper_ratio", None, p.max_upper_ratio), ("whitespace_ratio", None, p.max_whitespace_ratio),
            ("punct_ratio", None, p.max_punct_ratio),
        ]

    def thresholds(self, ctx) -> dict[str, dict[str, float | None]]:
        """The bounds that are set, by metric (``min_words: 50`` → ``{"n_words": {"min": 50, "max": None}}``)."""
        return {m: {"min": lo, "max": hi} for m, lo, hi in self.bounds() if lo is not None or hi is not None}

    def decide(self, batch: pa.RecordBatch, scores: dict[str, pa.Array], ctx) -> pa.Array:
        bounds = self.bounds()
        import polars as pl

        df = pl.from_arrow(pa.table(scores))
        reason = pl.lit(None, pl.String)
        for metric, lo, hi in reversed(bounds):  # the first failing bound in this order names the drop
            if hi is not None:
                reason = pl.when(pl.col(metric) > hi).then(pl.lit(f"{metric}_above_max")).otherwise(reason)
            if lo is not None:
                reason = pl.when(pl.col(metric) < lo).then(pl.lit(f"{metric}_below_min")).otherwise(reason)
        return df.select(reason.alias("r")).to_arrow().column("r").combine_chunks().cast(pa.string())

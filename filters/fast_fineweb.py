"""``fineweb_quality`` with ``engine: fast``: datatrove's FineWeb quality rules on a whole Arrow column.

The rules, in datatrove's order and with its reason strings, on the lines of ``text.split("\\n")`` that
are not blank (blank: only Python whitespace):

* ``empty``: no such line;
* ``line_punct_ratio``: the share of lines ending (exactly at their end, trailing spaces included) with
  one of ``stop_chars`` is below ``line_punct_thr`` (unless it is 0 and ``line_punct_exclude_zero``);
* ``short_line_ratio``: the share of lines of at most ``short_line_length`` characters is above
  ``short_line_thr``;
* ``char_dup_ratio``: the characters of every line that repeats an earlier line of the document,
  divided by the characters of the text without its ``\\n``, is above ``char_duplicates_ratio``;
* ``list_ratio``: ``\\n`` characters per word (the spaCy-like words of
  :func:`filters.text_words.word_lists`) is above ``new_line_ratio``.

Only the last rule needs words, so only the rows still kept by the first four are split into words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa

from filters.datatrove_adapter import FastRule, FastVerdicts
from filters.text_words import SPACE_CLASS, TERMINAL_PUNCTUATION_RANGES, code_points, word_lists


@dataclass
class FastFineWebQuality(FastRule):
    """The FineWeb quality rules; the fields mirror ``datatrove.pipeline.filters.FineWebQualityFilter``."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    stop_chars: tuple[str, ...] | None = None
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3

    def verdicts(self, texts: pa.Array, words=None) -> FastVerdicts:
        """Reasons for every row. ``words`` (a polars list Series or a list of word lists, one per row)
        replaces the fast word splitting, e.g. with datatrove's own words to check the rules alone."""
        import polars as pl

        text = pl.from_arrow(texts).cast(pl.String).fill_null("")
        frame = pl.DataFrame({"text": text}).with_row_index("row")
        frame = frame.join(self._line_measures(frame), on="row", how="left", maintain_order="left")
        frame = frame.with_columns(pl.col("n_lines", "n_punct", "n_short", "dup_chars").fill_null(0))
        reasons = frame.select(self._line_reason()).to_series()
        # the words are needed only where the line rules keep the row
        pending = reasons.is_null() & (frame.get_column("n_lines") > 0)
        if pending.any():
            rows = frame.filter(pending)
            if words is None:
                n_words = word_lists(rows.get_column("text").to_arrow()).list.len()
            else:
                n_words = pl.Series(words, dtype=pl.List(pl.String)).filter(pending).list.len()
            newlines = rows.get_column("text").str.count_matches("\n", literal=True)
            # a row still kept has a non-blank line, hence at least one word
            list_drop = ((newlines / n_words) > self.new_line_ratio).to_numpy()
            if list_drop.any():
                reasons = reasons.scatter(rows.get_column("row").to_numpy()[list_drop], "list_ratio")
        return FastVerdicts(reasons=reasons.to_arrow().cast(pa.string()))

    def _stop_pattern(self) -> str | None:
        """A regex matching a line that ends with one of the stop characters (None: nothing does)."""
        stops = code_points(TERMINAL_PUNCTUATION_RANGES) if self.stop_chars is None else list(self.stop_chars)
        if "" in stops:  # str.endswith("") is always true
            return ""
        if not stops:
            return None
        return "(?:" + "|".join(re.escape(s) for s in sorted(stops, key=len, reverse=True)) + r")\z"

    def _line_measures(self, frame):
        """Per row with a non-blank line: lines, lines ending a sentence, short lines, duplicated chars."""
        import polars as pl

        lines = (frame.select("row", line=pl.col("text").str.split("\n")).explode("line")
                 .filter(pl.col("line").str.contains(f"[^{SPACE_CLASS}]")))
        stop = self._stop_pattern()
        ends = pl.lit(False) if stop is None else pl.lit(True) if stop == "" else pl.col("line").str.contains(stop)
        lines = lines.with_columns(punct=ends, length=pl.col("line").str.len_chars())
        per_line = lines.group_by("row", "line").agg(
            count=pl.len(), punct=pl.col("punct").first(), length=pl.col("length").first())
        return per_line.group_by("row").agg(
            n_lines=pl.col("count").sum(),
            n_punct=(pl.col("count") * pl.col("punct")).sum(),
            n_short=(pl.col("count") * (pl.col("length") <= self.short_line_length)).sum(),
            dup_chars=((pl.col("count") - 1) * pl.col("length")).sum(),
        )

    def _line_reason(self):
        import polars as pl

        c = pl.col
        n = c("n_lines")
        punct = c("n_punct") / n
        chars = c("text").str.len_chars() - c("text").str.count_matches("\n", literal=True)
        punct_fails = (punct < self.line_punct_thr) & ~((punct == 0) & pl.lit(self.line_punct_exclude_zero))
        return (pl.when(n == 0).then(pl.lit("empty"))
                .when(punct_fails).then(pl.lit("line_punct_ratio"))
                .when(c("n_short") / n > self.short_line_thr).then(pl.lit("short_line_ratio"))
                .when(c("dup_chars") / chars > self.char_duplicates_ratio).then(pl.lit("char_dup_ratio"))
                .otherwise(pl.lit(None, dtype=pl.String)).alias("reason"))

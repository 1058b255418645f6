"""``gopher_quality`` with ``engine: fast``: datatrove's Gopher quality rules on a whole Arrow column.

Given the same words, every rule is datatrove's, in datatrove's order, with its reason strings:

* the words are the spaCy-like tokens of :func:`filters.text_words.word_lists`; a *non-symbol* word has
  at least one character outside datatrove's punctuation set;
* ``gopher_short_doc`` / ``gopher_long_doc``: the number of non-symbol words;
* ``gopher_below_avg_threshold`` / ``gopher_above_avg_threshold``: the mean length (characters) of the
  non-symbol words;
* ``gopher_too_many_hashes`` / ``gopher_too_many_ellipsis``: ``#`` characters, and ``...`` plus ``…``
  occurrences (non-overlapping, in the raw text), per word (all words);
* ``gopher_too_many_bullets`` / ``gopher_too_many_end_ellipsis``: the share of lines (Python's
  ``splitlines``: ``\\n``, ``\\r\\n``, ``\\r`` and the other Unicode line breaks) whose text after
  leading whitespace starts with ``•`` or ``-``, or whose text before trailing whitespace ends with
  ``...`` or ``…``;
* ``gopher_below_alpha_threshold``: the share of words with at least one letter;
* ``gopher_enough_stop_words``: how many *distinct* stop words (case-sensitive) occur among the words.

A bound that is ``None`` or ``0`` is off, as in datatrove. Where datatrove would divide by zero (a text
without any word or line, reachable only when ``min_doc_words`` is off) that ratio rule does not fire.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from filters.datatrove_adapter import FastRule, FastVerdicts
from filters.text_words import PUNCTUATION_RANGES, char_class, word_lists

#: datatrove's default stop words for the Gopher rule.
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
#: Python's ``str.splitlines`` boundaries, turned into ``\n`` before lines are counted.
LINE_BREAKS = r"\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\x{2028}\x{2029}]"
#: Whitespace inside a line (Python's ``str.isspace`` set without the line breaks).
_INLINE_SPACE = r"(?:[^\S\n]|\x1f)"


@dataclass
class FastGopherQuality(FastRule):
    """The Gopher quality rules; the fields mirror ``datatrove.pipeline.filters.GopherQualityFilter``."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: tuple[str, ...] | None = None

    def verdicts(self, texts: pa.Array, words=None) -> FastVerdicts:
        """Reasons for every row. ``words`` (a polars list Series or a list of word lists, one per row)
        replaces the fast word splitting, e.g. with datatrove's own words to check the rules alone."""
        import polars as pl

        text = pl.from_arrow(texts).cast(pl.String).fill_null("")
        if words is None:
            words = word_lists(texts)
        words = pl.Series("words", words, dtype=pl.List(pl.String))
        frame = pl.DataFrame({"text": text, "words": words}).with_columns(self._measures())
        reasons = frame.select(self._reason()).to_series()
        return FastVerdicts(reasons=reasons.to_arrow().cast(pa.string()))

    def _measures(self) -> list:
        import polars as pl

        words, text = pl.col("words"), pl.col("text")
        non_symbol = pl.element().str.contains(f"[^{char_class(PUNCTUATION_RANGES)}]")
        stops = pl.Series(list(GOPHER_STOP_WORDS if self.stop_words is None else self.stop_words), dtype=pl.String)
        lines = text.str.replace_all(LINE_BREAKS, "\n")
        n_breaks = lines.str.count_matches("\n", literal=True)
        return [
            words.list.len().alias("n_words"),
            words.list.eval(non_symbol).list.sum().alias("n_non_symbol"),
            words.list.eval(pl.element().str.len_chars() * non_symbol).list.sum().alias("non_symbol_chars"),
            words.list.eval(pl.element().str.contains(r"\p{L}")).list.sum().alias("n_alpha"),
            words.list.eval(pl.element().filter(pl.element().is_in(stops.implode())).n_unique())
            .list.first().fill_null(0).alias("n_stop"),
            text.str.count_matches("#", literal=True).alias("hashes"),
            (text.str.count_matches(r"\.\.\.") + text.str.count_matches("…", literal=True)).alias("ellipses"),
            (pl.when(text == "").then(0).when(lines.str.ends_with("\n")).then(n_breaks).otherwise(n_breaks + 1)
             .alias("n_lines")),
            lines.str.count_matches(rf"(?m)^{_INLINE_SPACE}*[•\-]").alias("bullet_lines"),
            lines.str.count_matches(rf"(?m)(?:\.\.\.|…){_INLINE_SPACE}*$").alias("ellipsis_lines"),
        ]

    def _reason(self):
        import polars as pl

        c = pl.col
        n_words, n_lines = c("n_words"), c("n_lines")
        mean = c("non_symbol_chars") / c("n_non_symbol")
        has_mean = c("n_non_symbol") > 0  # datatrove's mean of no words is NaN: no comparison holds
        checks = [
            (self.min_doc_words, c("n_non_symbol") < (self.min_doc_words or 0), "gopher_short_doc"),
            (self.max_doc_words, c("n_non_symbol") > (self.max_doc_words or 0), "gopher_long_doc"),
            (self.min_avg_word_length, has_mean & (mean < (self.min_avg_word_length or 0)),
             "gopher_below_avg_threshold"),
            (self.max_avg_word_length, has_mean & (mean > (self.max_avg_word_length or 0)),
             "gopher_above_avg_threshold"),
            (self.max_symbol_word_ratio, (n_words > 0) & (c("hashes") / n_words > (self.max_symbol_word_ratio or 0)),
             "gopher_too_many_hashes"),
            (self.max_symbol_word_ratio,
             (n_words > 0) & (c("ellipses") / n_words > (self.max_symbol_word_ratio or 0)),
             "gopher_too_many_ellipsis"),
            (self.max_bullet_lines_ratio,
             (n_lines > 0) & (c("bullet_lines") / n_lines > (self.max_bullet_lines_ratio or 0)),
             "gopher_too_many_bullets"),
            (self.max_ellipsis_lines_ratio,
             (n_lines > 0) & (c("ellipsis_lines") / n_lines > (self.max_ellipsis_lines_ratio or 0)),
             "gopher_too_many_end_ellipsis"),
            (self.max_non_alpha_words_ratio,
             (n_words > 0) & (c("n_alpha") / n_words < (self.max_non_alpha_words_ratio or 0)),
             "gopher_below_alpha_threshold"),
            (self.min_stop_words, c("n_stop") < (self.min_stop_words or 0), "gopher_enough_stop_words"),
        ]
        expr = None
        for bound, fails, reason in checks:
            if not bound:  # datatrove skips a rule whose bound is None or 0
                continue
            expr = (pl.when(fails) if expr is None else expr.when(fails)).then(pl.lit(reason))
        if expr is None:
            return pl.lit(None, dtype=pl.String).alias("reason")
        return expr.otherwise(pl.lit(None, dtype=pl.String)).alias("reason")

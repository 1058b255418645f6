"""``gopher_repetition``: datatrove's Gopher repetition rules, parameters exposed.

Drops a document whose duplicated lines or paragraphs (by count or by characters) pass the given
fractions, whose most frequent 2/3/4-gram covers too many characters (``top_n_grams``), or whose
duplicated 5…10-grams cover too many characters (``dup_n_grams``). Reasons are datatrove's
(``dup_line_frac``, ``top_2_gram``, ``duplicated_5_n_grams`` …).
"""

from __future__ import annotations

from pydantic import Field

from curate.registry import register_stage
from filters.datatrove_adapter import DatatroveFilter


@register_stage("gopher_repetition")
class GopherRepetition(DatatroveFilter):
    """Gopher repetition heuristics (duplicate lines, paragraphs and n-grams)."""

    class Params(DatatroveFilter.Params):
        dup_line_frac: float | None = Field(0.3, description="largest share of duplicated lines")
        dup_para_frac: float | None = Field(0.3, description="largest share of duplicated paragraphs")
        dup_line_char_frac: float | None = Field(0.2, description="largest share of characters in duplicated lines")
        dup_para_char_frac: float | None = Field(0.2, description="largest share of characters in duplicated paragraphs")
        top_n_grams: list[tuple[int, float]] = Field(
            [(2, 0.2), (3, 0.18), (4, 0.16)], description="(n, largest character share of the top n-gram)")
        dup_n_grams: list[tuple[int, float]] = Field(
            [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)],
            description="(n, largest character share of duplicated n-grams)")

    datatrove_class = "GopherRepetitionFilter"

    def fast_rule(self):
        """``engine: fast``: the same checks vectorized (``filters/fast_gopher_repetition.py``)."""
        from filters.fast_gopher_repetition import FastGopherRepetition

        p = self.params
        return FastGopherRepetition(
            dup_line_frac=p.dup_line_frac, dup_para_frac=p.dup_para_frac, dup_line_char_frac=p.dup_line_char_frac,
            dup_para_char_frac=p.dup_para_char_frac, top_n_grams=p.top_n_grams, dup_n_grams=p.dup_n_grams)

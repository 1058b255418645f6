"""``fineweb_quality``: datatrove's FineWeb quality rules (Penedo et al. 2024), parameters exposed.

Drops a document when too few lines end in terminal punctuation (``line_punct_ratio``), too many lines
are short (``short_line_ratio``), too many characters sit in duplicated lines (``char_dup_ratio``) or
there are too many newlines per word (``list_ratio``).
"""

from __future__ import annotations

from pydantic import Field

from curate.registry import register_stage
from filters.datatrove_adapter import DatatroveFilter


@register_stage("fineweb_quality")
class FineWebQuality(DatatroveFilter):
    """FineWeb line-punctuation, short-line, duplicate-line and list-ratio rules."""

    class Params(DatatroveFilter.Params):
        line_punct_thr: float = Field(0.12, description="smallest share of lines ending in terminal punctuation")
        line_punct_exclude_zero: bool = Field(False, description="keep documents where no line ends so")
        stop_chars: list[str] | None = Field(None, description="terminal punctuation (default: datatrove's)")
        short_line_thr: float = Field(0.67, description="largest share of short lines")
        short_line_length: int = Field(30, description="a line this long or shorter is short")
        char_duplicates_ratio: float = Field(0.01, description="largest share of characters in duplicated lines")
        new_line_ratio: float = Field(0.3, description="most newlines per word")

    datatrove_class = "FineWebQualityFilter"

    def fast_rule(self):
        """The same rules vectorized (``engine: fast``); see ``filters/fast_fineweb.py``."""
        from filters.fast_fineweb import FastFineWebQuality
        from filters.gopher_quality import _english_only

        _english_only(self.params.language)
        p = self.params
        return FastFineWebQuality(
            line_punct_thr=p.line_punct_thr, line_punct_exclude_zero=p.line_punct_exclude_zero,
            stop_chars=None if p.stop_chars is None else tuple(p.stop_chars),
            short_line_thr=p.short_line_thr, short_line_length=p.short_line_length,
            char_duplicates_ratio=p.char_duplicates_ratio, new_line_ratio=p.new_line_ratio)

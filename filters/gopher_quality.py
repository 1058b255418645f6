"""``gopher_quality``: datatrove's Gopher quality rules (Rae et al. 2021), parameters exposed.

Drops a document with too few/many words, a mean word length outside [3, 10], too many symbols
(``#``, ``...``) per word, mostly bullet lines or lines ending in an ellipsis, too few words with a
letter, or fewer than two English stop words. Reasons are datatrove's (``gopher_short_doc``,
``gopher_below_alpha_threshold`` …). Set any bound to ``null`` to turn that rule off.
"""

from __future__ import annotations

from pydantic import Field

from curate.registry import register_stage
from filters.datatrove_adapter import DatatroveFilter


@register_stage("gopher_quality")
class GopherQuality(DatatroveFilter):
    """Gopher quality heuristics (word counts, word length, symbols, bullets, stop words)."""

    class Params(DatatroveFilter.Params):
        min_doc_words: int | None = Field(50, description="fewest words")
        max_doc_words: int | None = Field(100_000, description="most words")
        min_avg_word_length: float | None = Field(3, description="smallest mean word length")
        max_avg_word_length: float | None = Field(10, description="largest mean word length")
        max_symbol_word_ratio: float | None = Field(0.1, description="most '#' and '...' per word")
        max_bullet_lines_ratio: float | None = Field(0.9, description="largest share of lines starting with a bullet")
        max_ellipsis_lines_ratio: float | None = Field(0.3, description="largest share of lines ending in an ellipsis")
        max_non_alpha_words_ratio: float | None = Field(0.8, description="smallest share of words with a letter (as datatrove names it)")
        min_stop_words: int | None = Field(2, description="fewest stop words")
        stop_words: list[str] | None = Field(None, description="stop-word list (default: Gopher's English list)")

    datatrove_class = "GopherQualityFilter"

    def fast_rule(self):
        """The same rules vectorized (``engine: fast``); see ``filters/fast_gopher_quality.py``."""
        from filters.fast_gopher_quality import FastGopherQuality

        _english_only(self.params.language)
        p = self.params
        return FastGopherQuality(
            min_doc_words=p.min_doc_words, max_doc_words=p.max_doc_words,
            min_avg_word_length=p.min_avg_word_length, max_avg_word_length=p.max_avg_word_length,
            max_symbol_word_ratio=p.max_symbol_word_ratio, max_bullet_lines_ratio=p.max_bullet_lines_ratio,
            max_ellipsis_lines_ratio=p.max_ellipsis_lines_ratio,
            max_non_alpha_words_ratio=p.max_non_alpha_words_ratio, min_stop_words=p.min_stop_words,
            stop_words=None if p.stop_words is None else tuple(p.stop_words))


def _english_only(language: str) -> None:
    """The fast engine's word splitting follows spaCy's English tokenizer only."""
    if language != "en":
        raise ValueError(f"engine: fast splits words like spaCy's English tokenizer; language {language!r} "
                         "needs engine: datatrove")

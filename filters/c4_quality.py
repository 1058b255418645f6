"""``c4_quality``: datatrove's C4 rules (Raffel et al. 2020), parameters exposed.

Per line: drop lines with a word longer than ``max_word_length``, without terminal punctuation, with
fewer than ``min_words_per_line`` words, mentioning javascript or a cookie/terms policy; remove
citation marks like ``[1]``. Per document: drop it when it holds "lorem ipsum" or a curly bracket, or
keeps fewer than ``min_num_sentences`` sentences. Kept documents get the cleaned text (C4's behaviour);
line-level counts go to the stage's metrics.

``engine: fast`` (``filters/fast_c4.py``) computes the same rules over the whole column with polars:
verdicts, reasons, rewritten texts and line counters as datatrove's, except that the sentence count
is a regular-expression model of spaCy's sentencizer (see ``docs/filters/quality.md``). It supports
``split_paragraph: true`` only; ``split_paragraph: false`` (spaCy sentences as lines) needs
``engine: datatrove``, and the manifest is refused with a message saying so.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from curate.registry import register_stage
from filters.datatrove_adapter import DatatroveFilter, FastRule


@register_stage("c4_quality")
class C4Quality(DatatroveFilter):
    """C4 line cleaning and document rules (terminal punctuation, sentences, javascript, policy)."""

    class Params(DatatroveFilter.Params):
        split_paragraph: bool = Field(True, description="lines are newline-separated (false: split into sentences)")
        remove_citations: bool = Field(True, description="strip citation marks like [1]")
        filter_no_terminal_punct: bool = Field(True, description="drop lines without terminal punctuation")
        min_num_sentences: int = Field(5, description="fewest sentences a kept document has (-1: off)")
        min_words_per_line: int = Field(3, description="drop lines with fewer words (-1: off)")
        max_word_length: int = Field(1000, description="drop lines with a longer word (-1: off)")
        filter_lorem_ipsum: bool = Field(True, description="drop documents with 'lorem ipsum'")
        filter_javascript: bool = Field(True, description="drop lines mentioning javascript")
        filter_curly_bracket: bool = Field(True, description="drop documents with a curly bracket")
        filter_policy: bool = Field(True, description="drop lines about terms of use, cookies, privacy policy")

        @model_validator(mode="after")
        def _fast_needs_paragraphs(self):
            if self.engine == "fast" and not self.split_paragraph:
                raise ValueError("engine: fast supports split_paragraph: true only (lines split on line breaks); "
                                 "with split_paragraph: false datatrove splits the text into spaCy sentences, "
                                 "which the fast engine does not reproduce: use engine: datatrove")
            return self

    datatrove_class = "C4QualityFilter"
    rewrites_text: ClassVar[bool] = True

    def fast_rule(self) -> FastRule:
        """The vectorized C4 rules (``filters/fast_c4.py``) with this stage's parameters."""
        from filters.fast_c4 import FastC4Rule

        p = self.params
        return FastC4Rule(
            remove_citations=p.remove_citations, filter_no_terminal_punct=p.filter_no_terminal_punct,
            min_num_sentences=p.min_num_sentences, min_words_per_line=p.min_words_per_line,
            max_word_length=p.max_word_length, filter_lorem_ipsum=p.filter_lorem_ipsum,
            filter_javascript=p.filter_javascript, filter_curly_bracket=p.filter_curly_bracket,
            filter_policy=p.filter_policy)

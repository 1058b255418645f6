"""``c4_quality``: datatrove's C4 rules (Raffel et al. 2020), parameters exposed.

Per line: drop lines with a word longer than ``max_word_length``, without terminal punctuation, with
fewer than ``min_words_per_line`` words, mentioning javascript or a cookie/terms policy; remove
citation marks like ``[1]``. Per document: drop it when it holds "lorem ipsum" or a curly bracket, or
keeps fewer than ``min_num_sentences`` sentences. Kept documents get the cleaned text (C4's behaviour);
line-level counts go to the stage's metrics.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from curate.registry import register_stage
from filters.datatrove_adapter import DatatroveFilter


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

    datatrove_class = "C4QualityFilter"
    rewrites_text: ClassVar[bool] = True

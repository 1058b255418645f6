"""Word splitting for the ``engine: fast`` quality rules: one regular expression, run by polars.

datatrove splits words with spaCy's blank-pipeline tokenizer (per document, in Python). The fast
engine approximates it with :data:`WORD_PATTERN` over a whole column at once: runs of letters, marks,
digits and underscores (joined across inner apostrophes, periods and commas, so ``3.14``, ``U.S``
and ``don't`` stay one token), an ellipsis as one token, and every other non-space character as a
token of its own. Differences from spaCy change a word count by a little on a few documents; the
docs of each filter list them with the measured agreement of verdicts.
"""

from __future__ import annotations

import pyarrow as pa

#: The word pattern (Rust regex syntax, as polars runs it).
WORD_PATTERN = r"[\p{L}\p{M}\p{N}_]+(?:['’.,][\p{L}\p{M}\p{N}_]+)*|\.\.\.+|…|\S"


def word_lists(texts: pa.Array):
    """A polars Series of the words of every text (a list per row; nulls give empty lists)."""
    import polars as pl

    series = pl.from_arrow(texts).cast(pl.String).fill_null("")
    return series.str.extract_all(WORD_PATTERN)

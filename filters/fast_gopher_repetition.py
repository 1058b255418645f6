"""``engine: fast`` for ``gopher_repetition``: datatrove's Gopher repetition rules on a whole column.

Same checks, order, thresholds and reason strings as ``datatrove``'s ``GopherRepetitionFilter``:

1. empty text → ``empty``;
2. paragraphs (the text stripped of Python whitespace, split at runs of two or more ``\\n``): the share
   of paragraphs equal to an earlier one > ``dup_para_frac`` → ``dup_para_frac``; their characters
   / characters of the text > ``dup_para_char_frac`` → ``dup_para_char_frac`` (a threshold of 0 or None
   switches a check off, as in datatrove);
3. lines (the unstripped text split at runs of ``\\n``, so a leading or trailing newline gives an empty
   line): the same two measures → ``dup_line_frac``, ``dup_line_char_frac``;
4. for each ``(n, frac)`` of ``top_n_grams``: len(most frequent space-joined n-gram) × its count / characters
   > frac → ``top_<n>_gram`` (skipped with fewer than n words);
5. for each ``(n, frac)`` of ``dup_n_grams``: characters counted by the greedy duplicate scan / characters
   > frac → ``duplicated_<n>_n_grams``.

Paragraph and line statistics are polars group-bys over the exploded pieces; n-gram statistics are
exact on dictionary-encoded words (``filters/ngram_duplicates.py``, ``filters/ngram_hashes.py``).
Every step runs only on the rows still kept by the steps before it. The one approximation is the
word splitting (``filters/text_words.py``, polars regular expressions instead of spaCy): given
datatrove's own word lists (``words=``) the verdicts are datatrove's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from filters import ngram_duplicates as ng
from filters.datatrove_adapter import FastRule, FastVerdicts
from filters.ngram_hashes import WordStream

#: Every character Python's ``str.strip()`` removes (polars' default strip differs on U+001C…U+001F).
PY_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
#: A paragraph of ``re.split(r"\n{2,}", text.strip())``: non-empty, with single newlines inside only.
PARAGRAPH = r"[^\n]+(?:\n[^\n]+)*"


class FastGopherRepetition(FastRule):
    """datatrove's Gopher repetition filter over an Arrow column (parameters as its constructor's)."""

    def __init__(self, dup_line_frac: float | None = 0.3, dup_para_frac: float | None = 0.3,
                 dup_line_char_frac: float | None = 0.2, dup_para_char_frac: float | None = 0.2,
                 top_n_grams: Sequence[tuple[int, float]] = ((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_n_grams: Sequence[tuple[int, float]] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                                             (9, 0.11), (10, 0.10))):
        self.top_n_grams = [(int(n), float(f)) for n, f in top_n_grams]
        self.dup_n_grams = [(int(n), float(f)) for n, f in dup_n_grams]
        bad = [n for n, _ in self.top_n_grams + self.dup_n_grams if n < 1]
        if bad:
            raise ValueError(f"gopher_repetition: n-gram sizes must be at least 1, got {bad}")
        self.piece_checks = [("dup_para_frac", dup_para_frac), ("dup_para_char_frac", dup_para_char_frac),
                             ("dup_line_frac", dup_line_frac), ("dup_line_char_frac", dup_line_char_frac)]

    def reason_names(self) -> list[str]:
        """Every reason this rule can give, in the order datatrove checks them."""
        return (["empty"] + [name for name, _ in self.piece_checks] + [f"top_{n}_gram" for n, _ in self.top_n_grams]
                + [f"duplicated_{n}_n_grams" for n, _ in self.dup_n_grams])

    def verdicts(self, texts: pa.Array, words=None) -> FastVerdicts:
        """Reasons per row (null = kept). ``words``: optional word lists per row (e.g. datatrove's own),
        used instead of the regular-expression splitting."""
        codes = self.reason_codes(texts, words)
        names = pa.array(self.reason_names(), pa.string())
        indices = pa.array(codes, mask=codes < 0, type=pa.int32())
        return FastVerdicts(reasons=pa.DictionaryArray.from_arrays(indices, names).cast(pa.string()))

    def reason_codes(self, texts: pa.Array, words=None) -> np.ndarray:
        """Per row, the index of its reason in :meth:`reason_names`, or -1 when kept."""
        text = (texts if isinstance(texts, pl.Series) else pl.from_arrow(texts)).cast(pl.String).fill_null("")
        chars = text.str.len_chars().to_numpy().astype(np.int64)
        codes = np.where(chars == 0, 0, -1)
        code = 1
        stats = {}
        for name, frac in self.piece_checks:
            if frac:
                kind = name.split("_")[1]  # "para" or "line"
                if kind not in stats:
                    stats[kind] = _piece_stats(kind, text, codes < 0)
                dups, dup_chars, pieces = stats[kind]
                value = dup_chars / np.maximum(chars, 1) if name.endswith("char_frac") else dups / pieces
                codes = np.where((codes < 0) & (value > frac), code, codes)
            code += 1
        if self.top_n_grams or self.dup_n_grams:
            self._ngram_codes(text, words, chars, codes, code)
        return codes

    def _ngram_codes(self, text: pl.Series, words, chars: np.ndarray, codes: np.ndarray, code: int) -> None:
        """Fill ``codes`` (in place) for the n-gram checks, on the rows still kept."""
        rows = np.flatnonzero(codes < 0)
        if not len(rows):
            return
        stream = WordStream.from_lists(_word_lists(text, words, rows))
        length = chars[rows]
        alive = np.ones(len(rows), dtype=bool)
        checks = [(n, frac, " ") for n, frac in self.top_n_grams] + [(n, frac, "") for n, frac in self.dup_n_grams]
        for n, frac, sep in checks:
            groups = ng.ngram_groups(stream, n, sep, alive)
            if sep:
                value, flagged = ng.top_ngram_chars(stream, groups)
                exact = ng.top_chars_of_words
            else:
                value, flagged = ng.greedy_duplicate_chars(stream, groups)
                exact = ng.duplicate_chars_of_words
            for d in np.flatnonzero(flagged & alive):  # a mixed hash group: measure on the strings
                value[d] = exact(stream.words_of(d), n)
            fail = alive & (value >= 0) & (value / length > frac)  # -1: fewer than n words, check skipped
            codes[rows[fail]] = code
            alive &= ~fail
            code += 1


def _word_lists(text: pl.Series, words, rows: np.ndarray) -> pa.Array:
    """The word lists of ``rows``: from ``words`` when given (one list per row), else the regex split."""
    if words is None:
        from filters.text_words import word_lists

        return word_lists(text.gather(rows).to_arrow()).to_arrow()
    if isinstance(words, pl.Series):
        series = words
    elif isinstance(words, (pa.Array, pa.ChunkedArray)):
        series = pl.from_arrow(words)
    else:
        series = pl.Series(values=list(words), dtype=pl.List(pl.String))
    if len(series) != len(text):
        raise ValueError(f"words: {len(series)} lists for {len(text)} texts")
    return series.gather(rows).cast(pl.List(pl.String)).to_arrow()


def _duplicates(pieces: pl.Series, n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: pieces equal to an earlier piece, their characters, and the piece count."""
    frame = pl.DataFrame({"piece": pieces}).with_row_index("doc")
    counts = frame.select(pl.col("piece").list.len()).to_series().to_numpy().astype(np.int64)
    groups = (frame.explode("piece").drop_nulls("piece").group_by("doc", "piece").len()
              .filter(pl.col("len") > 1)
              .select("doc", extra=pl.col("len") - 1, chars=(pl.col("len") - 1) * pl.col("piece").str.len_chars())
              .group_by("doc").sum())
    dups = np.zeros(n_docs, dtype=np.int64)
    dup_chars = np.zeros(n_docs, dtype=np.int64)
    doc = groups["doc"].to_numpy().astype(np.int64)
    dups[doc] = groups["extra"].to_numpy()
    dup_chars[doc] = groups["chars"].to_numpy()
    return dups, dup_chars, counts


def _piece_stats(kind: str, text: pl.Series, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duplicate paragraphs (``kind="para"``) or lines of the texts at ``rows`` (bool mask), per row.

    Paragraphs: ``re.split(r"\\n{2,}", text.strip())``, i.e. the maximal runs of :data:`PARAGRAPH` in the
    stripped text, and one empty paragraph for a blank text. Lines: ``re.split("\\n+", text)``, i.e.
    the non-empty pieces between newlines, plus an empty first line when the text starts with a newline
    and an empty last one when it ends with one (two such empty lines make one duplicate of no characters).
    """
    part = text.filter(pl.Series(rows))
    if kind == "para":
        pieces = part.str.strip_chars(PY_WHITESPACE).str.extract_all(PARAGRAPH)
    else:
        pieces = part.str.split("\n").list.eval(pl.element().filter(pl.element() != ""))
    dups, dup_chars, counts = _duplicates(pieces, len(part))
    if kind == "para":
        counts = np.maximum(counts, 1)
    else:
        lead = part.str.starts_with("\n").to_numpy()
        trail = part.str.ends_with("\n").to_numpy()
        dups += lead & trail
        counts += lead.astype(np.int64) + trail
    out = (np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows), dtype=np.int64), np.ones(len(rows), dtype=np.int64))
    for full, values in zip(out, (dups, dup_chars, counts), strict=True):
        full[rows] = values
    return out

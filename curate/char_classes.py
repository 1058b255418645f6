"""Per-document character-class counts over a whole Arrow string column, in one pass of numpy.

:func:`class_counts` decodes the column's UTF-8 buffer once to code points (UTF-32), maps each code
point through a table of class bits, and sums the bits per document. It gives what separate regular
expression passes would (``\\p{L}``, ``\\p{Lu}``, ``\\p{N}``, ``\\p{P}``, ``\\s``, ``\\S+`` runs, newlines)
at a fraction of their cost: one decode and a few array reductions instead of one scan per class.

Classes follow the Unicode general categories of Python's :mod:`unicodedata` (letters ``L*``,
upper-case ``Lu``, numbers ``N*``, punctuation ``P*``) and the Unicode ``White_Space`` property for
spaces (the set a regular expression's ``\\s`` matches: tab to carriage return, space, NEL, no-break
space and the Unicode spaces; not the information separators ``\\x1c``–``\\x1f`` that ``str.isspace``
adds). Code points above the Basic Multilingual Plane are classified on demand (they are rare), so a
worker pays ~50 ms once for the table.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LETTER, UPPER, NUMBER, SPACE, PUNCT, NEWLINE = 1, 2, 4, 8, 16, 32

#: Code points with the Unicode White_Space property.
WHITE_SPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                         0x202F, 0x205F, 0x3000])


def _bits(cp: int) -> int:
    category = unicodedata.category(chr(cp))
    bits = 0
    if category[0] == "L":
        bits |= LETTER | (UPPER if category == "Lu" else 0)
    elif category[0] == "N":
        bits |= NUMBER
    elif category[0] == "P":
        bits |= PUNCT
    if cp in WHITE_SPACE:
        bits |= SPACE
    if cp == 0x0A:
        bits |= NEWLINE
    return bits


@lru_cache(maxsize=1)
def _bmp_table() -> np.ndarray:
    return np.fromiter((_bits(cp) for cp in range(0x10000)), dtype=np.uint8, count=0x10000)


#: Texts are measured in slices of about this many characters, to bound the temporaries (~25 bytes a character).
_SLICE_CHARS = 1 << 20
#: Bit set on a character that starts a run of non-space characters (a word, for ``\\S+``).
_WORD_START = 64


def code_points(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(code points as uint32, offsets)``: document ``i`` is ``cps[offsets[i]:offsets[i+1]]``; nulls are empty."""
    texts = _large(texts)
    n = len(texts)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(pc.utf8_length(texts).to_numpy(zero_copy_only=False), out=offsets[1:])
    byte_offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset:texts.offset + n + 1]
    data = texts.buffers()[2]
    raw = memoryview(data)[int(byte_offsets[0]):int(byte_offsets[-1])] if data is not None else b""
    cps = np.frombuffer(str(raw, "utf-8").encode("utf-32-le"), dtype=np.uint32)
    return cps, offsets


def class_bits(cps: np.ndarray) -> np.ndarray:
    """The class bits (``LETTER | UPPER | …``) of every code point."""
    bits = np.take(_bmp_table(), cps, mode="clip")  # code points past the BMP read 0xFFFF's entry (0): fixed below
    astral = np.flatnonzero(cps > 0xFFFF)
    if len(astral):
        values, inverse = np.unique(cps[astral], return_inverse=True)
        bits[astral] = np.array([_bits(int(v)) for v in values], dtype=np.uint8)[inverse]
    return bits


def class_counts(texts: pa.Array) -> dict[str, np.ndarray]:
    """Per document: ``chars``, ``letters``, ``upper``, ``numbers``, ``punct``, ``spaces``, ``newlines``
    and ``words`` (maximal runs of non-space characters), each an int64 array of ``len(texts)``."""
    texts = _large(texts)
    lengths = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    table = np.zeros((len(texts), 128), dtype=np.int64)  # documents × class-bit combinations
    start = 0
    while start < len(texts):
        stop = _slice_end(lengths, start)
        table[start:stop] = _bit_histogram(texts.slice(start, stop - start))
        start = stop
    out = {"chars": lengths}
    columns = np.arange(128)
    for name, bit in (("letters", LETTER), ("upper", UPPER), ("numbers", NUMBER), ("punct", PUNCT),
                      ("spaces", SPACE), ("newlines", NEWLINE), ("words", _WORD_START)):
        out[name] = table[:, (columns & bit) != 0].sum(axis=1)
    return out


def _large(texts) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    return pc.fill_null(texts.cast(pa.large_string()), "")


def _slice_end(lengths: np.ndarray, start: int) -> int:
    """The end of the slice of documents from ``start`` holding about :data:`_SLICE_CHARS` characters (≥ 1 document)."""
    ends = np.cumsum(lengths[start:start + 65536])
    return start + max(1, int(np.searchsorted(ends, _SLICE_CHARS, side="right")))


def _bit_histogram(texts: pa.Array) -> np.ndarray:
    """``(len(texts), 128)`` counts of each combination of class bits (plus the word-start bit) per document."""
    cps, offsets = code_points(texts)
    bits = class_bits(cps)
    solid = (bits & SPACE) == 0
    starts = solid.copy()
    starts[1:] &= ~solid[:-1]
    firsts = offsets[:-1][offsets[:-1] < offsets[1:]]
    starts[firsts] = solid[firsts]  # a document's first character starts a run unless it is a space
    bits |= starts.view(np.uint8) * np.uint8(_WORD_START)
    docs = np.repeat(np.arange(len(texts), dtype=np.int64), np.diff(offsets))
    return np.bincount(docs * 128 + bits, minlength=len(texts) * 128).reshape(len(texts), 128)

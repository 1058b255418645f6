"""Words of many documents as one stream of integer ids, with prefix arrays that hash any n-gram.

:class:`WordStream` dictionary-encodes the words of a batch (exact ids, pyarrow) and keeps, for the
words joined with no separator and with single spaces, prefix arrays of a polynomial hash modulo
2**64 over their UTF-8 bytes. Because ``hash(x + y) = hash(x) * BASE ** len(y) + hash(y)``, the hash
of ``sep.join(words[p:p + n]) + sep`` is two lookups and a multiplication for every ``p`` at once.
Equal strings always get equal hashes; unequal strings almost never do, and ``filters/ngram_duplicates.py``
checks every group word by word, so a hash only decides speed, never a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_rng = np.random.default_rng(20240613)
#: A random odd 64-bit value per byte: the "letters" of the polynomial hash.
_BYTE_VALUES = _rng.integers(0, 2**63, 256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
#: The hash's base (odd, so invertible modulo 2**64) and its inverse.
_BASE = int(_rng.integers(0, 2**62)) * 2 + 1
_BASE_INV = pow(_BASE, -1, 2**64)
#: Mixes the document index into a key, so n-grams group within their document.
_DOC_MIX = np.uint64(int(_rng.integers(0, 2**62)) * 2 + 1)


@dataclass
class _Hashes:
    """Prefix arrays that give the hash of any run of words joined by ``sep`` in two lookups."""

    power_before: np.ndarray  # BASE ** (bytes before word i)
    hash_before: np.ndarray  # sum over words j < i of hash(word_j + sep) * BASE ** -(bytes up to word j's end)


@dataclass
class WordStream:
    """The words of many documents as one flat sequence of integer ids.

    ``wid[i]``: the id of word ``i`` (``vocabulary[wid[i]]`` is its text); ``doc[i]``: its document;
    ``doc_end[d]``: one past the last word of document ``d``; ``room[i]``: words from ``i`` to its
    document's end; ``doc_key[i]``: a per-document term added to hashes so that n-grams group
    within their document; ``chars_before[i]``: characters in the words before ``i`` (length ``len(wid) + 1``).
    ``hashes[sep]`` (``""`` or ``" "``): prefix arrays for hashing n-grams joined by ``sep``.
    """

    wid: np.ndarray
    doc: np.ndarray
    doc_end: np.ndarray
    room: np.ndarray
    doc_key: np.ndarray
    chars_before: np.ndarray
    hashes: dict[str, _Hashes]
    vocabulary: pa.Array

    @classmethod
    def from_lists(cls, lists: pa.Array) -> WordStream:
        """Build from an Arrow list<string> array (one list per document; a null list has no words)."""
        if isinstance(lists, pa.ChunkedArray):
            lists = lists.combine_chunks()
        counts = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(lists)
        if flat.null_count:
            raise ValueError("word lists must not contain null words")
        if len(flat) >= 2**31:
            raise ValueError(f"{len(flat)} words in one batch; use smaller batches (below 2**31 words)")
        encoded = pc.dictionary_encode(flat.cast(pa.large_string()))
        vocabulary = encoded.dictionary
        wid = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        doc = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        doc_end = np.cumsum(counts)
        word_chars = pc.utf8_length(vocabulary).to_numpy(zero_copy_only=False).astype(np.int64)
        word_hash, word_bytes = _word_hashes(vocabulary)
        space = np.uint64(int(_BYTE_VALUES[ord(" ")]) * _BASE % 2**64)
        hashes = {"": _hashes(word_hash[wid], word_bytes[wid]),
                  " ": _hashes(word_hash[wid] * np.uint64(_BASE) + space, word_bytes[wid] + 1)}
        return cls(wid=wid, doc=doc, doc_end=doc_end, room=doc_end[doc] - np.arange(len(wid)),
                   doc_key=doc.astype(np.uint64) * _DOC_MIX, chars_before=_prefix_sum(word_chars[wid]),
                   hashes=hashes, vocabulary=vocabulary)

    @property
    def n_docs(self) -> int:
        return len(self.doc_end)

    def words_of(self, d: int) -> list[str]:
        """The words of document ``d`` as strings."""
        start = self.doc_end[d - 1] if d else 0
        return self.vocabulary.take(pa.array(self.wid[start:self.doc_end[d]])).to_pylist()


def _prefix_sum(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values) + 1, dtype=values.dtype)
    np.cumsum(values, out=out[1:])
    return out


def _hashes(word_hash: np.ndarray, word_bytes: np.ndarray) -> _Hashes:
    """Prefix arrays over a stream of words with these hashes and byte lengths."""
    bytes_before = _prefix_sum(word_bytes)
    return _Hashes(power_before=_power(_BASE, bytes_before),
                   hash_before=_prefix_sum(word_hash * _power(_BASE_INV, bytes_before[1:])))


@cache
def _power_tables(base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``base ** i``, ``base ** (i << 16)`` and ``base ** (i << 32)`` for i < 65536 (mod 2**64)."""
    tables = []
    for step in (1, 1 << 16, 1 << 32):
        b = pow(base, step, 2**64)
        t = np.ones(1 << 16, dtype=np.uint64)
        for k in range(16):  # t[2**k : 2**(k+1)] = t[: 2**k] * b ** (2**k)
            t[1 << k: 2 << k] = t[: 1 << k] * np.uint64(pow(b, 1 << k, 2**64))
        tables.append(t)
    return tables[0], tables[1], tables[2]


def _power(base: int, exponent: np.ndarray) -> np.ndarray:
    """``base ** exponent`` modulo 2**64, element-wise (exponents below 2**48)."""
    low, mid, high = _power_tables(base)
    e = exponent.astype(np.int64)
    return low[e & 0xFFFF] * mid[(e >> 16) & 0xFFFF] * high[e >> 32]


def _word_hashes(vocabulary: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial hash and UTF-8 byte length of every vocabulary word.

    The hash of bytes ``b_0 … b_{L-1}`` is ``sum v(b_j) * BASE ** (L - j)`` (mod 2**64), so that
    ``hash(x + y) = hash(x) * BASE ** len(y) + hash(y)``, which :class:`_Hashes` relies on.
    """
    vocabulary = vocabulary.cast(pa.large_string())
    _, offsets_buf, data_buf = vocabulary.buffers()
    raw = np.frombuffer(offsets_buf, dtype=np.int64)[vocabulary.offset:vocabulary.offset + len(vocabulary) + 1]
    offsets = raw - raw[0]
    data = np.frombuffer(data_buf, dtype=np.uint8)[raw[0]:raw[-1]] if data_buf is not None else np.zeros(0, np.uint8)
    weighted = _prefix_sum(_BYTE_VALUES[data] * _power(_BASE_INV, np.arange(len(data))))
    hashes = _power(_BASE, offsets[1:]) * (weighted[offsets[1:]] - weighted[offsets[:-1]])
    return hashes, np.diff(offsets)

"""Encode a column of texts word by word, each distinct word once: for tokenizers that allow free cuts.

A SentencePiece-style BPE tokenizer (Llama 2, Mistral … as Hugging Face converts them) runs its merge
loop over a whole text as one word, so the Rust encoder repeats the same work for every occurrence of
every word. Where :func:`curate.tokenizer.free_cuts` proves that a text can be cut before any space that
follows a character other than a space or the metaspace ``▁`` with its ids unchanged, cutting at *every*
such space splits a text into words whose ids, one after the other, are the text's ids. Natural text
repeats its words (a few hundred thousand distinct ones in tens of millions), so :class:`WordMemo`:

1. splits the Arrow column into words with one regular expression (polars, no Python string per word);
2. finds the batch's distinct words (``pyarrow.compute.dictionary_encode``);
3. encodes only the words it has not seen before (the tokenizer's own ``encode_batch_fast``) and keeps
   their ids for later batches (at most :data:`MAX_WORDS` words of at most :data:`CACHE_CHARS` characters;
   then it starts over, so memory stays bounded);
4. gathers every word's ids into each document's ids with numpy.

The ids are exactly the tokenizer's for each whole text (tests check it on hostile texts and on the real
Mistral tokenizer); only the time to get them changes. A word no space breaks that is longer than the
tokenizer's ``split_chars`` goes through the tokenizer's own cutting (:meth:`CurateTokenizer.split`).
"""

from __future__ import annotations

import re
import threading
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Distinct words kept between batches (then the memo starts over).
MAX_WORDS = 1 << 18
#: Words longer than this are encoded for their batch only, never kept.
CACHE_CHARS = 128
#: Text bytes split into words at a time.
SLICE_BYTES = 1 << 22
#: New words encoded per ``encode_batch_fast`` call (each call's result objects take ~1 KB per word).
ENCODE_WORDS = 8192


def word_pattern(meta: str) -> str:
    """A regular expression (Rust/RE2 syntax: no look-behind) whose matches, in order, are ``text``'s
    pieces between free cuts: each cut sits before a space whose previous character is neither a space nor
    ``meta``. A piece starts with any character; after that a space may only follow a space or ``meta``."""
    m = re.escape(meta)
    return f"(?s)(?:[ {m}] *|[^ {m}])(?:[^ ]*{m} +)*[^ ]*"


class WordMemo:
    """Ids of texts by distinct words (see the module docstring). One per tokenizer; thread-safe."""

    def __init__(self, tokenizer, meta: str, drops_cut_space: bool = False):
        self.tok = tokenizer  # a CurateTokenizer whose tokenizer allows free cuts
        self.pattern = word_pattern(meta)
        # The Prepend-normalizer form (curate.tokenizer.drops_cut_space): every non-empty text gets a
        # space in front, so every word starts with one, and a word is encoded without that space (the
        # normalizer adds the metaspace back); a lone space is the metaspace token itself.
        self.drops = drops_cut_space
        self.meta_id = tokenizer.tk.token_to_id(meta)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, int] = {}  # kept word -> its number
        self._starts = np.zeros(0, np.int64)  # where kept word k's ids start in _store
        self._lengths = np.zeros(0, np.int64)
        self._store = np.zeros(0, np.int32)

    def encode(self, texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, ids)`` of ``texts`` (no nulls): text ``i``'s ids are ``ids[offsets[i]:offsets[i+1]]``.

        Texts are taken in slices of about :data:`SLICE_BYTES` (whole texts), so the per-word arrays in
        between stay small whatever the batch size.
        """
        texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
        if pa.types.is_string_view(texts.type):  # no length kernel for views
            texts = texts.cast(pa.large_string())
        sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
        bounds = [0]
        for end in np.flatnonzero(np.diff(np.cumsum(sizes) // SLICE_BYTES)) + 1:
            bounds.append(int(end))
        bounds.append(len(texts))
        parts = [self._encode_slice(texts.slice(a, b - a)) for a, b in zip(bounds, bounds[1:]) if b > a]
        offsets = np.zeros(len(texts) + 1, np.int64)
        at, row = 0, 0
        for part_offsets, part_ids in parts:
            offsets[row + 1:row + len(part_offsets)] = part_offsets[1:] + at
            row += len(part_offsets) - 1
            at += len(part_ids)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
        return offsets, ids

    def _encode_slice(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        import polars as pl

        series = pl.Series(texts)
        if self.drops:
            series = pl.select(pl.when(series.str.len_bytes() > 0).then(pl.lit(" ") + series)
                               .otherwise(series)).to_series()
        words = series.str.extract_all(self.pattern)
        per_text = words.list.len().to_numpy().astype(np.int64, copy=False)
        flat = words.explode().drop_nulls().to_arrow()
        del words
        if isinstance(flat, pa.ChunkedArray):
            flat = flat.combine_chunks()
        if len(flat) == 0:
            return np.zeros(len(per_text) + 1, np.int64), np.zeros(0, np.int32)
        coded = pc.dictionary_encode(flat)
        del flat
        with self._lock:
            starts, lengths, source = self._lookup(coded.dictionary)
        index = coded.indices.to_numpy()
        lens = lengths[index]
        word_ends = np.cumsum(lens)
        total = int(word_ends[-1])
        # token t of word w is source[starts[w] + (t - first token of w)]
        kind = np.int32 if len(source) + total < 2**31 else np.int64  # half the memory for the gather
        gather = np.repeat((starts[index] - (word_ends - lens)).astype(kind), lens)
        gather += np.arange(total, dtype=kind)
        ids = source[gather]
        del gather
        offsets = np.zeros(len(per_text) + 1, np.int64)
        ends = np.cumsum(per_text)
        has_words = ends > 0
        offsets[1:][has_words] = word_ends[ends[has_words] - 1]
        return offsets, ids

    def _lookup(self, distinct: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, lengths, source)``: where each distinct word's ids lie in ``source``."""
        words = distinct.to_pylist()
        get = self._index.get
        where = np.fromiter((get(w, -1) for w in words), np.int64, len(words))
        missing = where < 0
        known = np.where(missing, 0, where)
        starts = self._starts[known] if len(self._starts) else np.zeros(len(known), np.int64)
        lengths = self._lengths[known] if len(self._lengths) else np.zeros(len(known), np.int64)
        if not missing.any():
            return starts, lengths, self._store
        new = np.flatnonzero(missing)
        texts = [words[k] for k in new]
        encoded = self._encode_words(texts)
        new_lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        new_ids = np.fromiter(chain.from_iterable(encoded), np.int32, int(new_lengths.sum()))
        new_starts = len(self._store) + np.concatenate(([0], np.cumsum(new_lengths)[:-1]))
        source = np.concatenate((self._store, new_ids))
        starts[new], lengths[new] = new_starts, new_lengths
        kept = [k for k, t in enumerate(texts) if len(t) <= CACHE_CHARS]
        if len(self._index) + len(kept) > MAX_WORDS:
            self._reset()
        elif kept:  # the kept words join the memo; the others lie in ``source`` for this batch only
            first = len(self._starts)
            self._index.update((texts[k], first + n) for n, k in enumerate(kept))
            self._starts = np.concatenate((self._starts, new_starts[kept]))
            self._lengths = np.concatenate((self._lengths, new_lengths[kept]))
            self._store = source
        return starts, lengths, source

    def _encode_words(self, words: list[str]) -> list[list[int]]:
        """Ids of each word: short ones in one ``encode_batch_fast`` call, long ones cut as the tokenizer does."""
        if self.drops:
            lone = [k for k, w in enumerate(words) if w == " "]
            out = self._encode_texts([w[1:] if w != " " else "" for w in words])
            for k in lone:
                out[k] = [self.meta_id]
            return out
        return self._encode_texts(words)

    def _encode_texts(self, words: list[str]) -> list[list[int]]:
        out: list = [None] * len(words)
        short = [k for k, w in enumerate(words) if len(w) <= self.tok.split_chars]
        for at in range(0, len(short), ENCODE_WORDS):  # the encoder's result objects are large: a few at a time
            group = short[at:at + ENCODE_WORDS]
            for k, enc in zip(group, self.tok._encode([words[k] for k in group]), strict=True):
                out[k] = enc.ids
        if len(short) < len(words):
            long = [k for k, w in enumerate(words) if len(w) > self.tok.split_chars]
            for k, ids in zip(long, self.tok.encode_arrays([words[k] for k in long]), strict=True):
                out[k] = ids.tolist()
        return out

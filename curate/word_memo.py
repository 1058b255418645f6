"""Encode a column of texts word by word, each distinct word once: for tokenizers that allow free cuts.

A SentencePiece-style BPE tokenizer (Llama 2, Mistral … as Hugging Face converts them) runs its merge
loop over a whole text as one word, so the Rust encoder repeats the same work for every occurrence of
every word. Where :func:`curate.tokenizer.free_cuts` proves that a text can be cut before any space that
follows a character other than a space or the metaspace ``▁`` with its ids unchanged, cutting at *every*
such space splits a text into words whose ids, one after the other, are the text's ids. Natural text
repeats its words (a few hundred thousand distinct ones in tens of millions), so :class:`WordMemo`:

1. finds the words in the Arrow column's UTF-8 buffer with numpy (a cut is a space byte whose previous
   character, in the same text, is neither a space nor the metaspace) and views them as an Arrow string
   array over the same buffer — no copy, no Python string per word;
2. finds each slice's distinct words (``pyarrow.compute.dictionary_encode``);
3. encodes only the words it has not seen before — joined into strings of ~2,000 characters (each join
   is a free cut), one encoder call for many words, the ids split back at the words' ends by the bytes
   each token stands for — and keeps their ids for later batches (at most :data:`MAX_WORDS` words of
   at most :data:`CACHE_CHARS` characters; then it starts over, so memory stays bounded);
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

#: Distinct words kept between batches, and ids held for them (then the memo starts over).
MAX_WORDS = 1 << 18
MAX_STORE = 1 << 22
#: Words longer than this are encoded for their batch only, never kept.
CACHE_CHARS = 128
#: Text bytes split into words at a time.
SLICE_BYTES = 1 << 22
#: Characters of new words joined into one encoder input.
JOIN_CHARS = 2000
#: New words encoded per ``encode_batch_fast`` call (each call's result objects take ~1 KB per word).
ENCODE_WORDS = 8192


class WordMemo:
    """Ids of texts by distinct words (see the module docstring). One per tokenizer; thread-safe."""

    def __init__(self, tokenizer, meta: str, drops_cut_space: bool = False):
        self.tok = tokenizer  # a CurateTokenizer whose tokenizer allows free cuts
        self.meta = np.frombuffer(meta.encode(), np.uint8)
        self.meta_char = meta
        self._token_bytes = _token_bytes(tokenizer.tk)
        # The Prepend-normalizer form (curate.tokenizer.drops_cut_space): a word after a cut is encoded
        # without its first space (the normalizer adds the metaspace back; a lone space is the metaspace
        # token itself), a text's first word as it is — so first words have their own memo.
        self.drops = drops_cut_space
        self.meta_id = tokenizer.tk.token_to_id(meta)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._index: dict[str, int] = {}  # kept word -> its number k
        self._first: dict[str, int] = {}  # the same for texts' first words (drops form only)
        self._starts = np.zeros(0, np.int64)  # where word k's ids start in _store
        self._lengths = np.zeros(0, np.int64)
        self._store = np.zeros(0, np.int32)  # every id encoded since the last reset

    def encode(self, texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, ids)`` of ``texts`` (no nulls): text ``i``'s ids are ``ids[offsets[i]:offsets[i+1]]``.

        Texts are taken in slices of about :data:`SLICE_BYTES` (whole texts), so the per-word arrays in
        between stay small whatever the batch size.
        """
        if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)) or \
                (isinstance(texts, pa.ChunkedArray) and texts.num_chunks > 1):
            texts = texts.cast(pa.large_string())  # string views, and chunks that may join past 2 GB
        texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
        offsets = _value_offsets(texts)
        bounds = [0]
        for end in np.flatnonzero(np.diff((offsets[1:] - offsets[0]) // SLICE_BYTES)) + 1:
            bounds.append(int(end))
        bounds.append(len(texts))
        parts = [self._encode_slice(texts.slice(a, b - a)) for a, b in zip(bounds, bounds[1:]) if b > a]
        out = np.zeros(len(texts) + 1, np.int64)
        at, row = 0, 0
        for part_offsets, part_ids in parts:
            out[row + 1:row + len(part_offsets)] = part_offsets[1:] + at
            row += len(part_offsets) - 1
            at += len(part_ids)
        ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
        return out, ids

    def _encode_slice(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        offsets = _value_offsets(texts)
        lo, hi = int(offsets[0]), int(offsets[-1])
        if hi == lo:
            return np.zeros(len(texts) + 1, np.int64), np.zeros(0, np.int32)
        data = texts.buffers()[2]
        bounds, first = self._word_bounds(np.frombuffer(data, np.uint8, hi - lo, lo), offsets - lo)
        words = pa.LargeStringArray.from_buffers(len(bounds), pa.py_buffer(np.append(bounds, hi - lo) + lo), data)
        per_text = np.diff(np.searchsorted(bounds, offsets - lo))
        word_starts = np.empty(len(bounds), np.int64)
        word_lengths = np.empty(len(bounds), np.int64)
        with self._lock:
            groups = [(np.ones(len(bounds), bool), self._index)]
            if self.drops:
                is_first = np.zeros(len(bounds), bool)
                is_first[first] = True
                groups = [(~is_first, self._index), (is_first, self._first)]
            for mask, index in groups:
                part = words.filter(pa.array(mask)) if len(groups) > 1 else words
                if len(part) == 0:
                    continue
                coded = pc.dictionary_encode(part)
                starts, lengths = self._lookup(coded.dictionary, index, first=index is self._first)
                codes = coded.indices.to_numpy()
                word_starts[mask], word_lengths[mask] = starts[codes], lengths[codes]
            source = self._store
            if len(self._index) + len(self._first) > MAX_WORDS or len(self._store) > MAX_STORE:
                self._reset()
        word_ends = np.cumsum(word_lengths)
        total = int(word_ends[-1])
        # token t of word w is source[starts[w] + (t - first token of w)]
        kind = np.int32 if len(source) + total < 2**31 else np.int64  # half the memory for the gather
        gather = np.repeat((word_starts - (word_ends - word_lengths)).astype(kind), word_lengths)
        gather += np.arange(total, dtype=kind)
        ids = source[gather]
        del gather
        out = np.zeros(len(texts) + 1, np.int64)
        ends = np.cumsum(per_text)
        has_words = ends > 0
        out[1:][has_words] = word_ends[ends[has_words] - 1]
        return out, ids

    def _word_bounds(self, data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte positions where words start in ``data`` (UTF-8 of texts at ``offsets``), and which of
        them are texts' starts: every non-empty text's start, and every space (byte 32) that follows, in
        the same text, a character other than a space or the metaspace."""
        space = np.flatnonzero(data == 32)
        text_start = offsets[np.searchsorted(offsets, space, side="right") - 1]
        cut = space > text_start
        cut &= data[np.maximum(space - 1, 0)] != 32
        k = len(self.meta)
        after_meta = space - k >= text_start
        for j in range(k):
            after_meta &= data[np.maximum(space - k + j, 0)] == self.meta[j]
        cut &= ~after_meta
        starts = offsets[:-1][offsets[1:] > offsets[:-1]]
        bounds = np.concatenate((starts, space[cut]))
        bounds.sort()
        return bounds, np.searchsorted(bounds, starts)

    def _lookup(self, distinct: pa.Array, index: dict[str, int], first: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` in ``_store`` of each distinct word's ids, encoding those ``index`` lacks."""
        words = distinct.to_pylist()
        get = index.get
        where = np.fromiter((get(w, -1) for w in words), np.int64, len(words))
        missing = where < 0
        known = np.where(missing, 0, where)
        starts = self._starts[known] if len(self._starts) else np.zeros(len(known), np.int64)
        lengths = self._lengths[known] if len(self._lengths) else np.zeros(len(known), np.int64)
        if not missing.any():
            return starts, lengths
        new = np.flatnonzero(missing)
        texts = [words[k] for k in new]
        encoded = self._encode_words(texts, first)
        new_lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        new_ids = np.fromiter(chain.from_iterable(encoded), np.int32, int(new_lengths.sum()))
        new_starts = len(self._store) + np.concatenate(([0], np.cumsum(new_lengths)[:-1]))
        self._store = np.concatenate((self._store, new_ids))
        starts[new], lengths[new] = new_starts, new_lengths
        kept = [k for k, t in enumerate(texts) if len(t) <= CACHE_CHARS]
        if kept:  # kept words are found again later; the others' ids are used by this slice only
            base = len(self._starts)
            index.update((texts[k], base + n) for n, k in enumerate(kept))
            self._starts = np.concatenate((self._starts, new_starts[kept]))
            self._lengths = np.concatenate((self._lengths, new_lengths[kept]))
        return starts, lengths

    def _encode_words(self, words: list[str], first: bool) -> list[list[int]]:
        """Ids of each word. Words after a cut (they start with a space and, but for a text's last word,
        end with another character) are joined into strings of about :data:`JOIN_CHARS` characters —
        each join is a free cut — and encoded in one call, each string's ids then split at the words'
        ends (:meth:`_split_joined`); the encoder's cost per call is paid per string, not per word.
        The rest, and any string whose ids cannot be split exactly, are encoded one by one."""
        if first or self._token_bytes is None:
            return self._each(words, first)
        meta = self.meta_char
        out: list = [None] * len(words)
        joinable = [k for k, w in enumerate(words) if w[:1] == " " and w[-1] not in (" ", meta)
                    and len(w) <= CACHE_CHARS]
        groups: list[list[int]] = []
        size = JOIN_CHARS
        for k in joinable:
            if size >= JOIN_CHARS:
                groups.append([])
                size = 0
            groups[-1].append(k)
            size += len(words[k])
        per_call = max(1, ENCODE_WORDS // 64)  # bounded result objects, as in _each
        for at in range(0, len(groups), per_call):
            chunk = groups[at:at + per_call]
            strings = ["".join(words[k] for k in g) for g in chunk]
            if self.drops:  # the normalizer puts the first space back as its prefix
                strings = [t[1:] for t in strings]
            for g, enc in zip(chunk, self.tok._encode(strings), strict=True):
                parts = self._split_joined(enc.ids, [words[k] for k in g])
                if parts is not None:
                    for k, ids in zip(g, parts, strict=True):
                        out[k] = ids
        rest = [k for k, ids in enumerate(out) if ids is None]
        for k, ids in zip(rest, self._each([words[k] for k in rest], first), strict=True):
            out[k] = ids
        return out

    def _split_joined(self, ids: list[int], words: list[str]) -> list[list[int]] | None:
        """``ids`` of the joined ``words`` split word by word, by the bytes each token stands for in the
        normalized text (spaces as the metaspace); None unless every word ends exactly where a token does
        (an unknown token, a length that does not add up)."""
        arr = np.asarray(ids, np.int64)
        sizes = self._token_bytes[arr]
        if (sizes <= 0).any():
            return None
        ends = np.cumsum(sizes)
        extra = len(self.meta) - 1
        word_ends = np.cumsum([len(w.encode()) + extra * w.count(" ") for w in words])
        if ends[-1] != word_ends[-1]:
            return None
        cut = np.searchsorted(ends, word_ends)
        if not np.array_equal(ends[cut], word_ends):
            return None
        bounds = np.concatenate(([0], cut + 1)).tolist()
        return [ids[a:b] for a, b in zip(bounds, bounds[1:])]

    def _each(self, words: list[str], first: bool) -> list[list[int]]:
        """Ids of each word, one encoder input per word."""
        if not self.drops or first:
            return self._encode_texts(words)
        out = self._encode_texts([w[1:] for w in words])  # every word after a cut starts with its space
        for k, w in enumerate(words):
            if w == " ":
                out[k] = [self.meta_id]
        return out

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


def _value_offsets(texts: pa.Array) -> np.ndarray:
    """The byte offsets (int64, ``len + 1``) of a string or large_string array's values in its data buffer."""
    kind = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    raw = np.frombuffer(texts.buffers()[1], kind, len(texts) + 1, texts.offset * np.dtype(kind).itemsize)
    return raw.astype(np.int64)


def _token_bytes(tk) -> np.ndarray | None:
    """For each token id, the UTF-8 bytes it stands for in the normalized text (a byte-fallback token
    ``<0xNN>``: 1); 0 for ids whose extent is not known (unknown token, added tokens, unused ids).
    None for a model whose pieces are not like that (not BPE)."""
    from tokenizers import models

    if not isinstance(tk.model, models.BPE):
        return None
    vocab = tk.get_vocab(with_added_tokens=False)
    out = np.zeros(max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=0) + 1), np.int64)
    byte_token = re.compile(r"<0x[0-9A-F]{2}>")
    fallback = bool(getattr(tk.model, "byte_fallback", False))
    unk = getattr(tk.model, "unk_token", None)
    for token, i in vocab.items():
        if token == unk:
            continue
        out[i] = 1 if fallback and byte_token.fullmatch(token) else len(token.encode())
    for i in tk.get_added_tokens_decoder():
        if i < len(out):
            out[i] = 0
    return out

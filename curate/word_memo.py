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
3. encodes only the words it has not seen before — joined into strings of ~2,000 bytes (each join
   is a free cut), one encoder call for many words, the ids split back at the words' ends by the bytes
   each token stands for — and keeps their ids for later batches (at most :data:`MAX_WORDS` words of
   at most :data:`CACHE_CHARS` characters; then it keeps the half met most often, so memory stays bounded);
4. gathers every word's ids into each document's ids with numpy.

The ids are exactly the tokenizer's for each whole text (tests check it on hostile texts and on the real
Mistral tokenizer); only the time to get them changes. A word no space breaks that is longer than the
tokenizer's ``split_chars`` goes through the tokenizer's own cutting (:meth:`CurateTokenizer.split`).
"""

from __future__ import annotations

import re
import threading
from itertools import chain, compress, repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Distinct words kept between batches, and ids held for them (then the most-met half is kept).
MAX_WORDS = 1 << 18
MAX_STORE = 1 << 22
#: Words longer than this are encoded for their batch only, never kept.
CACHE_CHARS = 128
#: Text bytes split into words at a time.
SLICE_BYTES = 1 << 22
#: Bytes of new words joined into one encoder input.
JOIN_BYTES = 2000
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
        self._hits = np.zeros(0, np.int64)  # how often word k was met (what an eviction keeps)
        self._store = np.zeros(0, np.int32)  # the ids of kept words and of the current slice's new words

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
            groups = [(None, self._index)]
            if self.drops:
                is_first = np.zeros(len(bounds), bool)
                is_first[first] = True
                groups = [(~is_first, self._index), (is_first, self._first)]
            for mask, index in groups:
                part = words if mask is None else words.filter(pa.array(mask))
                if len(part) == 0:
                    continue
                coded = pc.dictionary_encode(part)
                codes = coded.indices.to_numpy()
                counts = np.bincount(codes, minlength=len(coded.dictionary))
                starts, lengths = self._lookup(coded.dictionary, counts, index, first=index is self._first)
                if mask is None:
                    word_starts, word_lengths = starts[codes], lengths[codes]
                else:
                    word_starts[mask], word_lengths[mask] = starts[codes], lengths[codes]
            source = self._store
            if len(self._index) + len(self._first) > MAX_WORDS or len(self._store) > MAX_STORE:
                self._evict()
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
        cut &= ~_ends_with(data, space, self.meta, text_start)
        starts = offsets[:-1][offsets[1:] > offsets[:-1]]
        bounds = np.concatenate((starts, space[cut]))
        bounds.sort(kind="stable")  # two sorted runs: merged in linear time
        return bounds, np.searchsorted(bounds, starts)

    def _lookup(self, distinct: pa.Array, counts: np.ndarray, index: dict[str, int],
                first: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` in ``_store`` of each distinct word's ids (met ``counts`` times in the
        slice), encoding and keeping those ``index`` lacks."""
        words = distinct.to_pylist()
        where = np.fromiter(map(index.get, words, repeat(-1)), np.int64, len(words))
        known = np.flatnonzero(where >= 0)
        starts = np.empty(len(words), np.int64)
        lengths = np.empty(len(words), np.int64)
        numbers = where[known]
        starts[known], lengths[known] = self._starts[numbers], self._lengths[numbers]
        self._hits[numbers] += counts[known]  # distinct words have distinct numbers
        if len(known) == len(words):
            return starts, lengths
        new = np.flatnonzero(where < 0)
        new_words = distinct.take(pa.array(new))
        texts = [words[k] for k in new]
        starts[new], lengths[new] = self._encode_new(new_words, texts, first)
        kept = np.flatnonzero(pc.utf8_length(new_words).to_numpy(zero_copy_only=False) <= CACHE_CHARS)
        if len(kept):  # kept words are found again later; the others' ids serve this slice only
            base = len(self._starts)
            index.update(zip([texts[k] for k in kept], range(base, base + len(kept))))
            self._starts = np.concatenate((self._starts, starts[new[kept]]))
            self._lengths = np.concatenate((self._lengths, lengths[new[kept]]))
            self._hits = np.concatenate((self._hits, counts[new[kept]]))
        return starts, lengths

    def _evict(self) -> None:
        """Keep the most-met words (at most half of :data:`MAX_WORDS`, their ids at most half of
        :data:`MAX_STORE`), renumbered, their ids packed at the start of a new store, their counts
        halved so that words common only long ago fade out."""
        order = np.argsort(-self._hits, kind="stable")
        room = np.searchsorted(np.cumsum(self._lengths[order]), MAX_STORE // 2, side="right")
        keep = np.sort(order[:min(MAX_WORDS // 2, int(room))])
        lengths = self._lengths[keep]
        starts = np.zeros(len(keep), np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        store = self._store[_ranges(self._starts[keep], lengths)]
        number = np.full(len(self._starts), -1, np.int64)
        number[keep] = np.arange(len(keep))
        kept = []
        for index in (self._index, self._first):
            new = number[np.fromiter(index.values(), np.int64, len(index))]
            alive = new >= 0
            kept.append(dict(zip(compress(index, alive), new[alive].tolist())))
        # everything is built before any of it is swapped in: a failure above (out of memory) leaves the
        # memo as it was, never numbers pointing into another store
        hits = self._hits[keep] // 2
        self._index, self._first = kept
        self._store, self._starts, self._lengths, self._hits = store, starts, lengths, hits

    def _encode_new(self, words: pa.Array, texts: list[str], first: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, lengths)`` of the ids of ``words`` (Arrow; ``texts`` the same as str), appended to
        ``_store``. Words after a cut (they start with a space and, but for a text's last word, end with
        another character) are joined into strings of about :data:`JOIN_BYTES` bytes — each join is a free
        cut — encoded in one call and split back at the words' ends (:meth:`_encode_joined`); the
        encoder's cost per call is paid per string, not per word. The rest, and the words of any string
        whose ids cannot be split exactly, are encoded one by one (:meth:`_each`)."""
        starts = np.full(len(texts), -1, np.int64)
        lengths = np.zeros(len(texts), np.int64)
        at = len(self._store)
        pieces = [self._store]
        if not first and self._token_bytes is not None:
            joinable = self._joinable(words)
            if joinable.any():
                where = np.flatnonzero(joinable)
                ids, word_start, word_length, ok = self._encode_joined(words.filter(pa.array(joinable)))
                starts[where[ok]], lengths[where[ok]] = at + word_start[ok], word_length[ok]
                pieces.append(ids)
                at += len(ids)
        rest = np.flatnonzero(starts < 0)
        if len(rest):
            lists = self._each([texts[k] for k in rest], first)
            counts = np.fromiter(map(len, lists), np.int64, len(lists))
            pieces.append(np.fromiter(chain.from_iterable(lists), np.int32, int(counts.sum())))
            starts[rest] = at + np.cumsum(counts) - counts
            lengths[rest] = counts
        self._store = np.concatenate(pieces)
        return starts, lengths

    def _joinable(self, words: pa.Array) -> np.ndarray:
        """Which ``words`` start with a space, end with a character other than a space or the metaspace
        and have at most :data:`CACHE_CHARS` characters (a text's first and last words may not)."""
        offsets = _value_offsets(words)
        data = np.frombuffer(words.buffers()[2], np.uint8)
        ends = offsets[1:]
        out = (ends > offsets[:-1]) & (data[np.minimum(offsets[:-1], len(data) - 1)] == 32)
        out &= data[np.maximum(ends - 1, 0)] != 32
        out &= ~_ends_with(data, ends, self.meta, offsets[:-1])
        out &= pc.utf8_length(words).to_numpy(zero_copy_only=False) <= CACHE_CHARS
        return out

    def _encode_joined(self, words: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Encode joinable ``words`` joined into strings of about :data:`JOIN_BYTES` bytes, and find each
        word's ids among the strings' ids by the bytes each token stands for in the normalized text
        (spaces as the metaspace). Returns ``(ids, starts, lengths, ok)``: the strings' ids one after the
        other, and each word's first id and id count in them — ``ok`` False for the words of a string
        whose ids do not split exactly at every word's end (an unknown token, a length that does not add up)."""
        offsets = _value_offsets(words)
        base = int(offsets[0])
        offsets -= base
        data = np.frombuffer(words.buffers()[2], np.uint8, int(offsets[-1]), base)
        n = len(words)
        group = offsets[:-1] // JOIN_BYTES
        group_first = np.flatnonzero(np.concatenate(([True], group[1:] != group[:-1])))
        group_end = np.append(group_first[1:], n)
        skip = 1 if self.drops else 0  # the normalizer puts a string's first space back as its prefix
        view = memoryview(words.buffers()[2])[base:]
        per_call = max(1, ENCODE_WORDS // 64)  # bounded result objects, as in _each
        lists: list[list[int]] = []
        for at in range(0, len(group_first), per_call):
            strings = [str(view[offsets[a] + skip:offsets[b]], "utf-8")
                       for a, b in zip(group_first[at:at + per_call], group_end[at:at + per_call])]
            lists += [enc.ids for enc in self.tok._encode(strings)]
        counts = np.fromiter(map(len, lists), np.int64, len(lists))
        ids = np.fromiter(chain.from_iterable(lists), np.int32, int(counts.sum()))
        del lists
        token_first = np.cumsum(counts) - counts
        sizes = self._token_bytes[ids]
        ends = np.cumsum(sizes)  # byte end of each token in the normalized strings, one after the other
        ends_before = np.concatenate(([0], ends))[token_first]  # bytes of the strings before each one
        spaces = np.concatenate(([0], np.cumsum(data == 32)))
        normal = np.diff(offsets) + (len(self.meta) - 1) * (spaces[offsets[1:]] - spaces[offsets[:-1]])
        word_ends = np.cumsum(normal)
        in_group = np.repeat(np.arange(len(group_first)), group_end - group_first)
        target = ends_before[in_group] + word_ends - (word_ends - normal)[group_first][in_group]
        last = np.searchsorted(ends, target)  # the token each word should end with
        found = last < len(ends)
        found[found] = ends[last[found]] == target[found]
        bad = np.concatenate(([0], np.cumsum(sizes <= 0)))
        ok = (counts > 0) & (bad[token_first + counts] == bad[token_first])
        ok &= np.logical_and.reduceat(found, group_first)
        ok &= last[group_end - 1] == token_first + counts - 1
        word_start = np.empty(n, np.int64)
        word_start[1:] = last[:-1] + 1
        word_start[group_first] = token_first
        return ids, word_start, last + 1 - word_start, ok[in_group]

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


def _ends_with(data: np.ndarray, ends: np.ndarray, suffix: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Whether the bytes of ``data`` just before each of ``ends`` are ``suffix``, none of them before ``floor``."""
    k = len(suffix)
    out = ends - k >= floor
    for j in range(k):
        out &= data[np.clip(ends - k + j, 0, max(len(data) - 1, 0))] == suffix[j]
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. starts[i] + lengths[i] - 1`` for every ``i``, one after the other."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    out = np.repeat(starts - (ends - lengths), lengths)
    out += np.arange(total, dtype=np.int64)
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

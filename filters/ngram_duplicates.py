"""Exact n-gram repetition statistics of many documents at once, on integer word ids (numpy).

These are the two n-gram measures of datatrove's ``GopherRepetitionFilter``, per document:

* :func:`top_ngram_chars` — ``find_top_duplicate``: the n-grams are the words joined by single
  spaces; the most frequent one (ties: the one that occurs first) gives ``len(n-gram) * count``.
* :func:`greedy_duplicate_chars` — ``find_all_duplicate``: a left-to-right scan over the n-grams,
  here the words joined with *no* separator. An n-gram seen before (among the visited ones) adds its
  length and moves the scan ``n`` words on, and the n-grams it jumps over are never remembered;
  any other n-gram is remembered and the scan moves one word on.

:func:`ngram_groups` groups the n-grams of every document by a hash of their joined bytes
(``filters/ngram_hashes.py``; equal strings have equal hashes; one sort for the whole batch).
:func:`check_groups` then compares members word by word with their group's first member, on
dictionary-encoded word ids: a group that spans documents or is not one word tuple — a hash collision,
or different tuples that join to the same string (``"ab" + "c"`` and ``"a" + "bc"`` without a
separator; words holding a space with one) — flags its documents, and those few are measured on
their strings by :func:`top_chars_of_words` / :func:`duplicate_chars_of_words`. So a hash only ever
decides how fast a document is measured, never its result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from filters.ngram_hashes import WordStream


@dataclass
class Groups:
    """The n-grams that occur more than once, grouped by hash (one group per repeated value).

    ``pos``: the positions of every group's members, group after group, ascending inside a group (so
    a group's first member is its n-gram's first occurrence); ``start``: where each group begins in
    ``pos``. A group is one n-gram of one document unless :func:`check_groups` says otherwise.
    """

    n: int
    pos: np.ndarray
    start: np.ndarray

    def sizes(self) -> np.ndarray:
        return np.diff(np.r_[self.start, len(self.pos)])


def ngram_groups(stream: WordStream, n: int, sep: str, docs: np.ndarray | None = None) -> Groups:
    """Group the n-grams (words joined by ``sep``) of the documents in ``docs`` (bool mask, or all) by hash.

    One sort of (high bits of hash + document term, index) for the whole batch; equal values become
    neighbours, in position order.
    """
    m = max(len(stream.wid) + 1 - n, 0)  # positions 0 … m-1 may start an n-gram
    keep = stream.room[:m] >= n
    if docs is not None and not docs.all():
        keep &= docs[stream.doc[:m]]
    hashes = stream.hashes[sep]
    key = hashes.hash_before[n:] - hashes.hash_before[:m]
    key *= hashes.power_before[n:]
    key += stream.doc_key[:m]
    starts = np.flatnonzero(keep)
    key = key[starts]
    if len(key) < 2:
        return Groups(n, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    bits = np.uint64(max(1, (len(key) - 1).bit_length()))
    key >>= bits
    key <<= bits
    key |= np.arange(len(key), dtype=np.uint64)
    key.sort()
    same = (key[1:] ^ key[:-1]) < (np.uint64(1) << bits)  # equal high bits
    member = np.zeros(len(key), dtype=bool)
    member[:-1] = same
    member[1:] |= same
    lead = member.copy()  # a member whose left neighbour is not in its group
    lead[1:] &= ~same
    index = (key[member] & ((np.uint64(1) << bits) - np.uint64(1))).astype(np.int64)
    return Groups(n, starts[index], np.flatnonzero(lead[member]))


def check_groups(stream: WordStream, groups: Groups, which: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of documents whose measures need their strings: those holding a member of a group (of
    ``which``, default all) that spans documents or holds more than one word tuple (compared word by
    word with the group's first member)."""
    flagged = np.zeros(stream.n_docs, dtype=bool)
    if not len(groups.pos):
        return flagged
    sizes = groups.sizes()
    first = groups.pos[groups.start]
    last = groups.pos[groups.start + sizes - 1]
    bad = stream.doc[first] != stream.doc[last]
    selected = np.ones(len(sizes), dtype=bool) if which is None else which
    member_group = np.repeat(np.arange(len(sizes)), sizes)
    at = np.flatnonzero(selected[member_group])
    pos, lead = groups.pos[at], first[member_group[at]]
    differ = np.zeros(len(at), dtype=bool)
    for k in range(groups.n):
        differ |= stream.wid[pos + k] != stream.wid[lead + k]
    bad[member_group[at[differ]]] = True
    if bad.any():
        flagged[stream.doc[groups.pos[bad[member_group]]]] = True
    return flagged


def top_ngram_chars(stream: WordStream, groups: Groups) -> tuple[np.ndarray, np.ndarray]:
    """Per document, ``len(top n-gram joined by spaces) * its count`` (-1 with fewer than n words), and
    the mask of documents to measure on strings instead.

    The top group of a document (largest count, then earliest first occurrence) is checked word by
    word; if it is one n-gram, no true n-gram can count more (a mixed group only splits into smaller
    counts), so the answer is exact without checking the other groups.
    """
    n = groups.n
    out = np.full(stream.n_docs, -1, dtype=np.int64)
    first = np.concatenate([[0], stream.doc_end[:-1]])
    has = stream.doc_end - first >= n
    out[has] = _spaced_chars(stream, first[has], n)  # no n-gram repeats: the first one, once
    if not len(groups.pos):
        return out, np.zeros(stream.n_docs, dtype=bool)
    count = groups.sizes()
    lead = groups.pos[groups.start]
    doc = stream.doc[lead]
    most = np.zeros(stream.n_docs, dtype=np.int64)
    np.maximum.at(most, doc, count)
    is_max = count == most[doc]
    earliest = np.full(stream.n_docs, np.iinfo(np.int64).max)
    np.minimum.at(earliest, doc[is_max], lead[is_max])
    top = is_max & (lead == earliest[doc])
    out[doc[top]] = _spaced_chars(stream, lead[top], n) * count[top]
    return out, check_groups(stream, groups, top)


def greedy_duplicate_chars(stream: WordStream, groups: Groups) -> tuple[np.ndarray, np.ndarray]:
    """Per document, the characters the greedy duplicate scan counts, and the mask of documents to
    scan on strings instead (see :func:`check_groups`).

    Only positions of repeated n-grams can change the scan. If every first occurrence is visited,
    every visited later occurrence is a hit, so the hits are the chain "first later occurrence, then
    the first one at least ``n`` words on, …", found for all documents at once by pointer doubling (a
    document's chain ends by jumping to the next document's first later occurrence). That assumption
    is then checked: a document with a first occurrence inside a jumped-over span is scanned by
    :func:`_scan` instead.
    """
    n = groups.n
    out = np.zeros(stream.n_docs, dtype=np.int64)
    flagged = check_groups(stream, groups)
    if not len(groups.pos):
        return out, flagged
    sizes = groups.sizes()
    later = np.ones(len(groups.pos), dtype=bool)
    later[groups.start] = False
    group = np.repeat(np.arange(len(sizes)), sizes)
    order = np.argsort(groups.pos)  # position order (members are few)
    pos, group, later = groups.pos[order], group[order], later[order]
    again = pos[later]
    hits = again[_chain(np.searchsorted(again, again + n))]
    firsts = pos[~later]
    before = np.searchsorted(hits, firsts) - 1  # the last hit before each first occurrence
    skipped = (before >= 0) & (firsts < hits[np.maximum(before, 0)] + n)
    hard = np.zeros(stream.n_docs, dtype=bool)
    hard[stream.doc[firsts[skipped]]] = True
    hits = hits[~hard[stream.doc[hits]]]
    loop = hard[stream.doc[pos]]
    hits = np.concatenate([hits, _scan(pos[loop], group[loop], n)])
    np.add.at(out, stream.doc[hits], stream.chars_before[hits + n] - stream.chars_before[hits])
    return out, flagged


def _chain(nxt: np.ndarray) -> np.ndarray:
    """Bool mask of the nodes on the path 0 → nxt[0] → … (``nxt[i] > i``; ``len(nxt)`` ends it).

    Pointer doubling: after round k the mask holds the first 2**k nodes of the path.
    """
    size = len(nxt)
    jump = np.append(nxt, size)
    on = np.zeros(size + 1, dtype=bool)
    on[0] = size > 0
    while True:
        at = np.flatnonzero(on)
        reach = jump[at]
        if (reach == size).all():
            break
        on[reach] = True
        jump = jump[jump]
    return on[:size]


def _scan(pos: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """The greedy scan over repeated positions (ascending) and their groups: the positions it counts.

    A position before ``resume`` lies in a jumped-over span; a visited one either repeats a visited
    n-gram (counted, jump) or is remembered. Groups never span documents and a jump never passes its
    document's last n-gram, so one loop serves every document.
    """
    hits: list[int] = []
    seen: set[int] = set()
    resume = 0
    for p, g in zip(pos.tolist(), group.tolist(), strict=True):
        if p < resume:
            continue
        if g in seen:
            hits.append(p)
            resume = p + n
        else:
            seen.add(g)
    return np.asarray(hits, dtype=np.int64)


def top_chars_of_words(words: list[str], n: int) -> int:
    """``len(top n-gram) * count`` for one document's words, on strings (-1 with fewer than n words)."""
    grams = Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return -1
    gram, count = max(grams.items(), key=lambda kv: kv[1])  # first of the most frequent, as Counter orders
    return len(gram) * count


def duplicate_chars_of_words(words: list[str], n: int) -> int:
    """The greedy duplicate scan of one document's words, on the concatenated strings."""
    seen: set[str] = set()
    total, i = 0, 0
    while i + n <= len(words):
        gram = "".join(words[i:i + n])
        if gram in seen:
            total += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return total


def _spaced_chars(stream: WordStream, pos: np.ndarray, n: int) -> np.ndarray:
    return stream.chars_before[pos + n] - stream.chars_before[pos] + (n - 1)

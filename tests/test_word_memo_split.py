"""Outside-in checks of the word memo's joined encoding and its eviction (curate.word_memo).

``WordMemo._encode_joined`` encodes new words joined into strings of about ``JOIN_BYTES`` bytes and
splits the ids back with one cumulative sum of token sizes over *all* strings: a string that cannot be
split exactly (an unknown token, an added token, ids that are missing or too many, token sizes that do
not add up) must mark only its own words not-ok, whatever comes before or after it. ``WordMemo._evict``
keeps the most-met half and renumbers/compacts the store. Whatever happens inside, ``encode_column``
must give exactly the ids of the same ``tokenizers.Tokenizer`` on each whole text.

Tokenizer variants come from the real Mistral SentencePiece tokenizer (``llama_folder``), built with the
helpers of ``tests/test_word_memo_adversarial.py``; each variant is built once per module and its memo
is emptied (``_reset``) at the start of every test.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from curate import word_memo
from curate.tokenizer import load_base
from tests.test_word_memo_adversarial import VARIANTS, _build, encode_in_threads

#: Variants used here (all accepted by free_cuts): byte fallback off with a fused unknown token, plain
#: added tokens (size 0), metaspaces of 1, 2, 3 and 4 bytes, and the Prepend ("drops") form.
USED = ["metaspace_first", "metaspace_unk_fused", "metaspace_never_unk", "metaspace_4_byte", "metaspace_pilcrow",
        "metaspace_ascii", "prepend", "prepend_unk_fused", "prepend_pilcrow"]

TINY = {"MAX_WORDS": 4, "MAX_STORE": 16, "CACHE_CHARS": 6, "SLICE_BYTES": 40, "ENCODE_WORDS": 2}
SMALL = {"MAX_WORDS": 40, "MAX_STORE": 200, "CACHE_CHARS": 24, "SLICE_BYTES": 300, "ENCODE_WORDS": 64}


@pytest.fixture(scope="module")
def built(llama_folder):
    """variant name -> (CurateTokenizer, plain tokenizers.Tokenizer encoding special tokens as text)."""
    from tokenizers import Tokenizer

    state = json.loads(load_base(str(llama_folder)).to_str())
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            tok = _build(state, *VARIANTS[name])
            assert tok.word_memo is not None, name
            plain = Tokenizer.from_str(tok.tk.to_str())
            plain.encode_special_tokens = True
            cache[name] = (tok, plain)
        tok, plain = cache[name]
        tok.word_memo._reset()
        tok.__dict__.pop("_encode", None)  # a fake encoder a previous test put on the instance
        return tok, plain

    return get


def _set(monkeypatch, **values) -> None:
    for name, value in values.items():
        monkeypatch.setattr(word_memo, name, value)


def _whole(plain, docs: list[str]) -> list[list[int]]:
    return [e.ids for e in plain.encode_batch(docs, add_special_tokens=False)]


def _alone(memo, plain, word: str, first: bool) -> list[int]:
    """A word's ids encoded alone, as the memo defines them (independently of ``_each``): in the drops
    form a word after a cut loses its first space (a lone space is the metaspace token)."""
    if memo.drops and not first:
        if word == " ":
            return [memo.meta_id]
        word = word[1:]
    return plain.encode(word, add_special_tokens=False).ids


# ---------------------------------------------------------------------- hostile words
def _cores(meta: str) -> list[str]:
    """Word bodies (no space): unknown characters with byte fallback off, added-token strings, the
    metaspace and look-alikes sharing its leading bytes, special-token look-alikes, multi-byte text."""
    return ["the", "a", "cat", "é", "ß", "中文", "x", "<s>", "</s>", "<unk>", "<D>", "<|k|>", "<0xE2>", "<0x20>",
            "zq", "Xy", "\u0301", "\u3000x", "▁x", "x▁y", "▁", "¶", "·", "𝄞", "𝄟", "_", "_x", "😀", "\x00", "ǅ",
            "\U0010fffd", "\u2580", "\u2582", "ab" * 9, "0", "\r\nx", "\tx", "\t", "中", meta, meta + "x",
            "x" + meta + "y", meta + meta + "z", "q" + meta]


def _joinable_words(meta: str) -> list[str]:
    """Words as the memo cuts them that ``_joinable`` accepts: a space first, a last character other
    than a space or the metaspace, no free cut inside (inner spaces only after a space or the metaspace)."""
    out = []
    for core in _cores(meta):
        for word in (" " + core, "  " + core, " " + meta + " " + core, "   " + core + "\u0301"):
            if not word.endswith((" ", meta)):
                out.append(word)
    return sorted(set(out))


def _docs(rng: random.Random, meta: str, n: int, batch: int) -> list[str]:
    """Texts of Zipf-distributed hostile words (so hit counts differ), fresh words every batch (so the
    memo churns), long words, leading/trailing spaces and metaspaces, empty and one-word texts."""
    cores = _cores(meta)
    common = [" " + c for c in cores[:12]]
    rare = [" " + c for c in cores] + ["  " + c for c in cores[::3]] + [" " + meta + " " + c for c in cores[::5]]
    fresh = [f" n{batch}{k}{rng.choice(cores)}" for k in range(30)]
    docs = ["", " ", meta, meta + " ", " " + meta, "x", " x", "x ", "  x  ", cores[rng.randrange(len(cores))],
            " " + "y" * (rng.choice([5, 6, 7, 30, 129, 200])) + "𝄞"]
    for _ in range(n):
        words = []
        for _ in range(rng.choice([0, 1, 2, 3, 8, 25, 60])):
            r = rng.random()
            pool = common if r < 0.6 else rare if r < 0.85 else fresh
            words.append(pool[min(int(rng.paretovariate(1.2)) - 1, len(pool) - 1)] if pool is common
                         else rng.choice(pool))
        head = rng.choice(["", "", "Start", " ", "  ", meta, meta + " ", "中文", "\n"])
        tail = rng.choice(["", "", " ", "  ", meta, "\n", " " + meta, ".", " z" * 3])
        docs.append(head + "".join(words) + tail)
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------------- invariants
def _check_memo(memo, plain) -> None:
    """Every kept word's ids in ``_store`` are its ids encoded alone; the per-word arrays line up with
    the two dicts, whose numbers are exactly 0..n-1."""
    n = len(memo._index) + len(memo._first)
    assert len(memo._starts) == len(memo._lengths) == len(memo._hits) == n
    numbers = sorted([*memo._index.values(), *memo._first.values()])
    assert numbers == list(range(n))
    assert not memo._first or memo.drops
    assert np.all(memo._starts >= 0) and np.all(memo._starts + memo._lengths <= len(memo._store))
    assert np.all(memo._hits >= 0)
    for index, first in ((memo._index, False), (memo._first, True)):
        for word, k in index.items():
            assert len(word) <= word_memo.CACHE_CHARS
            got = memo._store[memo._starts[k]:memo._starts[k] + memo._lengths[k]].tolist()
            assert got == _alone(memo, plain, word, first), (word, first)


def _spy_evictions(memo, monkeypatch) -> list:
    """Wrap ``memo._evict``: check what each eviction keeps and that kept words keep their ids."""
    real = memo._evict
    seen: list = []

    def evict() -> None:
        old_words = {**{("i", w): k for w, k in memo._index.items()}, **{("f", w): k for w, k in memo._first.items()}}
        old_hits = memo._hits.copy()
        old_ids = {key: memo._store[memo._starts[k]:memo._starts[k] + memo._lengths[k]].tolist()
                   for key, k in old_words.items()}
        old_lengths = memo._lengths.copy()
        real()
        new_words = {**{("i", w): k for w, k in memo._index.items()}, **{("f", w): k for w, k in memo._first.items()}}
        kept = set(new_words)
        assert kept <= set(old_words)
        n = len(kept)
        assert n <= word_memo.MAX_WORDS // 2
        assert sorted(new_words.values()) == list(range(n))
        # ids unchanged, store packed, hits halved
        for key in kept:
            k, was = new_words[key], old_words[key]
            assert memo._store[memo._starts[k]:memo._starts[k] + memo._lengths[k]].tolist() == old_ids[key], key
            assert memo._hits[k] == old_hits[was] // 2
        assert len(memo._store) == int(memo._lengths.sum()) <= max(word_memo.MAX_STORE // 2, 0)
        assert memo._starts.tolist() == (np.cumsum(memo._lengths) - memo._lengths).tolist()
        # the kept ones are the first of the stable order by hits, as many as both limits allow
        order = sorted(old_words, key=lambda key: (-old_hits[old_words[key]], old_words[key]))
        assert set(order[:n]) == kept
        if n < len(order) and n < word_memo.MAX_WORDS // 2:
            total = sum(int(old_lengths[old_words[key]]) for key in order[:n + 1])
            assert total > word_memo.MAX_STORE // 2
        seen.append(n)

    monkeypatch.setattr(memo, "_evict", evict)
    return seen


def _spy_joined(memo, monkeypatch) -> dict:
    real = memo._encode_joined
    counts = {"ok": 0, "failed": 0}

    def joined(words):
        out = real(words)
        counts["ok"] += int(out[3].sum())
        counts["failed"] += int((~out[3]).sum())
        return out

    monkeypatch.setattr(memo, "_encode_joined", joined)
    return counts


# ---------------------------------------------------------------------- (a) columns, many batches
@pytest.mark.parametrize("name", USED)
def test_batches_with_a_warm_memo_that_keeps_evicting_give_whole_text_ids(built, name, monkeypatch):
    """Several batches per limit setting, the memo kept between them: tiny limits (an eviction in
    nearly every slice, every word its own joined string or groups of a few bytes), small limits
    (evictions every batch or two, joined strings of many words) and the defaults."""
    tok, plain = built(name)
    memo = tok.word_memo
    evictions = _spy_evictions(memo, monkeypatch)
    joined = _spy_joined(memo, monkeypatch)
    rng = random.Random(name)
    settings = [dict(TINY, JOIN_BYTES=1), dict(TINY, JOIN_BYTES=2), dict(TINY, JOIN_BYTES=3),
                dict(SMALL, JOIN_BYTES=17), dict(SMALL, JOIN_BYTES=60),
                {"MAX_WORDS": 1, "MAX_STORE": 1, "SLICE_BYTES": 1, "ENCODE_WORDS": 1, "JOIN_BYTES": 4}]
    batch = 0
    for setting in settings:
        _set(monkeypatch, **setting)
        for _ in range(3):
            docs = _docs(rng, memo.meta_char, 30, batch)
            want = _whole(plain, docs)
            eos = None if batch % 2 else 2
            got = tok.encode_column(pa.array(docs, pa.large_string() if batch % 3 else pa.string()), eos=eos)
            assert got.to_pylist() == [w + ([] if eos is None else [eos]) for w in want], (setting, batch)
            _check_memo(memo, plain)
            batch += 1
    assert len(evictions) >= 12
    # the defaults, with the memo warm from the tiny limits, and the same batch twice
    for setting in ({}, {"JOIN_BYTES": word_memo.JOIN_BYTES}):
        _set(monkeypatch, **setting)
        docs = _docs(rng, memo.meta_char, 120, batch)
        want = _whole(plain, docs)
        assert tok.encode_column(pa.array(docs)).to_pylist() == want
        assert tok.encode_column(pa.array(docs)).to_pylist() == want
        _check_memo(memo, plain)
        batch += 1
    assert joined["ok"] > 0
    if "unk" in name or name in ("metaspace_first",):
        assert joined["failed"] > 0  # unknown characters / added tokens: some joined strings failed


@pytest.mark.parametrize("name", ["metaspace_unk_fused", "prepend_unk_fused", "metaspace_4_byte"])
def test_one_failing_word_among_many_good_ones_leaves_the_rest_alone(built, name, monkeypatch):
    """Long columns of good words with a rare failing word (an unknown character, an added token) at
    the start, the end and in between of the new words, joined into strings of a few bytes to a few
    hundred: every text still gets the whole-text ids."""
    tok, plain = built(name)
    memo = tok.word_memo
    meta = memo.meta_char
    joined = _spy_joined(memo, monkeypatch)
    bad = [" ǅ", " \x00x", " 𝄞", " q😀", " zq", " \U0010fffd"]
    for join_bytes in (1, 2, 3, 5, 13, 300, 2000):
        _set(monkeypatch, JOIN_BYTES=join_bytes)
        memo._reset()
        rng = random.Random(join_bytes)
        good = [f" w{k}{rng.choice(['é', '中', meta, 'x', '·'])}" for k in range(300)]
        words = good[:]
        for at in (0, 1, 150, 151, 299, len(words)):
            words.insert(at, rng.choice(bad))
        docs = ["".join(words[i:i + 37]) for i in range(0, len(words), 37)] + ["".join(words)]
        assert tok.encode_column(pa.array(docs)).to_pylist() == _whole(plain, docs), join_bytes
        _check_memo(memo, plain)
    assert joined["ok"] > 1000
    if name != "metaspace_4_byte":  # byte fallback and no plain added token: nothing fails there
        assert joined["failed"] > 0


# ---------------------------------------------------------------------- (b) _encode_joined directly
def _groups(words: list[str], join_bytes: int) -> list[int]:
    starts = np.cumsum([0] + [len(w.encode()) for w in words])[:-1]
    return (starts // join_bytes).tolist()


def _bad_word(memo, plain, word: str) -> bool:
    """Whether the word's ids alone hold an id of unknown extent (the unknown token with byte fallback
    off, an added token): a string holding it cannot be split back."""
    ids = _alone(memo, plain, word, False)
    return bool(np.any(memo._token_bytes[ids] <= 0))


def _check_joined(memo, plain, words: list[str], join_bytes: int, arr=None, must_fail=None) -> np.ndarray:
    arr = pa.array(words, pa.large_string()) if arr is None else arr
    ids, starts, lengths, ok = memo._encode_joined(arr)
    n = len(words)
    assert len(starts) == len(lengths) == len(ok) == n
    group = _groups(words, join_bytes)
    must_fail = must_fail or (lambda w: _bad_word(memo, plain, w))
    failing = {g for g, w in zip(group, words) if must_fail(w)}
    want_ok = [g not in failing for g in group]
    assert ok.tolist() == want_ok, [(w, g) for w, g, o in zip(words, group, ok) if o != (g not in failing)]
    for k in np.flatnonzero(ok):
        assert 0 <= starts[k] and starts[k] + lengths[k] <= len(ids)
        assert ids[starts[k]:starts[k] + lengths[k]].tolist() == _alone(memo, plain, words[k], False), words[k]
    # the ok words are what the memo would otherwise encode one by one
    okw = [w for w, o in zip(words, ok) if o]
    assert [ids[s:s + m].tolist() for s, m, o in zip(starts, lengths, ok) if o] == memo._each(okw, False)
    return ok


@pytest.mark.parametrize("name", ["metaspace_unk_fused", "metaspace_never_unk", "metaspace_first", "metaspace_4_byte",
                                  "metaspace_pilcrow", "metaspace_ascii", "prepend", "prepend_unk_fused",
                                  "prepend_pilcrow"])
def test_joined_words_fail_exactly_with_their_string(built, name, monkeypatch):
    """Random runs of hostile joinable words: the words of a string holding a word with an unknown or
    added token are not ok, every other word is ok with exactly its own ids, for group sizes from one
    word per string (and groups of a few bytes around multi-byte characters) to one string."""
    tok, plain = built(name)
    memo = tok.word_memo
    pool = _joinable_words(memo.meta_char)
    assert all(memo._joinable(pa.array(pool, pa.large_string())))
    rng = random.Random(name)
    failed_any = 0
    for join_bytes in (1, 2, 3, 4, 5, 7, 16, 64, 2000):
        _set(monkeypatch, JOIN_BYTES=join_bytes)
        for _ in range(3):
            words = rng.sample(pool, 60)
            ok = _check_joined(memo, plain, words, join_bytes)
            failed_any += int((~ok).sum())
            # the same words as a slice of a bigger array (non-zero offsets into its buffers)
            sliced = pa.array(["  pad", *words, " tail"], pa.large_string()).slice(1, len(words))
            _check_joined(memo, plain, words, join_bytes, arr=sliced)
    if "unk" in name or name == "metaspace_first":
        assert failed_any > 0


def test_a_failing_string_between_good_ones_shifts_nothing(built, monkeypatch):
    """Byte fallback off: one word with an unknown character at every position of a row of good words,
    with strings of one word and of a few words; only its string fails."""
    tok, plain = built("metaspace_unk_fused")
    memo = tok.word_memo
    good = [" the", " a", " cat", " é", " x▁y", " ▁ x", "  中文", " <0xE2>", " \u3000x", " ab"]
    for join_bytes in (1, 3, 9, 25):
        _set(monkeypatch, JOIN_BYTES=join_bytes)
        for at in range(len(good) + 1):
            for bad in (" ǅ", " x\x00", " 𝄞y"):
                words = good[:at] + [bad] + good[at:]
                ok = _check_joined(memo, plain, words, join_bytes)
                assert not ok[at]
        # two failing strings in a row, at both ends
        words = [" ǅ", " ǅǅ", *good, " 𝄞", " \x00"]
        _check_joined(memo, plain, words, join_bytes)


def _fake_encoder(tok, monkeypatch, change) -> None:
    """Put on ``tok`` an encoder whose ids for some strings are changed by ``change(string, ids)``."""
    real = tok._encode

    def encode(strings):
        return [SimpleNamespace(ids=change(s, list(e.ids))) for s, e in zip(strings, real(strings))]

    monkeypatch.setattr(tok, "_encode", encode)


@pytest.mark.parametrize("name", ["metaspace_first", "metaspace_4_byte", "prepend_pilcrow"])
def test_strings_whose_ids_are_empty_short_or_long_fail_alone(built, name, monkeypatch):
    """An encoder that gives no ids for some strings, drops their last or first id, adds one, or adds
    a token of no size (whose sizes then still add up): those strings' words, and only those, are not
    ok — also when such strings come first, last, or in a row."""
    tok, plain = built(name)
    memo = tok.word_memo
    the_id = plain.encode(" the", add_special_tokens=False).ids[-1]

    def change(s: str, ids: list[int]) -> list[int]:
        if "EMPTY" in s:
            return []
        if "DROP" in s:
            return ids[:-1]
        if "HEAD" in s:
            return ids[1:]
        if "MORE" in s:
            return ids + [the_id]
        if "FRONT" in s:
            return [the_id] + ids
        # a token of no size (unknown extent) added where the sizes still add up
        if "ZSTART" in s:
            return [zero_id] + ids
        if "ZMID" in s:
            return ids[:len(ids) // 2] + [zero_id] + ids[len(ids) // 2:]
        if "ZEND" in s:
            return ids + [zero_id]
        return ids

    zero_id = int(np.flatnonzero(memo._token_bytes == 0)[0])
    _fake_encoder(tok, monkeypatch, change)
    markers = ["EMPTY", "DROP", "HEAD", "MORE", "FRONT", "ZSTART", "ZMID", "ZEND"]
    rng = random.Random(name)
    pool = [w for w in _joinable_words(memo.meta_char) if not _bad_word(memo, plain, w)]

    def must_fail(w: str) -> bool:
        return any(m in w for m in markers)

    for join_bytes in (1, 2, 6, 20, 200):
        _set(monkeypatch, JOIN_BYTES=join_bytes)
        for trial in range(6):
            words = rng.sample(pool, 40)
            for m in rng.sample(markers, 3):
                words.insert(rng.choice([0, len(words), rng.randrange(len(words) + 1)]), f" {m}{trial}")
            if trial == 0:
                words = [" EMPTYa", " EMPTYb", *words, " EMPTYc", " EMPTYd"]
            _check_joined(memo, plain, words, join_bytes, must_fail=must_fail)
    # every string empty
    _set(monkeypatch, JOIN_BYTES=1)
    words = [" EMPTY1", " EMPTY2", " EMPTY3"]
    assert _check_joined(memo, plain, words, 1, must_fail=must_fail).tolist() == [False] * 3


@pytest.mark.parametrize("delta", [0, 1, -1, 3])
def test_token_sizes_that_do_not_add_up_fail_only_their_strings(built, monkeypatch, delta):
    """A token whose size is wrong (0: unknown extent; or off by some bytes) fails the strings holding
    it and no other, wherever they are among good strings."""
    tok, plain = built("metaspace_first")
    memo = tok.word_memo
    pool = [w for w in _joinable_words(memo.meta_char) if not _bad_word(memo, plain, w)]
    target = plain.encode(" cat", add_special_tokens=False).ids
    target = target[-1]  # "▁cat"
    sizes = memo._token_bytes.copy()
    sizes[target] = 0 if delta == 0 else sizes[target] + delta
    monkeypatch.setattr(memo, "_token_bytes", sizes)

    def must_fail(w: str) -> bool:
        return target in _alone(memo, plain, w, False)

    rng = random.Random(delta)
    assert any(must_fail(w) for w in pool)
    for join_bytes in (1, 3, 11, 40, 2000):
        _set(monkeypatch, JOIN_BYTES=join_bytes)
        for _ in range(4):
            words = rng.sample(pool, 50)
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), rng.choice([" cat", " cat" + memo.meta_char + "x"]))
            _check_joined(memo, plain, words, join_bytes, must_fail=must_fail)


def test_tiny_join_bytes_never_cut_a_multibyte_character(built, monkeypatch):
    """Groups are made of whole words even when JOIN_BYTES is smaller than one character: words of
    4-byte characters and a 4-byte metaspace, one string per word or a few."""
    tok, plain = built("metaspace_4_byte")
    memo = tok.word_memo
    meta = memo.meta_char
    assert len(meta.encode()) == 4
    seen: list[str] = []
    real = tok._encode

    def spy(strings):
        seen.extend(strings)
        return real(strings)

    monkeypatch.setattr(tok, "_encode", spy)
    words = [" 😀", " 𝄟", f" {meta}x", f" {meta} 中", " \U0010fffd\U0010fffd", " é", " 中文", " ǅ", f" x{meta}😀"]
    for join_bytes in (1, 2, 3, 5, 6, 7):
        _set(monkeypatch, JOIN_BYTES=join_bytes)
        seen.clear()
        memo._encode_joined(pa.array(words, pa.large_string()))
        groups = _groups(words, join_bytes)
        want = ["".join(w for w, g in zip(words, groups) if g == k) for k in sorted(set(groups))]
        assert seen == want  # whole words per string, valid UTF-8 (str() of a cut character would raise)
        _check_joined(memo, plain, words, join_bytes)


@pytest.mark.parametrize("name", ["metaspace_unk_fused", "metaspace_first", "prepend_unk_fused"])
def test_joined_strings_and_kept_words_longer_than_split_chars(built, name, monkeypatch):
    """CACHE_CHARS far above the tokenizer's ``split_chars``: joined strings of long words are encoded
    whole, failing long words go one by one through the tokenizer's verified cuts (metaspace and space
    runs, unknown characters), and all of them are kept in the memo across evictions."""
    tok, plain = built(name)
    memo = tok.word_memo
    meta = memo.meta_char
    monkeypatch.setattr(tok, "split_chars", 60)
    _set(monkeypatch, CACHE_CHARS=10_000, JOIN_BYTES=150, MAX_WORDS=8, MAX_STORE=400)
    rng = random.Random(name)
    for batch in range(3):
        words = [" " + "ab" * rng.randrange(20, 120) + "é", " " + meta * rng.randrange(50, 130) + "x",
                 "  " + " " * rng.randrange(60, 140) + "y", " " + "x" * 70 + "ǅ" + "z" * 70,
                 " " + (meta + " ") * 40 + "w", " " + "中文" * 45, f" b{batch}" + "q" * 90, " short", " 𝄞" * 3]
        docs = ["".join(rng.sample(words, len(words))) for _ in range(6)] + ["lead" + "".join(words) + " "]
        assert tok.encode_column(pa.array(docs)).to_pylist() == _whole(plain, docs), batch
        _check_memo(memo, plain)


# ---------------------------------------------------------------------- (c) eviction
@pytest.mark.parametrize("name", ["metaspace_unk_fused", "prepend", "prepend_pilcrow"])
def test_eviction_keeps_the_most_met_words_with_their_ids(built, name, monkeypatch):
    """Words met many times survive evictions with their ids; the drops form's first words (their own
    dict) are renumbered in the same numbering; fresh words churn through."""
    tok, plain = built(name)
    memo = tok.word_memo
    evictions = _spy_evictions(memo, monkeypatch)
    _set(monkeypatch, MAX_WORDS=12, MAX_STORE=60, JOIN_BYTES=7)
    rng = random.Random(1)
    hot = ["Hot one", " one", " two", "Start"]
    for batch in range(8):
        docs = []
        for k in range(25):
            fresh = " ".join(f"f{batch}x{k}y{j}" for j in range(rng.randrange(1, 5)))
            docs.append(rng.choice(hot[::3]) + " " + fresh + " one two")
            docs.append(fresh)  # a first word met once (drops form: the first-word dict)
        assert tok.encode_column(pa.array(docs)).to_pylist() == _whole(plain, docs)
        _check_memo(memo, plain)
        assert " one" in memo._index and " two" in memo._index  # met far more often than any other
        if memo.drops:
            assert "Hot" in memo._first or "Start" in memo._first
    assert len(evictions) >= 4


@pytest.mark.parametrize("name", ["metaspace_first", "prepend"])
def test_eviction_by_store_size_alone_and_words_longer_than_the_store(built, name, monkeypatch):
    """MAX_WORDS never reached but MAX_STORE is: the kept half is bounded by ids; a most-met word with
    more ids than half the store keeps nothing (an empty memo), and the next batch still works."""
    tok, plain = built(name)
    memo = tok.word_memo
    evictions = _spy_evictions(memo, monkeypatch)
    _set(monkeypatch, MAX_WORDS=10_000, MAX_STORE=24, CACHE_CHARS=40, JOIN_BYTES=2000)
    big = " " + "𝄞é中" * 6  # ~40 ids (byte fallback): more than MAX_STORE // 2
    for batch in range(6):
        docs = [f"a{batch}{big * 3} b c d", "a b c", f"q{batch} r{batch}" + big] * 2
        assert tok.encode_column(pa.array(docs)).to_pylist() == _whole(plain, docs)
        _check_memo(memo, plain)
    assert evictions and 0 in evictions


def test_first_words_only_in_the_drops_form(built, monkeypatch):
    """Texts of one word each: only the first-word dict fills and is evicted, ``_index`` stays empty."""
    tok, plain = built("prepend_unk_fused")
    memo = tok.word_memo
    evictions = _spy_evictions(memo, monkeypatch)
    _set(monkeypatch, MAX_WORDS=6, MAX_STORE=40)
    for batch in range(5):
        docs = [f"w{batch}{k}ǅ" for k in range(9)] + ["same", "same", "▁same", "ǅ"] * 3
        assert tok.encode_column(pa.array(docs)).to_pylist() == _whole(plain, docs)
        _check_memo(memo, plain)
        assert not memo._index
    assert evictions and "same" in memo._first


@pytest.mark.parametrize("name", ["metaspace_unk_fused", "prepend_unk_fused"])
def test_threads_with_tiny_limits_and_failing_joined_strings(built, name, monkeypatch):
    """Threads sharing one memo that evicts in almost every slice, with joined strings of a few bytes
    some of which fail: each thread gets its own texts' whole ids, and the memo is consistent after."""
    tok, plain = built(name)
    memo = tok.word_memo
    _set(monkeypatch, MAX_WORDS=6, MAX_STORE=30, SLICE_BYTES=60, JOIN_BYTES=3, CACHE_CHARS=10)
    rng = random.Random(name)
    work = [_docs(rng, memo.meta_char, 25, k) for k in range(6)]
    want = [_whole(plain, docs) for docs in work]
    assert encode_in_threads(tok, work, want, rounds=3) == []
    _check_memo(memo, plain)

"""Adversarial checks of the word memo's contract (curate.word_memo, CurateTokenizer.encode_column).

The contract: ``encode_column`` gives, for every input and whatever the memo holds, exactly the ids the
same ``tokenizers.Tokenizer`` gives each whole text (``encode_special_tokens = True``, no special tokens
added), plus the end-of-text id when asked; ``free_cuts`` is None wherever that cannot be guaranteed.
Tokenizer variants are built from the real Mistral SentencePiece tokenizer (``llama_folder``).
"""

from __future__ import annotations

import json
import random
import re
import threading

import numpy as np
import pyarrow as pa
import pytest

import curate.word_memo as word_memo
from curate.tokenizer import CurateTokenizer, drops_cut_space, free_cuts, load_base

ALPHABET = list("ab z\n\t▁é😀<s>xX_¶") + [
    " ", "  ", "   ", "▁▁", "\u3000", "中文", ".", "\r\n", "\x00", "\u200b", "\u0301", " \u0301", "\u2580", "\u2582",
    "𝄞", "\u00a0", "\ufeff", "zq", "<D>", "<|k|>", "Xy", "the", " the", "▁ ", " ▁", "\U0010fffd", "\x7f", "ǅ", "ß",
    "</s>", "<unk>",
]


def _hostile(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = ["".join(rng.choice(ALPHABET) for _ in range(rng.choice([0, 1, 2, 3, 5, 10, 30, 80]))) for _ in range(n)]
    return docs + ["", " ", "  ", "\t", "\x00", "▁", "▁ ", " ▁", "x ", " x", "x  ", "  x  ", "\r\n \r\n", " \u0301x",
                   "a" * 300, "a b" * 100, "¶ ¶x ¶", "𝄞 𝄞x 𝄞"]


@pytest.fixture(scope="module")
def base_state(llama_folder) -> dict:
    return json.loads(load_base(str(llama_folder)).to_str())


def _prepend_form(state: dict, meta: str = "▁") -> None:
    state["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": meta}, {"type": "Replace", "pattern": {"String": " "}, "content": meta}]}
    state["pre_tokenizer"] = None


def _swap_meta(state: dict, new: str) -> None:
    """Rename ``▁`` <-> ``new`` in the vocabulary and merges: the same tokenizer with another metaspace."""
    table = str.maketrans({"▁": new, new: "▁"})
    model = state["model"]
    model["vocab"] = {t.translate(table): i for t, i in model["vocab"].items()}
    model["merges"] = [[p.translate(table) for p in m] if isinstance(m, list) else m.translate(table)
                       for m in model["merges"]]
    if (state.get("pre_tokenizer") or {}).get("type") == "Metaspace":
        state["pre_tokenizer"]["replacement"] = new


def _scheme(name: str):
    def change(state: dict) -> None:
        state["pre_tokenizer"]["prepend_scheme"] = name
    return change


def _unk(state: dict) -> None:
    state["model"].update(byte_fallback=False, unk_token="<unk>", fuse_unk=True)


def _both(*changes):
    def change(state: dict) -> None:
        for c in changes:
            c(state)
    return change


#: name -> (change to the tokenizer JSON, non-special added tokens, special added tokens)
VARIANTS = {
    "metaspace_first": (None, ["zq", "\t", "中", "Xy"], ["<D>", "<|k|>"]),
    "metaspace_always": (_scheme("always"), ["zq", "\t", "é"], []),
    "metaspace_never": (_scheme("never"), ["zq", "a"], ["<D>"]),
    "metaspace_unk_fused": (_unk, ["zq", "😀"], []),
    "metaspace_never_unk": (_both(_scheme("never"), _unk), [], []),
    "metaspace_pilcrow": (lambda s: _swap_meta(s, "¶"), [], []),
    "metaspace_4_byte": (lambda s: _swap_meta(s, "𝄞"), [], ["<D>"]),
    "metaspace_ascii": (lambda s: _swap_meta(s, "_"), [], []),
    "prepend": (_prepend_form, [], ["<D>", "zq"]),
    "prepend_unk_fused": (_both(_prepend_form, _unk), [], []),
    "prepend_pilcrow": (_both(lambda s: _swap_meta(s, "¶"), lambda s: _prepend_form(s, "¶")), [], ["<|k|>"]),
}


def _build(base_state: dict, change=None, plain=(), special=(), split_chars: int = 100_000) -> CurateTokenizer:
    from tokenizers import AddedToken, Tokenizer

    state = json.loads(json.dumps(base_state))
    if change is not None:
        change(state)
    tk = Tokenizer.from_str(json.dumps(state))
    if plain:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if special:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return CurateTokenizer(tk, {}, split_chars)


def _whole(tok: CurateTokenizer, docs: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tok.tk.to_str())
    plain.encode_special_tokens = True
    return [plain.encode(d, add_special_tokens=False).ids for d in docs]


def _arrow_forms(docs: list[str], seed: int):
    rng = random.Random(seed)
    pre, post = ["pre fix", "", " q"], ["tail end", "x "]
    k = rng.randrange(len(docs) + 1)
    j = rng.randrange(k, len(docs) + 1)
    yield "string", pa.array(docs, pa.string())
    yield "large_string", pa.array(docs, pa.large_string())
    yield "string_view", pa.array(docs, pa.string_view())
    yield "sliced", pa.array(pre + docs + post).slice(len(pre), len(docs))
    yield "sliced_large", pa.array(pre + docs + post, pa.large_string()).slice(len(pre), len(docs))
    yield "chunked", pa.chunked_array([pa.array(part, pa.string()) for part in (docs[:k], docs[k:j], docs[j:], [])],
                                      pa.string())
    yield "dictionary", pa.array(docs).dictionary_encode()


# ---------------------------------------------------------------------- contract violations found (fixed)
def test_verified_cut_inside_a_long_metaspace_run_keeps_whole_text_ids(base_state):
    """A word with no free cut longer than ``split_chars`` goes through ``_safe_cut``, which compared
    ids on the 512 characters before the candidate cut only. In a run of ``▁`` (or of spaces) the
    pairing of ``▁▁`` merges depends on the run's parity from its very start, so the window agreed
    while the whole text did not. Windows now reach out of such runs."""
    tok = _build(base_state, split_chars=500)
    assert tok.word_memo is not None
    docs = ["▁" * 513 + " x", "a" + " " * 514 + "x"]
    want = _whole(tok, docs)
    assert [a.tolist() for a in tok.encode_arrays(docs)] == want
    assert tok.encode_column(pa.array(docs)).to_pylist() == want


def test_a_text_of_a_hundred_thousand_spaces_keeps_whole_text_ids_with_default_split_chars(base_state):
    """The same with the default ``split_chars`` (100,000): a document holding 100,002 spaces gave
    ``[…, '▁', '▁x']`` instead of the tokenizer's ``[…, '▁▁', 'x']``."""
    tok = _build(base_state)
    assert tok.split_chars == 100_000
    docs = ["a" + " " * 100_002 + "x"]
    assert tok.encode_column(pa.array(docs)).to_pylist() == _whole(tok, docs)


@pytest.mark.parametrize("unit", ["▁", " ", "=", "ab", "\r\n", "▁ ", "-=", "0"])
def test_verified_cuts_next_to_long_runs_and_two_character_patterns_keep_whole_ids(base_state, unit):
    """Runs of one character or of a two-character pattern on either side of a candidate cut, of every
    parity around the window's edge, with text on both sides."""
    tok = _build(base_state, split_chars=500)
    docs = [f"x{unit * n}\ny {unit * m}z" for n in (250, 251, 256, 257, 600, 601) for m in (0, 255, 256, 700, 701)]
    docs += [f"{unit * n} tail" for n in (260, 261, 1200, 1201)]
    want = _whole(tok, docs)
    assert [a.tolist() for a in tok.encode_arrays(docs)] == want
    assert tok.encode_column(pa.array(docs)).to_pylist() == want


@pytest.mark.parametrize("text", ["0\n" * 150_000, "- " * 150_000, "x" + " " * 250_000 + "y"])
def test_long_repeated_patterns_are_cut_in_linear_time_with_whole_ids(base_state, text):
    """A 300K-character run of a two-character pattern offers a verified-cut candidate every other
    character; reaching out of the run for each one took ~20 minutes per piece. The search now stops at
    the first run longer than the reach, and the ids are still the whole text's."""
    import time

    tok = _build(base_state)
    started = time.perf_counter()
    got = tok.encode_column(pa.array([text])).to_pylist()
    assert time.perf_counter() - started < 30
    assert got == _whole(tok, [text])


def test_the_prepend_form_never_tries_verified_cuts(base_state):
    """In Llama 2's normalizer form a separately encoded side always gets one prefix more than the
    whole, so no verified cut can hold: a long word with no free cut is encoded whole, at once."""
    import time

    state = json.loads(json.dumps(base_state))
    _prepend_form(state)
    tok = _build(state, split_chars=1000)
    assert drops_cut_space(tok.tk)
    docs = ["▁ " * 4000, "\nx" * 3000]
    started = time.perf_counter()
    got = tok.encode_column(pa.array(docs)).to_pylist()
    assert time.perf_counter() - started < 5  # was ~1 s per 1,000 characters of such a word
    assert got == _whole(tok, docs)
    assert tok.split("▁" * 5000) == ["▁" * 5000]


# ---------------------------------------------------------------------- what holds
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_free_cuts_accepts_gives_whole_text_ids_for_every_arrow_form(base_state, name):
    change, plain, special = VARIANTS[name]
    tok = _build(base_state, change, plain, special)
    assert free_cuts(tok.tk) is not None and tok.word_memo is not None
    assert tok.word_memo.drops == name.startswith("prepend") == drops_cut_space(tok.tk)
    for batch in range(2):
        docs = _hostile(150, seed=batch)
        want = _whole(tok, docs)
        for form, arr in _arrow_forms(docs, seed=batch):
            assert tok.encode_column(arr).to_pylist() == want, form
        with_eos = tok.encode_column(pa.array(docs), eos=2).to_pylist()
        assert with_eos == [ids + [2] for ids in want]


@pytest.mark.parametrize("form", ["metaspace", "prepend"])
def test_a_memo_under_pressure_over_many_batches_changes_no_ids(base_state, form, monkeypatch):
    """Tiny limits: the memo starts over within almost every batch, slices hold a text or two, words
    are encoded two at a time, only words of up to 2 characters are kept."""
    for name, value in (("MAX_WORDS", 3), ("MAX_STORE", 10), ("CACHE_CHARS", 2), ("SLICE_BYTES", 7),
                        ("ENCODE_WORDS", 2)):
        monkeypatch.setattr(word_memo, name, value)
    tok = _build(base_state, _prepend_form if form == "prepend" else None)
    for batch in range(12):
        docs = _hostile(40, seed=100 + batch)
        assert tok.encode_column(pa.array(docs), eos=None if batch % 2 else 2).to_pylist() == [
            ids + ([] if batch % 2 else [2]) for ids in _whole(tok, docs)]
        memo = tok.word_memo
        assert len(memo._starts) == len(memo._lengths) == len(memo._index) + len(memo._first)
        assert all(len(w) <= 2 for w in [*memo._index, *memo._first])


@pytest.mark.parametrize("form", ["metaspace", "prepend"])
def test_threads_sharing_a_memo_that_keeps_starting_over_get_their_own_ids(base_state, form, monkeypatch):
    monkeypatch.setattr(word_memo, "MAX_WORDS", 5)
    monkeypatch.setattr(word_memo, "MAX_STORE", 40)
    monkeypatch.setattr(word_memo, "SLICE_BYTES", 50)
    tok = _build(base_state, _prepend_form if form == "prepend" else None)
    rng = random.Random(7)
    words = ["the", "a", "▁", "  ", "\n", "é", "中文", "word", "x" * 10, "<s>", " \u0301"]
    work = [[" ".join(rng.choice(words) for _ in range(rng.randrange(0, 30))) for _ in range(40)] for _ in range(6)]
    want = [_whole(tok, docs) for docs in work]
    assert encode_in_threads(tok, work, want, rounds=4) == []


def encode_in_threads(tok, work: list[list[str]], want: list[list[list[int]]], rounds: int) -> list:
    """Encode ``work[k]`` ``rounds`` times in thread k, all at once; the k whose ids differed from
    ``want[k]`` and the errors raised."""
    errors: list = []

    def encode(k: int) -> None:
        try:
            for _ in range(rounds):
                if tok.encode_column(pa.array(work[k])).to_pylist() != want[k]:
                    errors.append(k)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=encode, args=(k,)) for k in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("form", ["metaspace", "prepend"])
def test_degenerate_columns(base_state, form):
    tok = _build(base_state, _prepend_form if form == "prepend" else None)
    for docs in (["", "", ""], [" "] * 5, ["   ", " ", ""], ["▁"] * 3, ["x "] * 4, [" x"] * 4, ["\x00 \x00"] * 2):
        want = _whole(tok, docs)
        assert tok.encode_column(pa.array(docs)).to_pylist() == want, docs
        assert tok.encode_column(pa.array(docs, pa.large_string())).to_pylist() == want, docs
        assert tok.encode_column(pa.array(docs), eos=2).to_pylist() == [w + [2] for w in want], docs
    # a slice of a column whose data buffer holds far more than the slice
    docs = _hostile(60, seed=3)
    big = pa.array(["zz " * 50] * 30 + docs + [" yy" * 50] * 30)
    assert tok.encode_column(big.slice(30, len(docs))).to_pylist() == _whole(tok, docs)
    assert tok.encode_column(big.slice(30, 0)).to_pylist() == []


@pytest.mark.parametrize("meta", ["▁", "¶", "𝄞", "_"])
def test_word_starts_follow_the_metaspace_bytes_of_any_width(base_state, meta):
    """Word starts are each non-empty text's start and each space after a character that is neither a
    space nor the metaspace, for metaspaces of 1, 2, 3 and 4 UTF-8 bytes (and look-alikes sharing
    their leading bytes)."""
    tok = _build(base_state, (lambda s: _swap_meta(s, meta)) if meta != "▁" else None)
    memo = tok.word_memo
    assert memo is not None and bytes(memo.meta) == meta.encode()
    docs = _hostile(300, seed=5) + [meta + " a", "a" + meta + " b", "\u2580 \u2582 " + meta + " 𝄟 ", meta * 3 + " "]
    arr = pa.array(docs)
    offsets = word_memo._value_offsets(arr)
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    bounds, _ = memo._word_bounds(data[offsets[0]:offsets[-1]], offsets - offsets[0])
    free = re.compile(f"(?<=[^ {re.escape(meta)}]) ")
    want = []
    for text, start in zip(docs, offsets[:-1]):
        if text:
            want.append(int(start))
            want += [int(start) + len(text[:m.start()].encode()) for m in free.finditer(text)]
    assert bounds.tolist() == want


def test_free_cuts_refuses_tokenizers_it_cannot_vouch_for(base_state):
    from tokenizers import AddedToken

    def refused(change=None, plain=(), special=(), **added) -> bool:
        tok = _build(base_state, change, plain, special)
        if added:
            tok.tk.add_tokens([AddedToken(added["content"], **{k: v for k, v in added.items() if k != "content"})])
        return free_cuts(tok.tk) is None

    def vocab_token(token: str):
        def change(state: dict) -> None:
            state["model"]["vocab"][token] = len(state["model"]["vocab"])
        return change

    def model(**kw):
        def change(state: dict) -> None:
            state["model"].update(kw)
        return change

    def metaspace_split(state: dict) -> None:
        state["pre_tokenizer"]["split"] = True

    assert not refused()
    assert refused(metaspace_split)
    assert refused(vocab_token("a▁"))  # a token that could span a cut
    assert refused(vocab_token("▁a▁b"))
    assert not refused(vocab_token("▁▁▁a"))
    assert refused(model(dropout=0.1))
    assert refused(model(ignore_merges=True))
    assert refused(plain=["a b"])
    assert refused(special=["<a▁>"])
    assert refused(content="ab", lstrip=True)
    assert refused(content="ab", rstrip=True)
    assert refused(content="ab", single_word=True)
    assert refused(lambda s: _prepend_form(s, " "))
    assert refused(_prepend_form, plain=["zq"])  # a non-special added token splits the text
    assert not refused(_prepend_form, special=["zq"])

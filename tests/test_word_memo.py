"""Encoding by distinct words (curate.word_memo): the ids are always the tokenizer's for each whole text."""

from __future__ import annotations

import re
import threading

import numpy as np
import pyarrow as pa
import pytest

import curate.word_memo as word_memo
from curate.testing import _paragraphs
from curate.tokenizer import CurateTokenizer, TokenizerSpec, free_cuts, prepare


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    return _paragraphs()


@pytest.fixture(scope="module")
def llama(tmp_path_factory, llama_folder) -> CurateTokenizer:
    run = tmp_path_factory.mktemp("run") / "tokenizer"
    prepare(TokenizerSpec(path=str(llama_folder)), run, ["<D>", "<|knot_1_head|>"], lambda: iter([]))
    return CurateTokenizer.load_run(run)


@pytest.fixture(scope="module")
def llama_prepend(llama) -> CurateTokenizer:
    """The same vocabulary in the form Llama 2's published tokenizer.json has: a ``Prepend("▁")`` then
    ``Replace(" ", "▁")`` normalizer and no pre-tokenizer."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(llama.tk.to_str())
    state["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    state["pre_tokenizer"] = None
    return CurateTokenizer(Tokenizer.from_str(json.dumps(state)), llama.specials, llama.split_chars)


def _fresh(tok: CurateTokenizer) -> CurateTokenizer:
    """The same tokenizer with an empty memo (tests must not share what an earlier one learned)."""
    from tokenizers import Tokenizer

    return CurateTokenizer(Tokenizer.from_str(tok.tk.to_str()), tok.specials, tok.split_chars)


def _whole(tok: CurateTokenizer, docs: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tok.tk.to_str())
    plain.encode_special_tokens = True
    return [e.ids for e in plain.encode_batch(docs, add_special_tokens=False)]


def _hostile(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("ab z\n\t▁é😀<s>") + [" ", "  ", "▁▁", "\u3000", "中文", ".", "\r\n", "\x00", "\u200b"]
    docs = ["".join(rng.choice(alphabet, int(rng.integers(0, 160)))) for _ in range(n)]
    return docs + [" leading", "trailing ", "  two  spaces  ", "▁ ▁ ▁", "x" * 500, "中" * 300 + " a" * 50, "",
                   " ", "▁", "   ", "a <s> b </s>c <D> d <|knot_1_head|> e " * 20, "\n \n ", "a▁ b▁  c ▁"]


def _lists(arr: pa.ListArray) -> list[list[int]]:
    return arr.to_pylist()


@pytest.mark.parametrize("seed", [0, 1])
def test_words_start_exactly_where_free_cuts_are(llama, seed):
    """Word starts found on the UTF-8 buffer are each non-empty text's start and every space whose
    previous character (same text) is neither a space nor ``▁`` — what the free-cut pattern matches."""
    docs = _hostile(400, seed)
    arr = pa.array(docs)
    memo = _fresh(llama).word_memo
    offsets = word_memo._value_offsets(arr)
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    bounds, first = memo._word_bounds(data[offsets[0]:offsets[-1]], offsets - offsets[0])
    free = re.compile("(?<=[^ ▁]) ")
    want, want_first = [], []
    for text, start in zip(docs, offsets[:-1]):
        if not text:
            continue
        want_first.append(len(want))
        want.append(int(start))
        want += [int(start) + len(text[:m.start()].encode()) for m in free.finditer(text) if m.start() > 0]
    assert bounds.tolist() == want
    assert first.tolist() == want_first


@pytest.mark.parametrize("form", ["metaspace", "prepend"])
def test_column_ids_equal_whole_text_ids_on_hostile_and_real_text(llama, llama_prepend, paragraphs, form):
    tok = _fresh(llama if form == "metaspace" else llama_prepend)
    assert tok.word_memo.drops == (form == "prepend")
    assert tok.word_memo is not None
    docs = _hostile(1500) + ["\n\n".join(paragraphs[i:i + 40]) for i in range(0, 400, 40)]
    want = _whole(tok, docs)
    assert _lists(tok.encode_column(pa.array(docs))) == want
    assert _lists(tok.encode_column(pa.array(docs))) == want  # again, every word now from the memo
    chunked = pa.chunked_array([pa.array(docs[:700], pa.large_string()), pa.array(docs[700:], pa.large_string())])
    assert _lists(tok.encode_column(chunked)) == want
    assert _lists(tok.encode_column(pa.array(docs, pa.string_view()))) == want


def test_slices_of_a_batch_and_a_sliced_column_give_the_same_ids(llama, monkeypatch):
    """The column is encoded in slices of whole texts; an input that is itself a slice (non-zero offset
    into its buffers) or a large_string column works the same."""
    tok = _fresh(llama)
    docs = _hostile(300, 11)
    want = _whole(tok, docs)
    for slice_bytes in (1, 64, 1 << 22):
        monkeypatch.setattr(word_memo, "SLICE_BYTES", slice_bytes)
        assert _lists(tok.encode_column(pa.array(docs))) == want
        assert _lists(tok.encode_column(pa.array(["pad me"] * 7 + docs).slice(7))) == want
        assert _lists(tok.encode_column(pa.array(docs, pa.large_string()).slice(5, 100))) == want[5:105]


@pytest.mark.parametrize("form", ["metaspace", "prepend"])
def test_end_of_text_ids_close_every_document_even_empty_ones(llama, llama_prepend, form):
    tok = _fresh(llama if form == "metaspace" else llama_prepend)
    docs = ["", "hello world", "", "   ", "a", " ", "b "]
    got = _lists(tok.encode_column(pa.array(docs), eos=2))
    assert got == [ids + [2] for ids in _whole(tok, docs)]
    assert _lists(tok.encode_column(pa.array([], pa.string()), eos=2)) == []
    assert _lists(tok.encode_column(pa.array(["", ""]))) == [[], []]


@pytest.mark.parametrize("form", ["metaspace", "prepend"])
def test_a_memo_that_starts_over_and_words_too_long_to_keep_change_no_ids(llama, llama_prepend, paragraphs, form,
                                                                           monkeypatch):
    monkeypatch.setattr(word_memo, "MAX_WORDS", 50)
    monkeypatch.setattr(word_memo, "CACHE_CHARS", 4)
    tok = _fresh(llama if form == "metaspace" else llama_prepend)
    tok.split_chars = 1000  # a word with no space longer than this is cut by the tokenizer's verified cuts
    batches = [[" ".join(paragraphs[i:i + 5]), "x" * 3000, "y" * 999 + " z"] for i in range(0, 60, 5)]
    for docs in batches:
        assert _lists(tok.encode_column(pa.array(docs))) == _whole(tok, docs)
        memo = tok.word_memo
        assert len(memo._index) + len(memo._first) <= 50
        assert all(len(w) <= 4 for w in [*memo._index, *memo._first])
        assert len(memo._starts) == len(memo._lengths) == len(memo._index) + len(memo._first)


def test_null_texts_take_the_plain_path_and_fail_as_before(llama):
    with pytest.raises(TypeError):
        _fresh(llama).encode_column(pa.array(["a", None]))


def test_threads_sharing_one_memo_get_their_own_ids(llama, paragraphs):
    tok = _fresh(llama)
    work = [[" ".join(paragraphs[i:i + 9])] * 3 + _hostile(30, i) for i in range(8)]
    want = [_whole(tok, docs) for docs in work]
    got: dict[int, list] = {}

    def encode(k: int) -> None:
        got[k] = _lists(tok.encode_column(pa.array(work[k])))

    threads = [threading.Thread(target=encode, args=(k,)) for k in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(len(work))] == want


def test_tokenizers_without_free_cuts_encode_as_before(paragraphs):
    """Byte-level BPE (GPT-2 style): no memo, the column path gives encode_arrays' ids."""
    from curate.tokenizer import TrainSpec, train_bpe

    tk = train_bpe(TrainSpec(vocab_size=500), paragraphs[:200])
    assert free_cuts(tk) is None
    tok = CurateTokenizer(tk, {})
    assert tok.word_memo is None
    docs = _hostile(100)
    assert _lists(tok.encode_column(pa.array(docs))) == [a.tolist() for a in tok.encode_arrays(docs)]


def test_the_prepend_form_allows_free_cuts_only_when_nothing_can_split_the_text(llama_prepend):
    """Llama 2's normalizer form: cut pieces are encoded without their first space. A non-special added
    token would split the text (and the normalizer prefix each part), special tokens left as markers
    would too, and any other normalizer could change spaces: no free cuts then."""
    import json

    from tokenizers import Tokenizer, normalizers

    from curate.tokenizer import drops_cut_space

    tok = _fresh(llama_prepend)
    assert free_cuts(tok.tk) is not None and drops_cut_space(tok.tk)
    assert tok.split("word " * 600)[1][:4] == "word"  # the space before the cut is left out

    def variant(change, as_text: bool = True):
        tk = Tokenizer.from_str(tok.tk.to_str())
        tk.encode_special_tokens = as_text
        change(tk)
        return tk

    assert free_cuts(variant(lambda tk: None)) is not None
    assert free_cuts(variant(lambda tk: None, as_text=False)) is None
    assert free_cuts(variant(lambda tk: tk.add_tokens(["<plain>"]))) is None
    assert free_cuts(variant(lambda tk: tk.add_special_tokens(["<ok>"]))) is not None
    assert free_cuts(variant(lambda tk: setattr(tk, "normalizer", normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "_")])))) is None
    assert free_cuts(variant(lambda tk: setattr(tk, "normalizer", normalizers.Sequence(
        [normalizers.Replace(" ", "▁"), normalizers.Prepend("▁")])))) is None
    assert free_cuts(variant(lambda tk: setattr(tk, "normalizer", normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])))) is None
    state = json.loads(tok.tk.to_str())
    state["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    assert free_cuts(Tokenizer.from_str(json.dumps(state))) is None  # both at once: not a known form


def test_prepend_form_free_cut_pieces_give_whole_ids(llama_prepend, paragraphs, monkeypatch):
    """The non-column path (encode_arrays, used by the other stages) with cut pieces for that form."""
    import curate.tokenizer as tokenizer_module

    tok = _fresh(llama_prepend)
    docs = _hostile(600, 3) + ["\n\n".join(paragraphs[i:i + 30]) for i in range(0, 300, 30)]
    want = _whole(tok, docs)
    for piece_chars in (1, 5, 40):
        monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", piece_chars)
        assert [a.tolist() for a in tok.encode_arrays(docs, group_chars=3000)] == want, piece_chars


def test_new_words_are_encoded_joined_and_split_back_exactly(llama, paragraphs, monkeypatch):
    """New words go to the encoder joined (one input per ~2,000 characters) and their ids are split back
    by the bytes each token stands for; on real text with the real tokenizer that split succeeds for
    every string (no word falls back to being encoded alone but texts' first words)."""
    tok = _fresh(llama)
    memo = tok.word_memo
    calls = {"joined": 0, "failed": 0, "alone": 0}
    joined, each = memo._encode_joined, memo._each

    def spy_joined(words):
        ids, starts, lengths, ok = joined(words)
        calls["joined"] += int(ok.sum())
        calls["failed"] += int((~ok).sum())
        return ids, starts, lengths, ok

    def spy_each(words, first):
        calls["alone"] += len(words)
        return each(words, first)

    monkeypatch.setattr(memo, "_encode_joined", spy_joined)
    monkeypatch.setattr(memo, "_each", spy_each)
    docs = ["\n\n".join(paragraphs[i:i + 20]) for i in range(0, 2000, 20)]
    assert _lists(tok.encode_column(pa.array(docs))) == _whole(tok, docs)
    assert calls["joined"] > 1000 and calls["failed"] == 0  # words split back from joined strings
    assert calls["alone"] <= 2 * len(docs)  # first and last words of texts only

"""The tokenizer layer: run preparation, special tokens, verified splitting, loading paths."""

from __future__ import annotations

import json

import pytest

from curate.testing import _paragraphs
from curate.tokenizer import CurateTokenizer, TokenizerSpec, TrainSpec, prepare, train_bpe
from tests.conftest import cli, write_manifest


@pytest.fixture(scope="module")
def texts():
    return _paragraphs()


@pytest.fixture(scope="module")
def bpe(texts):
    return train_bpe(TrainSpec(vocab_size=3000), texts)


def test_training_is_deterministic_and_canonical(tmp_path, texts):
    spec = TokenizerSpec(train={"vocab_size": 3000})
    a = prepare(spec, tmp_path / "a", ["<D>"], lambda: iter(texts))
    b = prepare(spec, tmp_path / "b", ["<D>"], lambda: iter(texts))
    assert a == b
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a["ids"] == {"<D>": 3000} and a["vocab_size"] == 3001


def test_split_encoding_equals_whole_encoding(bpe, texts):
    """Long documents are cut before encoding; the ids must equal whole-document ids exactly."""
    tok = CurateTokenizer(bpe, {}, split_chars=2000)
    docs = ["\n\n".join(texts[i:i + 400]) for i in range(0, 4000, 400)]
    docs.append("word " * 5000 + "x" * 3000 + "\n" * 50 + "  spaced   out  " * 400)
    bpe.encode_special_tokens = True
    whole = [bpe.encode(d, add_special_tokens=False).ids for d in docs]
    assert all(len(d) > 2000 for d in docs)
    assert sum(len(tok.split(d)) for d in docs) > 3 * len(docs)  # really cut
    assert tok.encode_batch(docs) == whole


def test_any_grouping_gives_the_ids_of_one_call(bpe, texts):
    """encode_arrays encodes in groups of about group_chars characters: any grouping (pieces of one
    document in several groups, one piece a group, empty texts) gives each text the ids of encoding it
    whole."""
    tok = CurateTokenizer(bpe, {}, split_chars=2000)
    docs = ["\n\n".join(texts[i:i + 60]) for i in range(0, 1200, 60)] + ["", texts[0], "x" * 9000]
    bpe.encode_special_tokens = True
    whole = [bpe.encode(d, add_special_tokens=False).ids for d in docs]
    for group_chars in (1, 3000, 25_000, 10**9):
        got = tok.encode_arrays(docs, group_chars=group_chars)
        assert [a.tolist() for a in got] == whole, group_chars
        assert all(a.dtype.name == "int32" for a in got)


def test_sentencepiece_style_tokenizer_splits_safely():
    """A Metaspace (SentencePiece-style) pre-tokenizer: cuts are verified, ids unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    data = _paragraphs()
    tk.train_from_iterator(data, trainers.UnigramTrainer(vocab_size=2000, show_progress=False))
    tok = CurateTokenizer(tk, {}, split_chars=1500)
    doc = "\n".join(data[:600])
    assert tok.encode_batch([doc]) == [tk.encode(doc, add_special_tokens=False).ids]
    assert len(tok.split(doc)) > 3


def test_literal_special_strings_in_text_stay_text(tmp_path, texts):
    spec = TokenizerSpec(train={"vocab_size": 3000})
    prepare(spec, tmp_path / "t", ["<D>", "</S>"], lambda: iter(texts))
    tok = CurateTokenizer.load_run(tmp_path / "t")
    ids = tok.encode_batch(["see <D> and </S> and <|endoftext|> here"])[0]
    assert tok.special_id("<D>") not in ids and tok.special_id("</S>") not in ids
    assert tok.decode(ids) == "see <D> and </S> and <|endoftext|> here"


def test_reserved_tokens_are_reused_before_growing_the_vocab(tmp_path, bpe):
    from tokenizers import AddedToken, Tokenizer

    bpe = Tokenizer.from_str(bpe.to_str())  # a copy: the fixture is shared
    bpe.add_special_tokens([AddedToken(f"<|reserved_special_token_{i}|>", special=True) for i in range(3)])
    folder = tmp_path / "base"
    folder.mkdir()
    bpe.save(str(folder / "tokenizer.json"))
    size = bpe.get_vocab_size(with_added_tokens=True)
    spec = TokenizerSpec(path=str(folder), special_tokens={"<D>": "<|doc|>"})
    meta = prepare(spec, tmp_path / "run", ["<D>", "</D>", "<S>", "<s>"], lambda: iter([]))
    reserved = [bpe.token_to_id(f"<|reserved_special_token_{i}|>") for i in range(3)]
    assert [meta["ids"][t] for t in ("<D>", "</D>", "<S>")] == reserved  # keyed by the name stages use
    assert meta["strings"]["<D>"] == "<|reserved_special_token_0|>"
    assert meta["ids"]["<s>"] == size  # no reserved token left: added at the end
    assert meta["strings"]["<s>"] == "<s>" and meta["vocab_size"] == size + 1
    assert CurateTokenizer.load_run(tmp_path / "run").special_id("<D>") == reserved[0]


def _base_with(tmp_path, bpe, added, config=None):
    """A tokenizer folder: the fixture's BPE plus ``added`` tokens (string → special?) and a config."""
    from tokenizers import AddedToken, Tokenizer

    tk = Tokenizer.from_str(bpe.to_str())
    for token, special in added.items():
        (tk.add_special_tokens if special else tk.add_tokens)([AddedToken(token, special=special, normalized=False)])
    folder = tmp_path / "base"
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, tk


def test_a_special_token_never_takes_an_id_the_tokenizer_already_uses(tmp_path, bpe):
    """Roles (BOS ``<s>`` …) and ordinary text pieces are never shared; a non-role special is reused."""
    folder, tk = _base_with(tmp_path, bpe, {"<s>": True, "[BEGIN]": True, "<D>": True, "</D>": False},
                            config={"bos_token": "[BEGIN]"})
    size = tk.get_vocab_size(with_added_tokens=True)
    meta = prepare(TokenizerSpec(path=str(folder)), tmp_path / "run", ["<D>", "</D>", "<s>", "[BEGIN]"],
                   lambda: iter([]))
    ids, strings = meta["ids"], meta["strings"]
    assert ids["<D>"] == tk.token_to_id("<D>")  # an existing non-role special: an earlier run's marker
    for name in ("</D>", "<s>", "[BEGIN]"):  # text piece, well-known role, role named by the config
        assert ids[name] >= size and ids[name] != tk.token_to_id(name)
        assert strings[name].startswith("<|curate_")
    assert len(set(ids.values())) == 4
    tok = CurateTokenizer.load_run(tmp_path / "run")
    assert tok.decode([ids["<s>"], ids["</D>"]]) == "<s></D>"  # shown by the names stages use
    text = "a <s> b </D> c <|curate_s|>"
    assert not set(tok.encode_batch([text])[0]) & set(ids.values())  # data never becomes a marker
    # a tokenizer an earlier run extended keeps the same ids
    again = prepare(TokenizerSpec(path=str(tmp_path / "run" / "tokenizer.json")), tmp_path / "run2",
                    ["<D>", "</D>", "<s>", "[BEGIN]"], lambda: iter([]))
    assert again["ids"] == {n: i for n, i in ids.items() if n != "[BEGIN]"} | {"[BEGIN]": again["ids"]["[BEGIN]"]}


def test_a_colliding_name_prefers_a_free_reserved_token(tmp_path, bpe):
    folder, tk = _base_with(tmp_path, bpe, {"<s>": True, "<|reserved_special_token_0|>": True})
    meta = prepare(TokenizerSpec(path=str(folder)), tmp_path / "run", ["<s>"], lambda: iter([]))
    assert meta["ids"]["<s>"] == tk.token_to_id("<|reserved_special_token_0|>")


def test_a_chosen_string_the_tokenizer_already_uses_is_a_config_error(tmp_path, bpe):
    from curate.errors import ConfigError

    folder, _ = _base_with(tmp_path, bpe, {"</s>": True})
    with pytest.raises(ConfigError, match="tokenizer.special_tokens: '<S>' → '</s>'"):
        prepare(TokenizerSpec(path=str(folder), special_tokens={"<S>": "</s>"}), tmp_path / "run", ["<S>"],
                lambda: iter([]))
    with pytest.raises(ConfigError, match="more than one"):
        prepare(TokenizerSpec(path=str(folder), special_tokens={"<S>": "<x>", "<D>": "<x>"}), tmp_path / "r2",
                ["<S>", "<D>"], lambda: iter([]))


def test_real_llama_tokenizer_through_autotokenizer(tmp_path, llama_folder, texts):
    """No tokenizer.json: loaded by AutoTokenizer, same ids as transformers gives, splits verified."""
    from transformers import AutoTokenizer

    meta = prepare(TokenizerSpec(path=str(llama_folder), split_chars=3000), tmp_path / "run", ["<D>"],
                   lambda: iter([]))
    assert meta["vocab_size"] == 32001 and meta["ids"]["<D>"] == 32000
    tok = CurateTokenizer.load_run(tmp_path / "run")
    hf = AutoTokenizer.from_pretrained(str(llama_folder))
    docs = ["\n\n".join(texts[i:i + 300]) for i in range(0, 1500, 300)] + ["a  b   c    d " * 2000]
    assert tok.encode_batch(docs) == [hf(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert sum(len(tok.split(d)) for d in docs) > 2 * len(docs)
    assert tok.eos_id == hf.eos_token_id


def test_run_records_vocab_digest_and_needs_tokenizer_config(tmp_path):
    m = write_manifest(tmp_path / "m.yaml", """
        name: tok
        source: {kind: stdlib_docs, shards: 2}
        stages: [tokenize]
        sink: {kind: parquet}
        """)
    proc = cli("validate", str(m), check=False)
    assert proc.returncode == 2 and "stages[0].tokenize: needs a tokenizer" in proc.stderr.replace("\n", " ")
    m.write_text(m.read_text() + "tokenizer: {train: {vocab_size: 1000}}\nexecutor: {kind: local, workers: 1}\n")
    cli("run", str(m), "-o", str(tmp_path / "r"), "--no-progress")
    stats = json.loads((tmp_path / "r" / "stats.json").read_text())
    assert stats["tokenizer"]["vocab_size"] == 1000 and len(stats["tokenizer"]["vocab_sha256"]) == 64
    assert stats["stages"]["tokenize"]["tokens_out"] > 100_000


def _roles_from_full_json(tk) -> set[str]:
    """Role strings read from the whole serialized tokenizer (the reference for role_tokens)."""
    import orjson

    spec = orjson.loads(tk.to_str())
    model, roles = spec.get("model") or {}, set()
    if isinstance(model.get("unk_token"), str):
        roles.add(model["unk_token"])
    if model.get("type") == "Unigram" and model.get("unk_id") is not None:
        roles.add(model["vocab"][model["unk_id"]][0])
    stack = [spec.get("post_processor")]
    while stack:
        proc = stack.pop()
        if isinstance(proc, dict):
            stack += proc.get("processors") or []
            roles.update((proc.get("special_tokens") or {}).keys())
            roles.update(proc[k][0] for k in ("sep", "cls") if isinstance(proc.get(k), list) and proc[k])
    return roles


@pytest.mark.parametrize("kind", ["unigram", "bpe-template", "wordpiece-sequence"])
def test_role_tokens_read_unknown_token_and_post_processor_roles(kind):
    """Roles come from the model's unknown token and the post-processor (nested in a Sequence too)."""
    from tokenizers import Tokenizer, models, processors

    from curate.tokenizer import ROLE_SPELLINGS, role_tokens

    if kind == "unigram":
        tk = Tokenizer(models.Unigram([("a", -1.0), ("<zz-unk>", 0.0), ("b", -2.0)], unk_id=1))
    elif kind == "bpe-template":
        tk = Tokenizer(models.BPE({"a": 0, "b": 1, "<my-unk>": 2, "<go>": 3, "<stop>": 4}, [], unk_token="<my-unk>"))
        tk.post_processor = processors.TemplateProcessing(single="<go> $A <stop>", special_tokens=[("<go>", 3),
                                                                                                   ("<stop>", 4)])
    else:
        tk = Tokenizer(models.WordPiece({"a": 0, "[oov]": 1, "<c>": 2, "<s2>": 3}, unk_token="[oov]"))
        tk.post_processor = processors.Sequence([processors.RobertaProcessing(("<s2>", 3), ("<c>", 2)),
                                                 processors.ByteLevel()])
    roles = role_tokens(tk)
    expected = _roles_from_full_json(tk)
    assert expected and expected <= roles
    assert roles - expected <= set(ROLE_SPELLINGS)


def test_every_reserved_pattern_starts_with_the_character_the_scan_tests_first():
    import re

    from curate.tokenizer import RESERVED_PATTERNS

    for pattern in RESERVED_PATTERNS:
        assert re.sub(r"^\\", "", pattern)[:1] in "<[", pattern


def _run_llama(tmp_path, llama_folder) -> CurateTokenizer:
    prepare(TokenizerSpec(path=str(llama_folder)), tmp_path / "run", ["<D>", "<|knot_1_head|>"], lambda: iter([]))
    return CurateTokenizer.load_run(tmp_path / "run")


def test_free_cuts_are_taken_only_where_they_are_provably_safe(tmp_path, llama_folder, bpe):
    """SentencePiece-style BPE (Metaspace, split false, no token with an inner metaspace) allows them;
    any change that could let a merge or an added token span a cut does not."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

    from curate.tokenizer import free_cuts

    llama = _run_llama(tmp_path, llama_folder).tk
    assert free_cuts(llama) is not None
    assert free_cuts(bpe) is None  # byte-level BPE: its pre-tokenizer splits words already

    def variant(change):
        tk = Tokenizer.from_str(llama.to_str())
        change(tk)
        return tk

    assert free_cuts(variant(lambda tk: setattr(tk, "normalizer", normalizers.NFKC()))) is None
    assert free_cuts(variant(lambda tk: setattr(tk, "pre_tokenizer", pre_tokenizers.Metaspace(split=True)))) is None
    assert free_cuts(variant(lambda tk: tk.add_tokens(["new york"]))) is None
    assert free_cuts(variant(lambda tk: tk.add_tokens(["▁x"]))) is None
    assert free_cuts(variant(lambda tk: tk.add_tokens([AddedToken("<m>", rstrip=True)]))) is None
    assert free_cuts(variant(lambda tk: tk.add_special_tokens(["<ok>"]))) is not None
    state = json.loads(llama.to_str())  # a vocabulary token with a metaspace after another character:
    model = state["model"]  # a token no merge builds on becomes "a▁b" (and the merge making it goes)
    pairs = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    parts = {t for pair in pairs for t in pair}
    leaf = next(a + b for a, b in pairs if (a + b).startswith("▁") and len(a + b) > 4 and a + b not in parts)
    model["merges"] = [pair for pair in pairs if "".join(pair) != leaf]
    model["vocab"]["a▁b"] = model["vocab"].pop(leaf)
    assert free_cuts(Tokenizer.from_str(json.dumps(state))) is None


def test_free_cut_pieces_give_every_text_its_whole_ids(tmp_path, llama_folder, texts, monkeypatch):
    """Cut every few characters before a space, hostile spacing, literal metaspaces, byte-fallback
    characters, texts without spaces: the ids are those of encoding each text whole."""
    import numpy as np
    from tokenizers import Tokenizer

    import curate.tokenizer as tokenizer_module

    tok = _run_llama(tmp_path, llama_folder)
    whole = Tokenizer.from_str(tok.tk.to_str())
    whole.encode_special_tokens = True
    rng = np.random.default_rng(0)
    alphabet = list("ab z\n\t▁é😀<s>") + [" ", "  ", "▁▁", "\u3000", "中文", ".", "\r\n"]
    docs = ["".join(rng.choice(alphabet, int(rng.integers(0, 120)))) for _ in range(1500)]
    docs += ["\n\n".join(texts[i:i + 40]) for i in range(0, 400, 40)]
    docs += [" leading", "trailing ", "  two  spaces  ", "▁ ▁ ▁", "x" * 500, "中" * 300 + " a" * 50, "",
             "a <s> b </s>c <D> d <|knot_1_head|> e " * 20]
    want = [e.ids for e in whole.encode_batch(docs, add_special_tokens=False)]
    for piece_chars in (1, 3, 8, 50):
        monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", piece_chars)
        assert sum(len(tok.split(d)) for d in docs) > len(docs) + 100  # really cut
        got = tok.encode_arrays(docs, group_chars=2000)
        assert [a.tolist() for a in got] == want, piece_chars
    monkeypatch.setattr(tok, "split_chars", 200)  # a piece with no space to cut at gets verified cuts
    assert [a.tolist() for a in tok.encode_arrays(docs)] == want


def test_a_padding_or_truncation_saved_in_the_tokenizer_changes_no_ids(tmp_path, llama_folder, texts):
    """A tokenizer.json may carry padding or truncation; pieces must not be padded or cut."""
    from tokenizers import Tokenizer

    tok = _run_llama(tmp_path, llama_folder)
    plain = Tokenizer.from_str(tok.tk.to_str())
    plain.encode_special_tokens = True
    docs = ["\n\n".join(texts[i:i + 30]) for i in range(0, 300, 30)]
    want = [e.ids for e in plain.encode_batch(docs, add_special_tokens=False)]
    padded = Tokenizer.from_str(tok.tk.to_str())
    padded.enable_padding(pad_id=0, length=4096)
    padded.enable_truncation(max_length=100)
    got = CurateTokenizer(padded, {}).encode_arrays(docs)
    assert [a.tolist() for a in got] == want


def test_free_cut_tokenizing_after_an_exception_and_a_killed_worker_reruns_exactly(tmp_path, llama_folder):
    """tokenize → utk → pack with the Mistral tokenizer (free cuts): an exception inside tokenize, then a
    worker SIGKILLed mid-sink; each time a plain rerun gives the bytes of a run that never failed."""
    from tests.conftest import make_text, write_jsonl
    from tests.test_faults import _cli_run, _run, output_digest

    for f in range(3):
        write_jsonl(tmp_path / "in" / f"p{f}.jsonl",
                    [{"id": f"d{f}-{i}", "text": make_text(f * 50 + i, 300 + 97 * i)} for i in range(12)])
    m = write_manifest(tmp_path / "m.yaml", f"""
name: free-cuts
seed: 5
source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id, batch_rows: 4}}
tokenizer: {{path: "{llama_folder}"}}
stages:
  - tokenize: {{}}
  - utk: {{seq_len: 2048}}
  - pack: {{seq_len: 2048}}
sink: {{kind: parquet}}
executor: {{kind: local, workers: 2}}
""")
    assert _run(m, tmp_path / "clean") is None
    clean = output_digest(tmp_path / "clean")
    fault = [{"point": "stage", "label": "tokenize", "shard": "00001", "after": 1}]
    assert _run(m, tmp_path / "raised", fault) is not None
    assert _run(m, tmp_path / "raised") is None
    assert output_digest(tmp_path / "raised") == clean
    killed = [{"point": "sink", "shard": "00002", "after": 1, "action": "kill", "once": str(tmp_path / "fired")}]
    assert _cli_run(m, tmp_path / "killed", faults=killed).returncode == 0
    assert (tmp_path / "fired").exists()
    assert output_digest(tmp_path / "killed") == clean

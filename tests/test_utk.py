"""UtK chunk-shuffle: property tests (hypothesis) of the invariants the reference implies."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.stages.tokenize import id_lists
from synthesizers.utk import D_CLOSE, D_OPEN, FIXED_KNOTS, S_CLOSE, S_OPEN, S_SEP, knot_pair
from tests.helpers_tokenizer import prepare_tokenizer

ALL_SPECIALS = [k for b in range(1, 6) for k in knot_pair(b)] + list(FIXED_KNOTS) + [D_OPEN, D_CLOSE, S_OPEN,
                                                                                      S_SEP, S_CLOSE]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("utk")
    prepare_tokenizer(root, ALL_SPECIALS)
    rd = RunDir(root)
    rd.create()
    return rd


def _run(rd: RunDir, docs: list[list[int]], seed: int = 0, **params):
    cls = get_stage("utk")
    stage = cls(cls.Params(**params))
    ctx = RunContext(seed, Shard("00000", "k", "mem"), rd)
    stage.setup(ctx)
    batch = pa.RecordBatch.from_pydict({"id": [f"doc{i}" for i in range(len(docs))], "input_ids": id_lists(docs)})
    half = len(docs) // 2  # two batches: windows must not depend on batching
    out = list(stage.run(iter([batch.slice(0, half), batch.slice(half)]), ctx))
    return stage, (pa.Table.from_batches(out).to_pylist() if out else [])


def _parse(stage, row: dict) -> dict:
    """Recover the structure of one output row from token identities alone."""
    sp = stage.sp
    knot_ids = {i for t, i in sp.items() if "knot" in t}
    tokens = row["input_ids"]
    parsed = {"bodies": {}, "ids": {}, "trailers": {}, "is_knot": [False] * len(tokens),
              "in_d": [False] * len(tokens), "order": []}
    for chunk in row["utk_chunks"]:
        doc, part, a, b = chunk["doc"], chunk["part"], chunk["start"], chunk["end"]
        parsed["order"].append((doc, part))
        seg = tokens[a:b]
        i = 0
        if D_OPEN in sp and seg and seg[0] == sp[D_OPEN]:
            j = seg.index(sp[D_CLOSE])
            parsed["ids"][(doc, part)] = seg[1:j]
            for k in range(a, a + j + 1):
                parsed["in_d"][k] = True
            i = j + 1
        end = len(seg)
        if S_OPEN in sp and sp[S_OPEN] in seg[i:]:
            s = seg.index(sp[S_OPEN], i)
            trailer = seg[s + 1:-1]
            assert seg[-1] == sp[S_CLOSE]
            ids, cur = [], []
            for t in trailer:
                if t == sp[S_SEP]:
                    ids.append(cur)
                    cur = []
                else:
                    cur.append(t)
            ids.append(cur)
            parsed["trailers"][doc] = ids
            end = s
        body = seg[i:end]
        if stage.params.split == "fixed":  # numbered knots: <open> digits <close>
            heads = (sp[FIXED_KNOTS[0]], sp[FIXED_KNOTS[1]])
            tails = (sp[FIXED_KNOTS[2]], sp[FIXED_KNOTS[3]])
            lo, hi = 0, len(body)
            if body and body[0] == heads[0]:
                lo = body.index(heads[1]) + 1
            if tails[0] in body:
                hi = body.index(tails[0])
                assert body[-1] == tails[1]
            for k in list(range(a + i, a + i + lo)) + list(range(a + i + hi, a + i + len(body))):
                parsed["is_knot"][k] = True
            body = body[lo:hi]
        else:
            for k, t in enumerate(seg[i:end]):
                if t in knot_ids:
                    parsed["is_knot"][a + i + k] = True
            body = [t for t in body if t not in knot_ids]
        parsed["bodies"][(doc, part)] = body
    return parsed


docs_strategy = st.lists(st.lists(st.integers(0, 250), min_size=1, max_size=300), min_size=1, max_size=12)
params_strategy = st.fixed_dictionaries({
    "seq_len": st.integers(120, 700),
    "chunks": st.lists(st.integers(1, 4), min_size=1, max_size=3),
    "augment_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "split": st.sampled_from(["random", "equal", "fixed"]),
    "span": st.integers(5, 60),
    "preserve_order": st.booleans(),
    "backtrace": st.booleans(),
})
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(docs=docs_strategy, params=params_strategy, seed=st.integers(0, 2**31))
def test_utk_invariants(run_dir, docs, params, seed):
    stage, rows = _run(run_dir, docs, seed, **params)
    seen: dict[str, list[int]] = {}
    for row in rows:
        tokens = row["input_ids"]
        assert len(tokens) <= params["seq_len"] and row["n_tokens"] == len(tokens)
        assert len(row["loss_mask"]) == len(tokens)
        parsed = _parse(stage, row)
        # every document (or piece) reassembles exactly from its chunk bodies, in part order
        for d, doc_id in enumerate(row["lineage"]):
            parts = sorted(p for (dd, p) in parsed["bodies"] if dd == d)
            assert parts == list(range(len(parts)))
            seen[doc_id] = [t for p in parts for t in parsed["bodies"][(d, p)]]
            order = [p for (dd, p) in parsed["order"] if dd == d]
            if params["preserve_order"]:
                assert order == sorted(order)
            # backtrace: the trailer lists the chunk ids in original order
            if params["backtrace"] and len(parts) > 1:
                assert parsed["trailers"][d] == [parsed["ids"][(d, p)] for p in parts]
                last_pos = max(k for k, (dd, _) in enumerate(parsed["order"]) if dd == d)
                assert row["utk_chunks"][last_pos]["end"] > row["utk_chunks"][last_pos]["start"]
        # the last chunk of the last document stays at the end
        last_doc = len(row["lineage"]) - 1
        assert parsed["order"][-1] == (last_doc, max(p for (dd, p) in parsed["order"] if dd == last_doc))
        # the loss mask: exactly knots, <D> … </D> inputs, label <D>/<S>, input </S>, and the first
        # token of every chunk (the target after a document's end, as the reference's EOD masking)
        sp = stage.sp
        starts = {c["start"] for c in row["utk_chunks"]}
        expect = []
        for t in range(len(tokens)):
            masked = parsed["is_knot"][t] or tokens[t] in (sp.get(D_OPEN), sp.get(S_OPEN)) or t in starts
            if t > 0:
                masked = masked or parsed["is_knot"][t - 1] or parsed["in_d"][t - 1] or tokens[t - 1] == sp.get(S_CLOSE)
            expect.append(0 if masked else 1)
        assert row["loss_mask"] == expect
        # a window with chunks from several documents is one attention unit
        if len(parsed["order"]) > len(row["lineage"]):
            assert row["doc_offsets"] == [0, len(tokens)]
    # the multiset (indeed the sequence) of every document's tokens is preserved
    rebuilt: dict[str, list[int]] = {}
    for doc_id, toks in seen.items():
        rebuilt.setdefault(doc_id.split("#")[0], []).extend(toks)
    assert rebuilt == {f"doc{i}": d for i, d in enumerate(docs)}
    assert Counter(t for d in docs for t in d) == Counter(t for v in rebuilt.values() for t in v)


def test_same_seed_same_bytes_other_seed_other_shuffle(run_dir):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 250, rng.integers(30, 200)).tolist() for _ in range(40)]
    params = {"seq_len": 1024, "augment_fraction": 1.0}
    stage, a = _run(run_dir, docs, 1, **params)
    _, b = _run(run_dir, docs, 1, **params)
    backtraces = sum(r["input_ids"].count(stage.sp[S_OPEN]) for r in a)
    assert backtraces >= 30  # most documents were split, each with its <S> … </S> target
    _, c = _run(run_dir, docs, 2, **params)
    assert a == b
    assert [r["input_ids"] for r in a] != [r["input_ids"] for r in c]


def test_scrambled_order_happens_when_asked(run_dir):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 250, 150).tolist() for _ in range(30)]
    stage, rows = _run(run_dir, docs, 3, seq_len=2048, augment_fraction=1.0, chunks=[3], preserve_order=False)
    out_of_order = 0
    for row in rows:
        order = _parse(stage, row)["order"]
        for d in range(len(row["lineage"])):
            parts = [p for (dd, p) in order if dd == d]
            out_of_order += parts != sorted(parts)
    assert out_of_order > 0


def test_augment_fraction_is_respected(run_dir):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 250, rng.integers(20, 60)).tolist() for _ in range(2000)]
    stage, rows = _run(run_dir, docs, 5, seq_len=200, augment_fraction=0.8, chunks=[2, 3])
    augmented = sum(len(r["utk_chunks"]) > len(r["lineage"]) for r in rows)
    assert 0.72 < augmented / len(rows) < 0.88, augmented / len(rows)


# ---------------------------------------------------------------------- no target crosses documents
DOC_BASE = 100_000  # document i's tokens are DOC_BASE + 1000 i + (0 … 998); DOC_BASE + 1000 i + 999 ends it


def _value_coded_docs(lengths: list[int]) -> list[list[int]]:
    """Documents whose every token says which document it is; the last token plays its EOD."""
    return [[DOC_BASE + 1000 * i + k % 999 for k in range(n)] + [DOC_BASE + 1000 * i + 999]
            for i, n in enumerate(lengths)]


def _owners(tokens: list[int], closing: set[int]) -> list[int | None]:
    """The document of every token, derived from token values alone (not from the stage's columns).

    A text token names its document. Marker tokens (knots, ``<D> id </D>``, ``<S> … </S>``) sit in runs
    between text tokens: a run's tokens up to its last closing marker (a tail knot or ``</S>``) close
    the chunk before, the rest open the chunk after.
    """
    owner: list[int | None] = [(t - DOC_BASE) // 1000 if t >= DOC_BASE else None for t in tokens]
    i = 0
    while i < len(tokens):
        if owner[i] is not None:
            i += 1
            continue
        j = i
        while j < len(tokens) and owner[j] is None:
            j += 1
        before = owner[i - 1] if i else None
        after = owner[j] if j < len(tokens) else None
        last_close = max((k for k in range(i, j) if tokens[k] in closing), default=i - 1)
        for k in range(i, j):
            owner[k] = before if k <= last_close else after
        i = j
    return owner


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 150), min_size=1, max_size=8),
       split=st.sampled_from(["random", "equal", "fixed"]), backtrace=st.booleans(), preserve_order=st.booleans(),
       chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3), span=st.integers(3, 40),
       augment_fraction=st.sampled_from([1.0, 0.5]), seq_len=st.integers(200, 600), seed=st.integers(0, 2**31))
def test_no_trained_target_crosses_from_one_document_to_another(run_dir, lengths, split, backtrace, preserve_order,
                                                                chunks, span, augment_fraction, seq_len, seed):
    """For every t with loss_mask[t] == 1 (token t predicted from t-1), tokens t-1 and t share a document."""
    docs = _value_coded_docs(lengths)
    stage, rows = _run(run_dir, docs, seed, seq_len=seq_len, chunks=chunks, split=split, span=span,
                       backtrace=backtrace, preserve_order=preserve_order, augment_fraction=augment_fraction)
    sp = stage.sp
    closing = {i for name, i in sp.items() if name.endswith("_tail|>") or name in (FIXED_KNOTS[3], S_CLOSE)}
    augmented = 0
    for row in rows:
        tokens, loss = row["input_ids"], row["loss_mask"]
        owner = _owners(tokens, closing)
        assert loss[0] == 0  # the window's first token has no input in the window
        for t in range(1, len(tokens)):
            if loss[t]:
                assert owner[t - 1] == owner[t] is not None, (t, tokens[t - 1:t + 1])
        augmented += len(row["utk_chunks"]) > len(row["lineage"])
    if augment_fraction == 1.0 and split != "fixed" and min(chunks) > 1 and min(lengths) >= 4:
        assert augmented  # the property was exercised on augmented windows


def test_a_plain_chunk_end_meeting_another_document_is_masked(run_dir):
    """Without backtrace, the last chunk of one document runs straight into another document's chunk."""
    docs = _value_coded_docs([60] * 12)
    stage, rows = _run(run_dir, docs, 4, seq_len=400, chunks=[2], augment_fraction=1.0, backtrace=False)
    met = 0
    for row in rows:
        tokens, loss = row["input_ids"], row["loss_mask"]
        for t in range(1, len(tokens)):
            a, b = tokens[t - 1], tokens[t]
            if a >= DOC_BASE and b >= DOC_BASE and (a - DOC_BASE) // 1000 != (b - DOC_BASE) // 1000:
                met += 1
                assert loss[t] == 0
    assert met > 0


def test_fixed_span_knots_carry_each_chunks_own_number(run_dir):
    """As the reference numbers them: chunk j starts with head(j) and ends with tail(j)."""
    docs = [[DOC_BASE + k for k in range(95)]]
    stage, rows = _run(run_dir, docs, 0, seq_len=400, split="fixed", span=20, augment_fraction=1.0, backtrace=False)
    (row,) = rows
    sp, tok = stage.sp, stage.tok
    text = tok.decode(row["input_ids"])
    numbers = {}
    for kind, open_, close in (("head", FIXED_KNOTS[0], FIXED_KNOTS[1]), ("tail", FIXED_KNOTS[2], FIXED_KNOTS[3])):
        ids = row["input_ids"]
        found = []
        for i, t in enumerate(ids):
            if t == sp[open_]:
                found.append(tok.decode(ids[i + 1:ids.index(sp[close], i)]).strip())
        numbers[kind] = found
    assert numbers["head"] == ["1", "2", "3", "4"] and numbers["tail"] == ["0", "1", "2", "3"], (numbers, text)


# ---------------------------------------------------------------------- parameters that cannot be met
def _manifest(utk: str) -> str:
    return ("name: x\nsource: {kind: stdlib_docs}\ntokenizer: {train: {vocab_size: 1000}}\n"
            f"stages:\n  - tokenize: {{}}\n  - utk: {utk}\nsink: {{kind: parquet}}\n")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("utk, field", [
    ("{seq_len: 64, chunks: [100]}", "chunks"),
    ("{seq_len: 4096, split: fixed, span: 4096}", "span"),
    ("{chunks: [2, 3], chunk_weights: [0, 0]}", "chunk_weights"),
    ("{chunks: [2, 3], chunk_weights: [1.0, -0.5]}", "chunk_weights"),
])
def test_impossible_parameters_are_refused_when_the_manifest_is_validated(utk, field):
    from curate.errors import ConfigError
    from curate.manifest import loads

    with pytest.raises(ConfigError, match=rf"stages\[1\] \(utk\).*{field}"):
        loads(_manifest(utk), "m.yaml")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("params, field", [
    ({"id_chars": 12, "id_max_tokens": 1}, "id_max_tokens"),  # used to redraw ids forever
    ({"seq_len": 64, "chunks": [30]}, "chunks"),  # 30 chunks, their knots and backtrace never fit 64 tokens
    ({"seq_len": 64, "chunks": [2], "id_max_tokens": 40}, "chunks"),  # two ids of up to 40 tokens, twice
    ({"seq_len": 64, "split": "fixed", "span": 60}, "span"),  # no window holds more than one span
])
def test_impossible_parameters_are_refused_at_setup_with_the_tokenizer(run_dir, params, field):
    from curate.errors import ConfigError

    docs = [list(range(1, 300))] * 3
    with pytest.raises(ConfigError, match=rf"utk\.{field}"):
        _run(run_dir, docs, 0, augment_fraction=1.0, **params)


# ---------------------------------------------------------------------- a real tokenizer whose BOS is <s>


def test_markers_never_take_a_real_tokenizers_special_ids_and_decode_back(tmp_path, llama_folder):
    """Llama/Mistral SentencePiece: BOS is ``<s>``, UtK's backtrace separator is named ``<s>`` too."""
    import sentencepiece
    from tokenizers import Tokenizer

    from curate.tokenizer import TokenizerSpec, prepare
    from tests.conftest import make_text

    cls = get_stage("utk")
    wanted = list(dict.fromkeys(cls(cls.Params(chunks=[2, 3])).special_tokens()
                                + cls(cls.Params(split="fixed", span=64)).special_tokens()))
    assert S_SEP == "<s>" and S_SEP in wanted
    meta = prepare(TokenizerSpec(path=str(llama_folder)), tmp_path / "tokenizer", wanted, lambda: iter([]))
    sp_model = sentencepiece.SentencePieceProcessor(model_file=str(llama_folder / "tokenizer.model"))
    roles = {i for i in (sp_model.bos_id(), sp_model.eos_id(), sp_model.unk_id(), sp_model.pad_id()) if i >= 0}
    assert roles == {0, 1, 2} and sp_model.id_to_piece(sp_model.bos_id()) == "<s>"
    marker_ids = set(meta["ids"].values())
    assert len(marker_ids) == len(wanted) and not marker_ids & roles
    assert meta["strings"][S_SEP] != "<s>" and meta["ids"][S_SEP] != sp_model.bos_id()

    rd = RunDir(tmp_path)
    rd.create()
    ctx = RunContext(0, Shard("00000", "k", "mem"), rd)
    docs = [d.tolist() for d in ctx.tokenizer.encode_arrays([make_text(i, 120) for i in range(8)])]
    for params in ({"chunks": [3]}, {"split": "fixed", "span": 64}):
        stage, rows = _run(rd, docs, 1, seq_len=2048, augment_fraction=1.0, **params)
        window = max(rows, key=lambda r: len(r["utk_chunks"]))["input_ids"]
        in_window = [t for t in window if t in marker_ids]
        assert in_window and not set(window) & roles
        # the run tokenizer shows every marker by its name, in order
        names = {i: n for n, i in meta["ids"].items()}
        shown = re.findall("|".join(re.escape(n) for n in sorted(meta["ids"], key=len, reverse=True)),
                           stage.tok.decode(window))
        assert shown == [names[t] for t in in_window]
        # the written tokenizer.json (what a trainer loads) decodes each marker to its own string, which
        # encodes back to the same single id
        raw = Tokenizer.from_file(str(tmp_path / "tokenizer" / "tokenizer.json"))
        again = raw.encode(raw.decode(window, skip_special_tokens=False), add_special_tokens=False).ids
        assert [t for t in again if t in marker_ids] == in_window
        for t in set(in_window):
            assert raw.encode(raw.id_to_token(t), add_special_tokens=False).ids == [t]

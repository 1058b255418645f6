"""curate's stages against independent re-implementations of the published methods' rules.

Each reference function below is written from the papers' and their authors' code's stated rules
(UtK, IN2, ProLong, Dataset Decomposition, ICLM, the long-dependency scores, MMNeedle, MMC4, DataComp,
CCNet), not from curate's code, and compared with the stage on small random inputs and boundary cases.
"""

from __future__ import annotations

import math
import string
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from curate.context import RunContext
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.schema import documents_batch, score_column, with_scores
from curate.stage import ShardPartial
from curate.stages.tokenize import id_lists

# ====== helpers


def _ctx(root, seed: int = 0) -> RunContext:
    rd = RunDir(root)
    if not (rd.root / "tokenizer").exists():
        rd.create()
    return RunContext(seed, Shard("00000", "k", "mem"), rd)


class _Stats:
    def __init__(self):
        self.counts = Counter()

    def count(self, name, n=1):
        self.counts[name] += n

    def drop(self, name, n=1):
        self.counts["drop:" + name] += n


# ====== 1. UtK

@pytest.fixture(scope="module")
def utk_dir(tmp_path_factory):
    from synthesizers.utk import D_CLOSE, D_OPEN, FIXED_KNOTS, S_CLOSE, S_OPEN, S_SEP, knot_pair
    from tests.helpers_tokenizer import prepare_tokenizer

    specials = [k for b in range(1, 6) for k in knot_pair(b)] + list(FIXED_KNOTS) + [D_OPEN, D_CLOSE, S_OPEN,
                                                                                      S_SEP, S_CLOSE]
    root = tmp_path_factory.mktemp("utk_audit")
    prepare_tokenizer(root, specials)
    rd = RunDir(root)
    rd.create()
    return rd


def _utk(rd, docs, seed=0, **params):
    cls = get_stage("utk")
    stage = cls(cls.Params(**params))
    ctx = RunContext(seed, Shard("00000", "k", "mem"), rd)
    stage.setup(ctx)
    batch = pa.RecordBatch.from_pydict({"id": [f"doc{i}" for i in range(len(docs))], "input_ids": id_lists(docs)})
    out = list(stage.run(iter([batch]), ctx))
    return stage, (pa.Table.from_batches(out).to_pylist() if out else [])


def _utk_reference_check(stage, row, docs):
    """Check one output window against the UtK rules written from the reference text.

    Returns the number of split documents seen (so a caller can assert augmentation happened).
    """
    p = stage.params
    sp = stage.sp
    specials = set(sp.values())
    tokens = row["input_ids"]
    lineage = row["lineage"]
    # reference knot list: chunk_tokens = [seg_1_1, seg_1_2, seg_2_1, seg_2_2, ...]; boundary b between
    # chunks b-1 and b is (tail = seg_b_1 at the end of chunk b-1, head = seg_b_2 at the start of chunk b)
    chunk_tokens = []
    if p.split != "fixed":
        for b in range(1, max(p.chunks)):
            chunk_tokens += [sp[f"<|knot_{b}_tail|>"], sp[f"<|knot_{b}_head|>"]]
        assert len(set(chunk_tokens)) == len(chunk_tokens) == 2 * (max(p.chunks) - 1)
    chunks = row["utk_chunks"]
    n_parts = Counter(c["doc"] for c in chunks)
    last_seen = {c["doc"]: k for k, c in enumerate(chunks)}
    bodies: dict[int, dict[int, list[int]]] = {}
    ids_of: dict[tuple[int, int], list[int]] = {}
    trailers = {}
    knot_pos, dspan_pos = set(), set()
    split_docs = 0
    for k, c in enumerate(chunks):
        d, j, a, b = c["doc"], c["part"], c["start"], c["end"]
        n = n_parts[d]
        seg = tokens[a:b]
        i = 0
        if n >= 2 and p.backtrace:  # every chunk of a split doc: <D> id </D>
            assert seg[0] == sp["<D>"], "a chunk of a split document must start with <D>"
            close = seg.index(sp["</D>"])
            ids_of[(d, j)] = seg[1:close]
            dspan_pos.update(range(a, a + close + 1))
            i = close + 1
        if n >= 2 and j > 0:  # head knot chunk_tokens[2j-1]
            if p.split == "fixed":
                assert seg[i] == sp["<|knot_head|>"]
                e = seg.index(sp["<|knot_head_end|>"], i)
                assert stage.tok.decode(seg[i + 1:e]) == str(j)
                knot_pos.update(range(a + i, a + e + 1))
                i = e + 1
            else:
                assert seg[i] == chunk_tokens[2 * j - 1]
                knot_pos.add(a + i)
                i += 1
        end = len(seg)
        if n >= 2 and p.backtrace and last_seen[d] == k:  # trailer after the last-appearing chunk
            s = seg.index(sp["<S>"], i)
            assert seg[-1] == sp["</S>"]
            trailers[d] = seg[s + 1:-1]
            end = s
        if n >= 2 and j < n - 1:  # tail knot chunk_tokens[2j]
            if p.split == "fixed":
                assert seg[end - 1] == sp["<|knot_tail_end|>"]
                s0 = max(x for x in range(i, end) if seg[x] == sp["<|knot_tail|>"])
                assert stage.tok.decode(seg[s0 + 1:end - 1]) == str(j)
                knot_pos.update(range(a + s0, a + end))
                end = s0
            else:
                assert seg[end - 1] == chunk_tokens[2 * j]
                knot_pos.add(a + end - 1)
                end -= 1
        body = seg[i:end]
        assert not (set(body) & specials), "no marker inside a chunk body"
        assert body, "no empty chunk"
        bodies.setdefault(d, {})[j] = body
    for d, parts in bodies.items():
        original = docs[int(lineage[d].removeprefix("doc"))]
        n = len(parts)
        assert sorted(parts) == list(range(n))
        assert [t for j in range(n) for t in parts[j]] == original, "chunks in original order give the document"
        if n >= 2:
            split_docs += 1
            assert n in p.chunks or p.split == "fixed"
            lengths = [len(parts[j]) for j in range(n)]
            if p.split == "equal":
                assert lengths[:-1] == [len(original) // n] * (n - 1)
            if p.split == "fixed":
                assert lengths[:-1] == [p.span] * (n - 1) and 1 <= lengths[-1] <= p.span
            if p.backtrace:
                # backtrace = ids of the chunks in ORIGINAL order, <s>-separated
                want = []
                for j in range(n):
                    want += ([sp["<s>"]] if j else []) + ids_of[(d, j)]
                assert trailers[d] == want
                for j in range(n):
                    text = stage.tok.decode(ids_of[(d, j)])
                    assert len(text) == 6 and set(text) <= set(string.ascii_letters + string.digits)
        elif p.split != "fixed" and len(row["doc_offsets"]) == 2 and len(n_parts) and max(n_parts.values()) > 1:
            # an augmented window: an unsplit document is one that is too short for its drawn n
            assert len(original) < max(p.chunks)
    augmented = any(v > 1 for v in n_parts.values()) or len(row["doc_offsets"]) == 2 and len(n_parts) > 1
    if augmented and len(chunks) > 1:
        last_doc = max(n_parts)  # the last document in stream order
        assert (chunks[-1]["doc"], chunks[-1]["part"]) == (last_doc, n_parts[last_doc] - 1), \
            "the last part of the last document stays at the end"
        if p.preserve_order:
            for d in n_parts:
                order = [c["part"] for c in chunks if c["doc"] == d]
                assert order == sorted(order)
    # loss mask: the reference masks (input t-1, label t) when label or input is a knot, input in <D>..</D>,
    # label == <D>, label == <S>, input == </S>
    ref_masked = {0}
    for t in range(1, len(tokens)):
        if t in knot_pos or (t - 1) in knot_pos or (t - 1) in dspan_pos:
            ref_masked.add(t)
        if p.backtrace and (tokens[t] in (sp["<D>"], sp["<S>"]) or tokens[t - 1] == sp["</S>"]):
            ref_masked.add(t)
    got_masked = {t for t, m in enumerate(row["loss_mask"]) if m == 0}
    assert ref_masked <= got_masked, "every position the reference masks is masked"
    starts = {c["start"] for c in chunks}
    assert got_masked - ref_masked <= starts, "extra masking only at chunk/document starts (documented)"
    return split_docs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("params", [
    {},  # defaults: chunks [2, 3], random split, preserve order, backtrace
    {"split": "equal", "chunks": [2, 3]},
    {"preserve_order": False, "chunks": [3]},
    {"backtrace": False, "chunks": [2, 3]},
    {"split": "fixed", "span": 7},
])
def test_utk_windows_follow_the_reference_rules(utk_dir, seed, params):
    rng = np.random.default_rng(seed)
    # lengths include the boundaries: 1, 2 (< n for n = 3), 3 (= n), and longer
    lengths = [1, 2, 3, 4] + rng.integers(1, 40, 30).tolist()
    docs = [rng.integers(20, 300, n).tolist() for n in lengths]
    params = {"seq_len": 256, "augment_fraction": 1.0, **params}
    stage, rows = _utk(utk_dir, docs, seed=seed, **params)
    assert not (set(stage.sp.values()) & set(range(20, 300)))
    split = sum(_utk_reference_check(stage, row, docs) for row in rows)
    assert split > 0
    # nothing truncated: every document is in exactly one window (its bodies were checked to equal it)
    assert sorted(x for row in rows for x in row["lineage"]) == sorted(f"doc{i}" for i in range(len(docs)))
    assert all(len(row["input_ids"]) <= params["seq_len"] for row in rows)


def test_utk_defaults_match_the_paper():
    p = get_stage("utk").Params()
    assert p.chunks == [2, 3]  # "2-3 chunks is optimal"
    assert p.augment_fraction == 0.8  # "80% is better"
    assert p.split == "random" and p.preserve_order and p.backtrace and p.id_chars == 6


def test_utk_unaugmented_windows_are_untouched(utk_dir):
    rng = np.random.default_rng(5)
    docs = [rng.integers(20, 300, int(n)).tolist() for n in rng.integers(1, 40, 20)]
    _, rows = _utk(utk_dir, docs, augment_fraction=0.0, seq_len=128)
    out = [t for row in rows for t in row["input_ids"]]
    assert out == [t for d in docs for t in d]
    for row in rows:
        offs = row["doc_offsets"]
        assert [m for m in row["loss_mask"]] == [0 if t in offs[:-1] else 1 for t in range(len(row["input_ids"]))]


# ====== 2. IN2


class _WordTokenizer:
    """Whitespace 'tokenizer': a paragraph's token count is its number of words."""

    def encode_arrays(self, texts):
        return [np.zeros(len(t.split()), np.int32) for t in texts]


def _in2_reference_segments(text: str, l: int) -> list[str]:
    """IN2 Algorithm 1: accumulate '\\n'-paragraphs until >= l tokens, join with '\\n'; leftovers join
    the previous segment (or are the only one)."""
    segs, cur, count = [], [], 0
    for para in text.split("\n"):
        cur.append(para)
        count += len(para.split())
        if count >= l:
            segs.append("\n".join(cur))
            cur, count = [], 0
    if cur:
        if segs:
            segs[-1] = segs[-1] + "\n" + "\n".join(cur)
        else:
            segs.append("\n".join(cur))
    return segs


@pytest.mark.parametrize("seed", range(6))
def test_in2_segmentation_matches_algorithm_1(seed):
    from synthesizers.teachers.segments import segment_documents

    rng = np.random.default_rng(seed)
    l = int(rng.integers(3, 12))
    texts = []
    for _ in range(20):
        n_par = int(rng.integers(1, 15))
        paras = [" ".join(f"w{int(x)}" for x in rng.integers(0, 99, int(rng.integers(1, 2 * l + 1))))
                 for _ in range(n_par)]  # no paragraph above 2l (curate cuts those: documented)
        texts.append("\n".join(paras))
    texts.append("just three words")  # shorter than l: one segment
    got = segment_documents(texts, _WordTokenizer(), l)
    for text, segs in zip(texts, got, strict=True):
        want = _in2_reference_segments(text, l)
        assert [s.text for s in segs] == want
        assert all(s.tokens >= l for s in segs) or len(segs) == 1


def test_in2_defaults_match_the_paper():
    p = get_stage("segment_qa").Params.model_fields
    assert p["segment_tokens"].default == 128
    assert (p["min_tokens"].default, p["max_tokens"].default) == (4096, 32768)
    # 1.1M type-1 vs 300K type-2: 300 / 1400 = 0.214
    assert abs(p["multi_hop_fraction"].default - 300 / 1400) < 0.02


# ====== 3. ProLong LDS


class _CopyLM:
    """A fake causal LM whose loss of a token drops when the token already appeared in its prefix."""

    def nll(self, seqs, batch_size=8, correct=False):
        from filters.causal_lm import TokenScores

        out = []
        for s in seqs:
            vals = [_copy_loss(s[:k + 1], s[k + 1]) for k in range(len(s) - 1)]
            out.append(TokenScores(np.array(vals, np.float64), None))
        return out


def _copy_loss(prefix, token):
    return 1.0 + (token % 7) / 3.0 - (0.9 if token in prefix else 0.0)


def _prolong_reference(ids, chunk, window_segments, threshold, alpha=1.0, beta=1.0):
    """ProLong (ProLong filter) with the same fake LM, every pair j < i."""
    segs = [ids[k:k + chunk] for k in range(0, len(ids), chunk)]
    if segs and len(segs[-1]) < chunk:
        segs = segs[:-1]
    n = len(segs)
    if n < 2:
        return 0.0
    # PPL(s_i): loss on every token after the first; PPL(s_i | s_j): loss on s_i with s_j before it,
    # ProLong's labels = [-100] * (len(s_j) + 1) + s_i[1:]
    single = [math.exp(np.mean([_copy_loss(s[:k], s[k]) for k in range(1, len(s))])) for s in segs]
    total = 0.0
    for i in range(n):
        deltas, pair = [], {}
        for j in range(i):
            joined = segs[j] + segs[i]
            losses = [_copy_loss(joined[:k], joined[k]) for k in range(len(segs[j]) + 1, len(joined))]
            pair[j] = math.exp(np.mean(losses))
            deltas.append(single[i] - pair[j])
        if not deltas:
            continue
        if len(deltas) == 1:
            dsp = 1.0
        else:
            x = np.array(deltas)
            pr = np.exp(x - x.max())
            pr = pr / pr.sum()
            if (pr == 0).any():
                pr = (pr + 1e-12) / (pr + 1e-12).sum()
            h = -(pr * np.log(pr)).sum()
            dsp = float(np.clip((math.log(len(x)) - h) / math.log(len(x)), 0, 1))
        for j in range(i):
            dst = (single[i] - pair[j]) / single[i]
            if dst > threshold:
                ddi = float(np.clip((i - j) / (window_segments - 1), 0, 1))
                total += (alpha * dst + beta * ddi) * dsp
    return 0.0 if not math.isfinite(total) else total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.1, -1.0])
def test_prolong_lds_matches_the_reference(seed, threshold):
    cls = get_stage("long_dependency")
    chunk, window = 6, 8
    stage = cls(cls.Params(model="unused", chunk_size=chunk, max_segments=window, sample_size=-1,
                           threshold=threshold))
    assert cls.Params(model="x").threshold == 0.1 and cls.Params(model="x").sample_size == 500
    assert cls.Params(model="x").chunk_size == 128 and cls.Params(model="x").max_segments == 32768 // 128
    stage.lm = _CopyLM()
    rng = np.random.default_rng(seed)
    for n_tokens in (0, chunk - 1, chunk, 2 * chunk, 2 * chunk + 3, int(rng.integers(3 * chunk, window * chunk))):
        ids = rng.integers(0, 12, n_tokens).tolist()  # a small vocabulary: segments repeat each other
        got, n_seg, n_pairs, _ = stage.document(ids, np.random.default_rng(0))
        assert n_seg == n_tokens // chunk and n_pairs == n_seg * (n_seg - 1) // 2
        assert got == pytest.approx(_prolong_reference(ids, chunk, window, threshold), rel=1e-9, abs=1e-12)


def test_prolong_pair_sampling_boundaries():
    from filters.long_dependency import sample_pairs

    g = np.random.default_rng(0)
    assert sample_pairs(32, 500, g) == []  # 496 pairs < 500: nothing computed, LDS 0
    pairs = sample_pairs(32, 496, g)  # exactly as many pairs as asked: all of them
    assert sorted(pairs) == sorted((i, j) for i in range(32) for j in range(i))
    pairs = sample_pairs(33, 500, g)
    assert len(pairs) == len(set(pairs)) == 500 and all(0 <= j < i < 33 for i, j in pairs)
    assert sorted(sample_pairs(5, -1, g)) == sorted((i, j) for i in range(5) for j in range(i))
    assert sample_pairs(1, -1, g) == [] and sample_pairs(0, 500, g) == []


# ====== 4. DD


def _dd_reference(seq, min_log2, max_log2):
    """get_binary with randomize=False."""
    out = []
    while len(seq) > 1:
        k = (len(seq) - 1).bit_length() - 1  # floor(log2(len - 1)), exact
        if k < min_log2:
            break
        k = min(k, max_log2)
        out.append((seq[:2 ** k + 1], k))
        seq = seq[2 ** k + 1:]
    return out


def _pack(tmp_path, docs, seed=0, **params):
    cls = get_stage("pack")
    stage = cls(cls.Params(**params))
    ctx = _ctx(tmp_path / "run", seed)
    batch = pa.RecordBatch.from_pydict({"id": [f"d{i}" for i in range(len(docs))], "input_ids": id_lists(docs)})
    out = list(stage.run(iter([batch]), ctx))
    return pa.Table.from_batches(out).to_pylist() if out else []


def test_dd_decomposition_matches_get_binary(tmp_path):
    lo, hi = 2, 4
    rng = np.random.default_rng(0)
    lengths = [0, 1, 2, 4, 5, 6, 9, 16, 17, 18, 33, 34, 35, 50, 100] + rng.integers(0, 120, 20).tolist()
    docs = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(lengths)]
    rows = _pack(tmp_path, docs, strategy="decompose", min_log2=lo, max_log2=hi, randomize=False, shuffle=False)
    got: dict[str, list] = {}
    for r in rows:
        got.setdefault(r["lineage"][0], []).append((r["input_ids"], r["bucket"]))
        assert r["doc_offsets"] == [0, len(r["input_ids"])]
    for i, d in enumerate(docs):
        assert got.get(f"d{i}", []) == _dd_reference(d, lo, hi)
    p = get_stage("pack").Params()
    assert (p.min_log2, p.max_log2, p.plus_one, p.randomize) == (8, 13, True, True)


def test_dd_randomized_bucket_odds_favour_short_buckets(tmp_path):
    lo, hi = 2, 4
    docs = [list(range(5000)) for _ in range(40)]
    rows = _pack(tmp_path, docs, strategy="decompose", min_log2=lo, max_log2=hi, randomize=True, shuffle=False)
    drawn = Counter()
    by_doc: dict[str, list] = {}
    for r in rows:
        by_doc.setdefault(r["lineage"][0], []).append(r)
    for pieces in by_doc.values():
        left = 5000
        for r in pieces:
            n = len(r["input_ids"])
            assert n == 2 ** r["bucket"] + 1 and lo <= r["bucket"] <= hi
            if (left - 1).bit_length() - 1 > hi:
                drawn[r["bucket"]] += 1  # a drawn k (the remainder exceeded the largest bucket)
            else:
                assert r["bucket"] == (left - 1).bit_length() - 1
            left -= n
        assert left < 2 ** lo + 1  # the dropped remainder is shorter than the smallest bucket
    total = sum(drawn.values())
    for k, p in ((4, 1 / 7), (3, 2 / 7), (2, 4 / 7)):
        assert abs(drawn[k] / total - p) < 0.03


# ====== 5. ICLM


def _iclm_reference(emb, k):
    n = len(emb)
    s = emb @ emb.T
    adj: list[dict] = [{} for _ in range(n)]
    for i in range(n):
        nbrs = sorted((j for j in range(n) if j != i), key=lambda j: (-s[i, j], j))[:k]
        for j in nbrs:
            adj[i][j] = s[i, j]
            adj[j][i] = s[i, j]
    deg = [len(a) for a in adj]
    visited, path = set(), []
    while len(path) < n:
        d = min((i for i in range(n) if i not in visited), key=lambda i: (deg[i], i))
        while d is not None:
            visited.add(d)
            path.append(d)
            cand = [j for j in adj[d] if j not in visited]
            d = max(cand, key=lambda j: (adj[d][j], -j)) if cand else None
    return path


@pytest.mark.parametrize("seed", range(5))
def test_iclm_path_matches_algorithm_1(seed):
    from synthesizers.related_docs import greedy_path, knn

    rng = np.random.default_rng(seed)
    for n, k in ((1, 3), (2, 3), (12, 3), (40, 4)):
        emb = rng.normal(size=(n, 8)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        nb, sims = knn(emb, min(k, n - 1))
        assert greedy_path(nb, sims) == _iclm_reference(emb.astype(np.float64), min(k, n - 1))


@pytest.mark.parametrize("seed", range(4))
def test_iclm_knn_ties_go_to_the_lowest_index(seed):
    """Exact ties (duplicate documents): the docstring promises 'ties by index'."""
    from synthesizers.related_docs import greedy_path, knn

    rng = np.random.default_rng(seed)
    protos = np.eye(4, dtype=np.float32)
    emb = protos[rng.integers(0, 4, 30)]  # dot products are exact 0/1: many exact ties
    nb, sims = knn(emb, 3)
    s = emb @ emb.T
    for i in range(len(emb)):
        want = sorted((j for j in range(len(emb)) if j != i), key=lambda j: (-s[i, j], j))[:3]
        assert nb[i].tolist() == want
    assert greedy_path(nb, sims) == _iclm_reference(emb.astype(np.float64), 3)


def test_iclm_near_duplicate_rule():
    from synthesizers.related_docs import jaccard3

    def ref(a, b):
        ga = {a[i:i + 3] for i in range(len(a) - 2)}
        gb = {b[i:i + 3] for i in range(len(b) - 2)}
        return len(ga & gb) / len(ga | gb) if ga | gb else None

    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abcd "), int(rng.integers(3, 40))))
        b = a[: int(rng.integers(0, len(a)))] + "".join(rng.choice(list("abcd "), int(rng.integers(3, 10))))
        assert jaccard3(a, b) == pytest.approx(ref(a, b))
    assert get_stage("related_docs").Params().dedup_jaccard == 0.85


# ====== 6. GATEAU HMG


def test_gateau_hmg_is_softmax_of_minmax_gap():
    cls = get_stage("homologous_gap")
    stage = cls(cls.Params(short_model="a", long_model="b"))
    rng = np.random.default_rng(0)
    a, b = rng.uniform(2, 50, 17), rng.uniform(2, 50, 17)
    parts = [pa.table({"id": [f"r{i}" for i in range(9)], "ppl_short": a[:9], "ppl_long": b[:9]}),
             pa.table({"id": [f"r{i}" for i in range(9, 17)], "ppl_short": a[9:], "ppl_long": b[9:]})]
    state = stage.combine(parts, 0)
    t = state["_tables"]["scores"]
    na, nb = (a - a.min()) / (a.max() - a.min()), (b - b.min()) / (b.max() - b.min())
    gap = na - nb
    want = np.exp(gap) / np.exp(gap).sum()
    order = [int(x[1:]) for x in t.column("id").to_pylist()]
    assert np.allclose(t.column("hmg").to_numpy(), want[order], rtol=1e-12)


# ====== 7. MMNeedle


def test_mmneedle_defaults():
    p = get_stage("mm_needle").Params()
    assert p.cell_size == 256 and p.negative_fraction == 0.5 and 1 in p.images_per_sample and 10 in p.images_per_sample
    assert p.answer_format.format(image=2, row=3, column=1) == "2, 3, 1"  # "index, row, column", 1-based


def test_mmneedle_negative_answer_is_minus_one():
    assert get_stage("mm_needle").Params().absent_answer == "-1"


# ====== 8a. MMC4


def _mmc4_reference(sims, floor, nearest):
    """Brute force: drop images with max sim < floor; assign each kept image to a distinct sentence
    maximizing the total; with more images than sentences the max-total matching leaves some out and
    (MMC4) those go to their argmax sentence."""
    import itertools

    n_s, n_i = sims.shape
    kept = [i for i in range(n_i) if sims[:, i].max() >= floor]
    best, best_total = {}, -np.inf
    m = min(n_s, len(kept))
    for imgs in itertools.combinations(kept, m):
        for sents in itertools.permutations(range(n_s), m):
            total = sum(sims[s, i] for s, i in zip(sents, imgs))
            if total > best_total + 1e-12:
                best_total, best = total, dict(zip(imgs, sents))
    if nearest:
        for i in kept:
            if i not in best:
                best[i] = int(np.argmax(sims[:, i]))
    return best, best_total


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("surplus", ["drop", "nearest"])
def test_mmc4_assignment_matches_linear_assignment(seed, surplus):
    from scipy.optimize import linear_sum_assignment

    cls = get_stage("interleave")
    stage = cls(cls.Params(surplus=surplus))
    assert cls.Params().min_similarity == 0.15
    rng = np.random.default_rng(seed)
    n_s, n_i = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    sims = rng.uniform(0.0, 0.4, (n_s, n_i))
    sims[rng.integers(0, n_s), rng.integers(0, n_i)] = 0.15  # exactly at the floor: kept (>= 0.15)
    image_emb = np.eye(n_i)  # text_emb @ image_emb.T == sims
    text_emb = sims.copy()
    st = _Stats()
    placed = stage._assign(0, ["s"] * n_s, [object()] * n_i, list(range(n_i)), np.ones(n_i, bool), image_emb,
                           list(range(n_s)), [(0, j) for j in range(n_s)], text_emb, linear_sum_assignment, st)
    got = {pos: s for pos, s, _ in placed}
    want, total = _mmc4_reference(sims, 0.15, surplus == "nearest")
    if surplus == "drop":
        assert len(set(got.values())) == len(got)  # each sentence at most one image
        assert sum(sims[s, i] for i, s in got.items()) == pytest.approx(total)
        assert set(got) <= set(want)
    else:
        assert set(got) == set(want)  # every kept image placed
        assert all(sims[:, i].max() >= 0.15 for i in got)
    for pos, s, sim in placed:
        assert sim == pytest.approx(sims[s, pos])


# ====== 10a. DataComp / select


def _select(tmp_path, values, **params):
    cls = get_stage("select")
    stage = cls(cls.Params(**params))
    ctx = _ctx(tmp_path / "run", 3)
    ids = [f"r{i}" for i in range(len(values))]
    half = len(values) // 2
    shards = []
    for part in (slice(0, half), slice(half, None)):
        b = documents_batch(ids[part], ["t"] * len(ids[part]))
        shards.append(with_scores(b, "m", {"v": pa.array(values[part], pa.float64())}))
    if stage.is_global:
        partials = []
        for b in shards:
            sp = ShardPartial()
            stage.observe(b, ctx, sp)
            partials.append(sp.table() or pa.table({"value": pa.array([], pa.float64())}))
        state = stage.combine(partials, ctx.seed)
        ctx.run_dir.write_json(ctx.run_dir.global_dir / stage.label / "state.json", state)
    return [v for b in stage.run(iter(shards), ctx) for v in score_column(b, "scores.m.v").to_pylist()]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 9, 10, 37])
def test_datacomp_top_30_percent(tmp_path, seed, n):
    vals = np.random.default_rng(seed).uniform(0, 0.5, n).round(3).tolist()
    kept = _select(tmp_path, vals, top={"column": "scores.m.v", "fraction": 0.3})
    k = math.floor(0.3 * n + 0.5)
    assert len(kept) == k
    if k:
        assert min(kept) >= sorted(vals, reverse=True)[k - 1] and sorted(kept) == sorted(vals, reverse=True)[:k][::-1]


def test_datacomp_threshold_is_inclusive(tmp_path):
    vals = [0.25, 0.2499, 0.3, 0.1, 0.28]
    kept = _select(tmp_path, vals, where=[{"column": "scores.m.v", "min": 0.25}])
    assert sorted(kept) == [0.25, 0.28, 0.3]
    cls = get_stage("clip_score")
    stage = cls(cls.Params(min_score=0.25))
    reasons = stage.decide(None, {"score": pa.array([0.25, 0.2499, None, 0.3], pa.float64())}, None).to_pylist()
    assert reasons == [None, "clip_score_below_min", "clip_score_below_min", None]


def test_fraction_one_keeps_everything(tmp_path):
    vals = [0.1, 0.2, 0.2, 0.3]
    assert sorted(_select(tmp_path, vals, top={"column": "scores.m.v", "fraction": 1.0})) == sorted(vals)


# ====== 10c. CCNet


from tests.test_perplexity import ARPA  # noqa: E402  (the hand-written bigram model, shared)


def _ccnet_pp(model, text, rounded=True):
    """CCNet DocLM: every '\\n' line (empty ones too) scored with <s> … </s>; length = words + 1;
    pp = 10^(-Σ log10 / Σ length), rounded to 0.1."""
    score, length = 0.0, 0
    for line in text.split("\n"):
        score += model.score(line)
        length += len(line.split()) + 1
    pp = 10.0 ** (-score / length)
    return round(pp, 1) if rounded else pp


def _ccnet_stage(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    path = tmp_path / "tiny.arpa"
    path.write_text(ARPA)
    cls = get_stage("perplexity")
    stage = cls(cls.Params(model=str(path)))
    stage.setup(_ctx(tmp_path / "run"))
    return stage, kenlm.Model(str(path))


TEXTS = ["the cat", "cat the\nthe cat", "the dog the cat", "the the the cat"]  # lower case, no punctuation


def test_ccnet_perplexity_formula(tmp_path):
    stage, model = _ccnet_stage(tmp_path)
    got = stage.score(documents_batch([f"d{i}" for i in range(len(TEXTS))], TEXTS), None)["perplexity"].to_pylist()
    for g, t in zip(got, TEXTS, strict=True):
        assert g == _ccnet_pp(model, t)


def test_ccnet_perplexity_is_rounded_to_a_tenth(tmp_path):
    stage, model = _ccnet_stage(tmp_path)
    got = stage.score(documents_batch([f"d{i}" for i in range(len(TEXTS))], TEXTS), None)["perplexity"].to_pylist()
    assert got == [_ccnet_pp(model, t) for t in TEXTS]


def test_ccnet_counts_empty_lines(tmp_path):
    stage, model = _ccnet_stage(tmp_path)
    text = "the cat\n\nthe cat"
    got = stage.score(documents_batch(["d"], [text]), None)
    assert got["n_scored"][0].as_py() == 7  # (2 + 1) + (0 + 1) + (2 + 1)
    assert got["perplexity"][0].as_py() == _ccnet_pp(model, text)
    nll = got["mean_nll"][0].as_py()  # the unrounded quantity, in nats
    assert nll == pytest.approx(np.log(_ccnet_pp(model, text, rounded=False)), rel=1e-6)


def test_ccnet_bucket_cutoffs_documented():
    from filters import perplexity

    assert "head < 340 ≤ middle < 520 ≤ tail" in perplexity.__doc__


# ====== 3b. ProLong packing


def test_prolong_concat_chunk_tail_starts_next_chunk(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(range(1000 * i, 1000 * i + int(n))) for i, n in enumerate(rng.integers(1, 50, 30))]
    rows = _pack(tmp_path, docs, strategy="concat_chunk", seq_len=64)
    flat = [t for r in rows for t in r["input_ids"]]
    assert flat == [t for d in docs for t in d]
    assert all(len(r["input_ids"]) == 64 for r in rows[:-1]) and 0 < len(rows[-1]["input_ids"]) <= 64
    for r in rows:  # document boundaries inside each row, for document masking
        ids = r["input_ids"]
        starts = {o for o in r["doc_offsets"][1:-1]}
        assert starts == {t for t in range(1, len(ids)) if ids[t] // 1000 != ids[t - 1] // 1000}


def test_prolong_first_token_of_each_document_has_no_loss(tmp_path):
    rng = np.random.default_rng(1)
    docs = [list(range(1000 * i, 1000 * i + int(n))) for i, n in enumerate(rng.integers(1, 30, 20))]
    for strategy in ("best_fit", "concat_chunk"):
        rows = _pack(tmp_path, docs, strategy=strategy, seq_len=64)
        assert any(len(r["doc_offsets"]) > 2 for r in rows)
        for r in rows:
            for o in r["doc_offsets"][1:-1]:
                assert r["loss_mask"][o] == 0


# ====== ProLong mix


def test_prolong_mix_rates_give_the_target_shares():
    cls = get_stage("mix")
    weights = {"code": 0.30, "books": 0.30, "textbooks": 0.03, "web": 0.37}
    stage = cls(cls.Params(weights=weights))
    have = {"code": 5_000, "books": 20_000, "textbooks": 900, "web": 100_000, "other": 7}
    parts = [pa.table({"domain": list(have), "tokens": list(have.values())})]
    state = stage.combine(parts, 0)
    total = state["total_tokens"]
    for d, w in weights.items():
        assert state["rates"][d] * have[d] == pytest.approx(w * total, rel=1e-4)  # total_tokens is int()
    assert max(state["rates"].values()) == pytest.approx(1.0)  # the default: the most without repeats
    assert "other" not in state["rates"]


# ====== 8a. MMC4 image filters


def test_mmc4_image_size_and_aspect_bounds(tmp_path):
    """MMC4: drop width or height < 150; drop aspect ratio > 2 or < 0.5 (the bounds themselves kept)."""
    from curate.schema import INTERLEAVED

    sizes = [(150, 150), (149, 300), (300, 149), (300, 150), (301, 150), (150, 300), (150, 301), (1000, 600)]

    def ref_keep(w, h):
        return w >= 150 and h >= 150 and 0.5 <= w / h <= 2

    img = [{"bytes": b"x", "mime": "image/png", "sha256": None, "width": w, "height": h} for w, h in sizes]
    batch = pa.RecordBatch.from_pydict({
        "id": ["r"], "texts": [[None] * len(img) + ["caption"]], "images": [img + [None]],
        "source": [None], "meta": [None]}, schema=INTERLEAVED)
    cls = get_stage("image_size")
    stage = cls(cls.Params())
    ctx = _ctx(tmp_path / "run")
    stage.setup(ctx)
    out = pa.Table.from_batches(list(stage.run(iter([batch]), ctx))).to_pylist()
    kept = [(i["width"], i["height"]) for i in out[0]["images"] if i is not None]
    assert kept == [s for s in sizes if ref_keep(*s)]

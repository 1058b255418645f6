"""exact_dedup and minhash_dedup: planted duplicates go, distinct documents stay, the kept copy is stable."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest

from curate.testing import _paragraphs
from tests.conftest import cli, write_jsonl, write_manifest

pytest.importorskip("datatrove", reason="the `quality` extra is not installed")
pytest.importorskip("spacy", reason="the `quality` extra is not installed")


def _shingles(text: str, n: int = 5) -> set:
    from datatrove.utils.text import simplify_text

    words = simplify_text(text).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _edit(text: str, share: float, rng: random.Random) -> str:
    """Replace about `share` of the words with a marker word: a near-duplicate."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(share * len(words)))):
        words[i] = "edited"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted():
    """120 distinct real documents; 10 near-copies (Jaccard ≥ 0.8), 5 exact copies with other spacing."""
    paras = _paragraphs()
    docs = ["\n\n".join(paras[i:i + 6]) for i in range(0, 720, 6)]
    rng = random.Random(3)
    rows = [{"id": f"orig-{i}", "text": t} for i, t in enumerate(docs)]
    near = []
    for i in range(10):
        src = docs[i * 7]
        copy = _edit(src, 0.015, rng)
        assert jaccard(src, copy) >= 0.8
        near.append({"id": f"near-{i}", "text": copy, "of": f"orig-{i * 7}"})
    exact = [{"id": f"exact-{i}", "text": "  " + docs[i * 11 + 1].upper().replace(" ", "   "), "of": f"orig-{i * 11 + 1}"}
             for i in range(5)]
    distinct = max(jaccard(docs[i], docs[j]) for i in range(0, 120, 9) for j in range(i + 1, 120, 13))
    assert distinct < 0.5
    return rows, near, exact


def _run(tmp_path, name, rows, stages, workers=2, files=4, extra=""):
    folder = tmp_path / f"in-{name}"
    per = -(-len(rows) // files)
    for f in range(files):  # contiguous parts: file order is input order
        write_jsonl(folder / f"part-{f}.jsonl", [{"id": r["id"], "text": r["text"]} for r in rows[f * per:(f + 1) * per]])
    m = write_manifest(tmp_path / f"{name}.yaml", f"""
        name: {name}
        seed: 11
        source: {{kind: jsonl, paths: ["{folder}/*.jsonl"], id_field: id}}
        stages: {stages}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: {workers}}}
        {extra}
        """)
    run = tmp_path / f"run-{name}"
    cli("run", str(m), "-o", str(run), "--no-progress")
    import pyarrow as pa

    table = pa.concat_tables(pq.read_table(f) for f in sorted((run / "parquet").glob("*.parquet")))
    return table, json.loads((run / "stats.json").read_text()), run


def test_exact_dedup_keeps_the_first_copy(tmp_path, planted):
    rows, _, exact = planted
    table, stats, run = _run(tmp_path, "exact", rows + exact, "[exact_dedup]")
    kept = set(table.column("id").to_pylist())
    assert kept == {r["id"] for r in rows}
    assert stats["stages"]["exact_dedup"]["drops"] == {"duplicate": 5}
    report = stats["global"]["exact_dedup"]
    assert report["clusters"] == 5 and report["duplicates"] == 5 and report["size_histogram"] == {"2": 5}
    sizes = dict(zip(table.column("id").to_pylist(), table.column("scores").combine_chunks().field("exact_dedup").field("cluster_size").to_pylist()))
    assert all(sizes[e["of"]] == 2 for e in exact) and sizes["orig-0"] == 1


def test_exact_dedup_raw_text_keeps_respaced_copies(tmp_path, planted):
    rows, _, exact = planted
    table, stats, _ = _run(tmp_path, "raw", rows + exact, "[{exact_dedup: {normalize: false}}]")
    assert table.num_rows == len(rows) + len(exact)


@pytest.mark.parametrize("shingles", ["datatrove", "fast"])
def test_minhash_removes_planted_near_duplicates_only(tmp_path, planted, shingles):
    rows, near, exact = planted
    table, stats, run = _run(tmp_path, "minhash", rows + near + exact, f"[{{minhash_dedup: {{shingles: {shingles}}}}}]")
    kept = set(table.column("id").to_pylist())
    assert kept == {r["id"] for r in rows}, "every original stays, every planted copy goes"
    report = stats["global"]["minhash_dedup"]
    assert report["duplicates"] == 15 and stats["stages"]["minhash_dedup"]["drops"] == {"duplicate": 15}
    import pyarrow as pa

    with pa.memory_map(str(run / "global" / "minhash_dedup" / "members.arrow")) as src:
        members = pa.ipc.open_file(src).read_all().to_pylist()
    by_cluster = {}
    for m in members:
        by_cluster.setdefault(m["cluster"], []).append(m)
    for copy in near + exact:
        mine = next(c for c in by_cluster.values() if any(m["id"] == copy["id"] for m in c))
        assert {m["id"] for m in mine if m["kept"]} == {copy["of"]}


def test_kept_copy_does_not_depend_on_workers_or_files(tmp_path, planted):
    rows, near, _ = planted
    rng = random.Random(5)
    shuffled = rows + near
    rng.shuffle(shuffled)  # copies may now come before their original
    a, _, _ = _run(tmp_path, "w1", shuffled, "[minhash_dedup]", workers=1, files=3)
    b, _, _ = _run(tmp_path, "w2", shuffled, "[minhash_dedup]", workers=2, files=3)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert len(a) == len(rows)
    longest, _, _ = _run(tmp_path, "long", shuffled, "[{minhash_dedup: {keep: longest}}]", workers=2, files=3)
    kept = set(longest.column("id").to_pylist())
    for copy in near:  # "edited" replaces words: the copy is longer exactly when the original had short words
        orig = next(r for r in rows if r["id"] == copy["of"])
        if len(copy["text"]) != len(orig["text"]):  # equal lengths: the first in input order
            winner = copy["id"] if len(copy["text"]) > len(orig["text"]) else orig["id"]
            assert winner in kept
        assert (copy["id"] in kept) != (orig["id"] in kept)


def test_score_only_and_threshold(tmp_path, planted):
    rows, near, _ = planted
    table, stats, _ = _run(tmp_path, "scored", rows + near, "[{minhash_dedup: {drop: false, threshold: 0.7}}]")
    assert table.num_rows == len(rows) + len(near)
    scores = table.column("scores").combine_chunks().field("minhash_dedup")
    sizes = dict(zip(table.column("id").to_pylist(), scores.field("cluster_size").to_pylist()))
    assert all(sizes[n["id"]] == 2 and sizes[n["of"]] == 2 for n in near)
    assert sum(1 for s in sizes.values() if s == 1) == len(rows) - len(near)
    strict, _, _ = _run(tmp_path, "strict", rows + near, "[{minhash_dedup: {threshold: 0.999}}]")
    kept = set(strict.column("id").to_pylist())
    assert {r["id"] for r in rows} <= kept
    originals = {r["id"]: r["text"] for r in rows}
    loose = [n["id"] for n in near if jaccard(n["text"], originals[n["of"]]) < 0.9]
    assert loose and set(loose) <= kept, "all 112 min-hashes agree with chance < 0.9**112 below Jaccard 0.9"


def test_texts_shorter_than_a_shingle_never_collide(tmp_path):
    from tests.conftest import make_stage

    stage, _ = make_stage("minhash_dedup")
    a = stage.keys(["Yes.", "No way."], ["f1:1", "f1:2"])["bands"].to_pylist()
    b = stage.keys(["Yes.", "No way."], ["f2:1", "f2:2"])["bands"].to_pylist()  # same texts, other rows
    values = [v for row in a + b for v in row]
    assert len(set(values)) == len(values)
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(["Yes.", "Fine.", "Yes.", "No."])]
    table, stats, _ = _run(tmp_path, "short", rows, "[minhash_dedup]", files=2)
    assert table.num_rows == 4 and stats["global"]["minhash_dedup"]["clusters"] == 0


def test_fast_shingles_are_the_word_ngrams_of_the_normalized_text():
    from datatrove.utils.text import simplify_text

    from filters.minhash_dedup import FastShingles

    text = "The quick brown fox, the QUICK brown fox; jumps over 12 lazy dogs!"
    words = simplify_text(text).split()
    fast = FastShingles(3)
    shingles = fast(text)[:, 0]
    assert len(shingles) == len(words) - 2
    grams = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    for i in range(len(grams)):  # equal n-grams hash equal, different ones differently
        for j in range(len(grams)):
            assert (shingles[i] == shingles[j]) == (grams[i] == grams[j])
    assert fast("two words").shape == (0, 1)


def test_each_shard_reads_only_its_own_members(tmp_path, planted):
    """The members table lists rows in input order; a worker reads its shard's slice, and scores its
    rows as it would with the whole table (a run combined by an older version has no index)."""
    import pyarrow as pa

    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.rundir import RunDir
    from tests.conftest import make_stage

    rows, near, exact = planted
    everything = rows + near + exact
    random.Random(8).shuffle(everything)
    out, stats, run = _run(tmp_path, "slices", everything, "[minhash_dedup]", workers=2, files=4)
    assert len(out) == len(rows)
    state = json.loads((run / "global" / "minhash_dedup" / "state.json").read_text())
    assert not {"_partials", "_members_at"} & set(stats["global"]["minhash_dedup"])  # bookkeeping stays out of stats.json
    names, at = state["_partials"], state["_members_at"]
    assert len(names) == 4 and len(at) == 5 and at[-1] == state["clusters"] + state["duplicates"]
    assert 0 < at[1] < at[-1]  # members in more than one shard
    stage, _ = make_stage("minhash_dedup", run)
    inputs = sorted((tmp_path / "in-slices").glob("*.jsonl"))
    for name, path in zip(names, inputs, strict=True):
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        batch = pa.record_batch({"id": pa.array(ids)})
        ctx = RunContext(11, Shard(name, "k", str(path)), RunDir(run), phase=1)
        mine = stage._members(ctx)
        assert mine is None or set(mine["id"].to_pylist()) <= set(ids)
        sliced = stage.score(batch, ctx) if mine is not None else None
        ctx._global["minhash_dedup"] = {k: v for k, v in state.items() if k not in ("_partials", "_members_at")}
        whole = stage.score(batch, ctx)
        if sliced is None:
            assert whole["cluster_size"].to_pylist() == [1] * len(ids)
        else:
            assert {k: v.to_pylist() for k, v in sliced.items()} == {k: v.to_pylist() for k, v in whole.items()}

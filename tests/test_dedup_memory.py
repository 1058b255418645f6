"""The dedup driver on disk (filters.band_groups): the in-memory algorithm's exact result, memory that does
not grow with the rows, and minhash shingles identical to datatrove's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from filters.band_groups import Clustering, Rows, cluster_rows

# ----------------------------------------------------------------------------- the in-memory reference


def reference(table: pa.Table, bands: int, keep: str, threshold: float | None = None) -> dict:
    """The algorithm before band_groups: per-band np.unique, union-find in Python, members in memory."""
    n = table.num_rows
    keys = table.column("bands").combine_chunks().flatten().to_numpy().reshape(n, bands)
    sigs = None
    if threshold is not None:
        width = table.schema.field("signature").type.list_size
        sigs = table.column("signature").combine_chunks().flatten().to_numpy().reshape(n, width)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse] > 1)
        order = shared[np.argsort(inverse[shared], kind="stable")]
        for group in np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1) if len(order) else []:
            head = int(group[0])
            for other in map(int, group[1:]):
                if sigs is not None and np.mean(sigs[head] == sigs[other]) < threshold:
                    continue
                a, c = find(head), find(other)
                if a != c:
                    parent[max(a, c)] = min(a, c)
    labels = np.array([find(x) for x in range(n)])
    uniq, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    size = sizes[inverse]
    multi = np.flatnonzero(size > 1)
    order = np.arange(n)
    rank = np.lexsort((order, -table.column("n_chars").to_numpy())) if keep == "longest" else order
    position = np.empty(n, np.int64)
    position[rank] = np.arange(n)
    first = np.full(len(uniq), n, np.int64)
    np.minimum.at(first, inverse, position)
    kept = position == first[inverse]
    cluster_no = rank[first][inverse]
    ids = table.column("id")
    members = pa.table({"id": pc.take(ids, pa.array(multi, pa.int64())), "cluster": pa.array(cluster_no[multi], pa.int64()),
                        "cluster_size": pa.array(size[multi], pa.int32()), "kept": pa.array(kept[multi], pa.bool_())})
    hist = Counter(int(s) for s in sizes if s > 1)
    big = np.argsort(-sizes, kind="stable")[:10]
    largest = [{"kept_id": ids[int(rank[first[c]])].as_py(), "size": int(sizes[c])} for c in big if sizes[c] > 1]
    return {"rows": n, "clusters": int((sizes > 1).sum()), "duplicates": int(len(multi) - (sizes > 1).sum()),
            "size_histogram": {str(k): hist[k] for k in sorted(hist)}, "largest": largest, "members": members}


# ----------------------------------------------------------------------------- synthetic partials


def synthetic(n: int, bands: int = 6, seed: int = 0, width: int = 0, hot: int = 0) -> np.ndarray:
    """Random band keys with planted near-copies (a random subset of an earlier row's bands: chains
    appear when the earlier row is itself a copy), exact copies, and ``hot`` rows sharing one band key."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64 - 1, (n, bands), dtype=np.uint64, endpoint=True)
    copies = rng.choice(np.arange(1, n), size=n // 5, replace=False)
    for row in np.sort(copies):
        src = int(rng.integers(0, row))
        take = rng.random(bands) < (1.0 if rng.random() < 0.2 else 0.3)
        take[rng.integers(0, bands)] = True
        keys[row, take] = keys[src, take]
    if hot:
        keys[rng.choice(n, hot, replace=False), 1] = 12345
    return keys


def as_partials(tmp_path, keys: np.ndarray, seed: int = 0, sigs: np.ndarray | None = None,
                id_type=None) -> list[pa.Table]:
    """Shards of uneven sizes, each of several batches, written and memory-mapped as the driver does."""
    id_type = id_type or pa.string()
    rng = np.random.default_rng(seed + 1)
    n, b = keys.shape
    chars = rng.integers(10, 14, n)  # few lengths: ties for keep: longest
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(6, n - 1), replace=False))
    out = []
    for k, (lo, hi) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, n], strict=True)):
        cols = {"id": pa.array([f"row-{i}" for i in range(lo, hi)], id_type), "n_chars": pa.array(chars[lo:hi]),
                "bands": pa.FixedSizeListArray.from_arrays(pa.array(keys[lo:hi].reshape(-1)), b)}
        if sigs is not None:
            cols["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sigs[lo:hi].reshape(-1)), sigs.shape[1])
        table = pa.table(cols)
        path = tmp_path / f"p-{k}.arrow"
        with pa.ipc.new_file(str(path), table.schema) as w:
            for start in range(0, table.num_rows, 37):  # many batches per shard
                w.write_table(table.slice(start, 37))
        with pa.memory_map(str(path)) as src:
            out.append(pa.ipc.open_file(src).read_all())
    return out


def on_disk(tmp_path, partials, bands, keep="first", check=None, **sizes) -> dict:
    folder = tmp_path / "spill"
    folder.mkdir(exist_ok=True)
    rows = Rows(partials)
    how = Clustering(keys=lambda t: t.column("bands").combine_chunks().flatten().to_numpy().reshape(-1, bands),
                     bands=bands, keep=keep, check=check(rows) if check else None, **sizes)
    state = cluster_rows(rows, how, folder)
    members = state["members"] = state.pop("_tables")["members"]
    # each partial's members are one slice of the table, in order (what a worker reads of it)
    at = np.cumsum([0, *state.pop("_members_per_partial")])
    assert at[-1] == members.num_rows
    for table, a, b in zip(rows.tables, at[:-1], at[1:], strict=True):
        assert set(members.slice(a, b - a).column("id").to_pylist()) <= set(table.column("id").to_pylist())
    return state


def assert_same(got: dict, want: dict) -> None:
    gm, wm = got.pop("members"), want.pop("members")
    assert got == want
    assert gm.schema == wm.schema and gm.num_rows == wm.num_rows
    assert gm.combine_chunks().equals(wm.combine_chunks())


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("keep", ["first", "longest"])
@pytest.mark.parametrize("sizes", [{}, {"target_entries": 300, "chunk_rows": 250}, {"target_entries": 40, "chunk_rows": 64}])
def test_clusters_equal_the_in_memory_algorithm(tmp_path, keep, sizes):
    """Same clusters, kept members, members table and report — with partitions split once, several
    times, and one key (the hot band value) too common to group in memory, so it is streamed."""
    keys = synthetic(3000, seed=len(sizes) + len(keep), hot=120)
    partials = as_partials(tmp_path, keys)
    want = reference(pa.concat_tables(partials).combine_chunks(), 6, keep)
    assert want["clusters"] > 100 and max(int(k) for k in want["size_histogram"]) >= 120
    assert_same(on_disk(tmp_path, partials, 6, keep, **sizes), want)


def test_a_pair_check_gives_the_same_clusters(tmp_path):
    """``threshold``: candidates are compared with their group's first row on whole signatures."""
    rng = np.random.default_rng(7)
    keys = synthetic(1500, seed=7)
    sigs = rng.integers(0, 5, (1500, 16), dtype=np.uint64)  # similarity between two rows: ~0.2 ± noise
    partials = as_partials(tmp_path, keys, sigs=sigs)
    want = reference(pa.concat_tables(partials).combine_chunks(), 6, "first", threshold=0.25)

    def check(rows):
        return lambda a, b: (rows.matrix("signature", a) == rows.matrix("signature", b)).mean(axis=1) >= 0.25

    got = on_disk(tmp_path, partials, 6, check=check, target_entries=200, chunk_rows=100)
    no_check = reference(pa.concat_tables(partials).combine_chunks(), 6, "first")
    assert 0 < want["duplicates"] < no_check["duplicates"]  # the check really removes some pairs
    assert_same(got, want)


def test_no_duplicates_and_large_string_ids(tmp_path):
    keys = np.random.default_rng(3).integers(0, 2**63, (500, 3), dtype=np.uint64)
    partials = as_partials(tmp_path, keys, id_type=pa.large_string())
    got = on_disk(tmp_path, partials, 3, target_entries=100)
    assert got["members"].num_rows == 0 and got["members"].schema.field("id").type == pa.large_string()
    assert_same(got, reference(pa.concat_tables(partials).combine_chunks(), 3, "first"))


@pytest.mark.parametrize("target", [10_000, 30])
def test_repeated_ids_are_an_error_naming_the_first_three(tmp_path, target):
    from curate.errors import BadRecord

    keys = synthetic(400, bands=2, seed=2)
    partials = as_partials(tmp_path, keys)
    ids = [f"row-{i}" for i in range(400)]
    for a, b in ((5, 300), (9, 20), (9, 399), (2, 100), (250, 260)):  # ids 2, 5, 9, 250 repeat
        ids[b] = ids[a]
    table = pa.concat_tables(partials).combine_chunks().set_column(0, "id", pa.array(ids))
    with pytest.raises(BadRecord, match=r"row ids repeat across the input \('row-2', 'row-5', 'row-9'\)"):
        on_disk(tmp_path, [table.slice(0, 150), table.slice(150)], 2, target_entries=target)


def test_the_stage_combines_as_before(tmp_path):
    """minhash_dedup and exact_dedup through their own combine (the driver's entry point)."""
    from tests.conftest import make_stage

    keys = synthetic(800, bands=14, seed=4)
    partials = as_partials(tmp_path, keys)
    partials.insert(2, partials[0].slice(0, 0))  # a shard with no rows
    stage, _ = make_stage("minhash_dedup", tmp_path, keep="longest")
    got = stage.combine(partials, 0)
    members = got["members"] = got.pop("_tables")["members"]
    at = got.pop("_members_at")  # each partial's slice of the members table, empty ones included
    assert len(at) == len(partials) + 1 and at[0] == 0 and at[-1] == members.num_rows and at[2] == at[3]
    for table, a, b in zip(partials, at[:-1], at[1:], strict=True):
        assert set(members.slice(a, b - a).column("id").to_pylist()) <= set(table.column("id").to_pylist())
    assert_same(got, reference(pa.concat_tables(partials).combine_chunks(), 14, "longest"))
    hashes = [pa.table({"id": t["id"], "n_chars": t["n_chars"], "hash": pc.list_element(t["bands"], 0)})
              for t in partials]
    exact, _ = make_stage("exact_dedup", tmp_path)
    got = exact.combine(hashes, 0)
    got["members"] = got.pop("_tables")["members"]
    assert got.pop("_members_at")[-1] == got["members"].num_rows
    whole = pa.concat_tables(hashes).combine_chunks()
    one_band = whole.set_column(2, "bands", pa.FixedSizeListArray.from_arrays(whole["hash"].chunk(0), 1))
    assert_same(got, reference(one_band, 1, "first"))
    assert exact.combine([], 0)["rows"] == 0


# ----------------------------------------------------------------------------- memory

MEASURE = textwrap.dedent("""
    import json, sys, threading, time, tempfile, pathlib
    import numpy as np, pyarrow as pa
    sys.path.insert(0, sys.argv[4])
    from tests.test_dedup_memory import synthetic, as_partials, on_disk, reference
    n, how, folder = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    partials = as_partials(folder, synthetic(n, bands=14, seed=1))
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    base, peak, done = anon(), [0], []
    def sample():
        while not done:
            peak[0] = max(peak[0], anon()); time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    if how == "disk":
        on_disk(folder, partials, 14, target_entries=1 << 16, chunk_rows=1 << 14)
    else:
        reference(pa.concat_tables(partials).combine_chunks(), 14, "first")
    done.append(1); t.join()
    print(json.dumps({"growth": peak[0] - base}))
""")


def _growth(tmp_path, n: int, how: str) -> int:
    import pathlib

    folder = tmp_path / f"{how}-{n}"
    folder.mkdir()
    root = str(pathlib.Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", MEASURE, str(n), how, str(folder), root], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.splitlines()[-1])["growth"]


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_rows(tmp_path):
    """8× the rows: the on-disk driver's anonymous memory stays flat; the in-memory one's grows with them
    (its key matrix alone is 112 bytes per row), so the measure can tell them apart. (The on-disk driver's
    fixed part — polars for the id hashes, one chunk of entries — is the same at both sizes.)"""
    small, large = 20_000, 160_000
    disk = _growth(tmp_path, small, "disk"), _growth(tmp_path, large, "disk")
    memory = _growth(tmp_path, small, "memory"), _growth(tmp_path, large, "memory")
    assert memory[1] - memory[0] > 112 * (large - small), memory
    assert disk[1] - disk[0] < 8 * 2**20, disk  # flat within 8 MiB while the rows grow by 140 K


# ----------------------------------------------------------------------------- datatrove-identical shingles

ODD_TEXTS = [
    "I'd say we can't, won't and shouldn't: it's John's dog's bone. Y'all'd've known!",
    "Monday 12 March 2024, 3.14159 km/h at 10:45pm — über café naïve résumé façade",
    "tabs\tand\u00a0non-breaking\u2028line\u2029separators\x1cand\x1f more words here ok",
    "URLs http://example.com/a_b?c=d&e=f and emails someone@example.org; C++ and C# and .NET",
    "emoji 😀👍🏽 and CJK 中文字符 mixed with ελληνικά and русский текст плюс العربية",
    "hyphen-ated words, U.S.A. vs u.s.a, e.g. i.e. etc. Mr. Dr. St. vs. and IS_ALPHA oddities",
    "combining e\u0301 marks, zero\u200bwidth, soft\u00adhyphen, ﬁ ligature ½ ² ⅷ",
    "short",
    "",
]


def test_datatrove_shingles_equal_datatrove_s_on_real_and_odd_text():
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    from curate.testing import _paragraphs
    from filters.minhash_dedup import DatatroveShingles, band_hashes
    from tests.conftest import make_stage

    paras = _paragraphs()
    texts = ["\n\n".join(paras[i:i + 4]) for i in range(0, 800, 4)] + ODD_TEXTS + paras[:100]
    sig = MinhashDedupSignature(output_folder="memory://unused", config=MinhashConfig(seed=11))
    ref = [sig.get_shingles(t) for t in texts]
    ours = DatatroveShingles(sig)
    assert ours.tokenize is not None  # English: the per-word path, not the fallback
    for text, want in zip(texts + texts, ref + ref, strict=True):  # the second pass runs from the word cache
        assert np.array_equal(ours(text), want), text[:80]
    stage, _ = make_stage("minhash_dedup")
    stage._a, stage._b = sig.parameters
    bands = stage.keys(texts, [f"t{i}" for i in range(len(texts))])["bands"].flatten().to_numpy()
    want = [np.array(np.concatenate(sig.get_signature(r)), np.uint64) for r in ref if len(r)]
    got = bands.reshape(len(texts), 14)[[len(r) > 0 for r in ref]]
    assert np.array_equal(got, band_hashes(np.stack(want), 14, 8))

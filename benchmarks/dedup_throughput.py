"""minhash_dedup vs datatrove's own four-step MinHash pipeline: same corpus, same parameters, one run.

The corpus: ``--mb`` of JSONL documents of real paragraphs (the machine's standard-library docstrings),
plus near-copies of ``--dup-share`` of them (3% of words replaced: Jaccard ≈ 0.8–0.9) appended at the
end. Both sides use 5-gram shingles, 14 bands × 8 hashes, 64-bit xxhash, and ``--workers`` processes:

* **curate**: ``curate run`` with ``minhash_dedup`` (signatures while the first phase writes its
  intermediate file, clustering once in the driver, filtering in the second phase) → Parquet;
* **curate, fast shingles**: the same with ``shingles: fast`` (whitespace words, n-grams hashed in numpy);
* both with seed 1 (the manifest's ``seed`` is minhash_dedup's), so the datatrove-identical signatures
  are datatrove's and the removals must agree;
* **datatrove**: ``LocalPipelineExecutor`` running ``MinhashDedupSignature`` → ``MinhashDedupBuckets``
  → ``MinhashDedupCluster`` → ``MinhashDedupFilter`` (JsonlReader in, JsonlWriter out), its documented
  recipe.

Reported: wall time (median of ``--repeat``), documents/s, duplicates removed by each, and how many
planted copies each removed.

Two more measurements (each on its own with its flag):

* ``--shingles``: in one process, interleaved, best of ``--repeat``: signatures per second of datatrove's
  own ``MinhashDedupSignature.run`` (its signature stage, writing its bucket files), of curate's
  datatrove-identical keys and of ``shingles: fast``; then how far the two shingle kinds agree: the same
  rows removed and the same pairs clustered, on real paragraphs with near-copies at several edit rates.
* ``--driver-rows 100000,1000000,4000000``: the driver's combine alone, fed with synthetic band hashes
  (14 bands, 10% near-copies) in memory-mapped partials as the driver reads them, one subprocess per size:
  peak anonymous memory above the start (sampled every 2 ms), peak resident memory (file pages
  included), peak spill-folder bytes, seconds; and the figures per billion rows extrapolated from the
  largest size.

Usage: ``python benchmarks/dedup_throughput.py [--mb 50] [--workers 2] [--repeat 1] [--json out.json]``
``[--shingles] [--driver-rows N,N,...]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _corpus(folder: Path, mb: int, share: float) -> tuple[int, set[str]]:
    from curate.testing import write_jsonl_corpus

    base = folder / "base.jsonl"
    n = write_jsonl_corpus(base, mb * 1_000_000)
    rng = random.Random(1)
    lines = base.read_text().splitlines()
    copies, planted = [], set()
    for k, line in enumerate(rng.sample(lines, int(share * len(lines)))):
        row = json.loads(line)
        words = row["text"].split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) * 3 // 100)):
            words[i] = "edited"
        copies.append(json.dumps({"id": f"copy-{k}", "text": " ".join(words)}))
        planted.add(f"copy-{k}")
    data = folder / "data"
    data.mkdir()
    # several files so both tools can split the work; copies last
    per = -(-len(lines) // 4)
    for f in range(4):
        (data / f"part-{f}.jsonl").write_text("\n".join(lines[f * per:(f + 1) * per]) + "\n")
    (data / "part-9.jsonl").write_text("\n".join(copies) + "\n")
    base.unlink()
    return n + len(copies), planted


def _curate(folder: Path, workers: int, shingles: str = "datatrove") -> tuple[float, set[str]]:
    manifest = folder / "dedup.yaml"
    manifest.write_text(f"""name: dedup-bench
seed: 1
source: {{kind: jsonl, paths: ["{folder}/data/*.jsonl"], id_field: id}}
stages:
  - minhash_dedup: {{n_grams: 5, num_buckets: 14, hashes_per_bucket: 8, shingles: {shingles}}}
sink: {{kind: parquet}}
executor: {{kind: local, workers: {workers}}}
""")
    out = folder / "curate-run"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "curate", "run", str(manifest), "-o", str(out), "--no-progress"], check=True,
                   capture_output=True)
    seconds = time.perf_counter() - t0
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept = pa.concat_tables(pq.read_table(f, columns=["id"]) for f in (out / "parquet").glob("*.parquet"))
    return seconds, set(kept.column("id").to_pylist())


def _datatrove(folder: Path, workers: int) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    work = folder / "dt"
    shutil.rmtree(work, ignore_errors=True)
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    tasks = 5  # one per input file

    def reader():
        return JsonlReader(str(folder / "data"), glob_pattern="*.jsonl", id_key="id")

    t0 = time.perf_counter()
    LocalPipelineExecutor([reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
                          tasks=tasks, workers=workers, logging_dir=str(work / "logs1")).run()
    LocalPipelineExecutor([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"),
                                               config=config)],
                          tasks=config.num_buckets, workers=workers, logging_dir=str(work / "logs2")).run()
    LocalPipelineExecutor([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                                               config=config)],
                          tasks=1, logging_dir=str(work / "logs3")).run()
    LocalPipelineExecutor([reader(), MinhashDedupFilter(input_folder=str(work / "remove")),
                           JsonlWriter(str(work / "out"), compression=None)],
                          tasks=tasks, workers=workers, logging_dir=str(work / "logs4")).run()
    seconds = time.perf_counter() - t0
    kept = {json.loads(line)["id"] for f in (work / "out").glob("*.jsonl") for line in f.read_text().splitlines()}
    return seconds, kept


# ----------------------------------------------------------------------------- --shingles
def _documents(mb: float, seed: int = 1) -> tuple[list[str], list[str], list[int]]:
    """Documents of 3 distinct real paragraphs each (disjoint: no accidental overlap), up to ``mb`` (the
    machine has ~1.3 MB of distinct paragraphs), then near-copies of 10% of them (1-8% of words replaced)."""
    from curate.testing import _paragraphs

    paras = list(dict.fromkeys(p for p in _paragraphs() if len(p.split()) >= 8))
    rng = random.Random(seed)
    docs, size = [], 0
    for start in range(0, len(paras) - 2, 3):
        if size >= mb * 1e6:
            break
        docs.append("\n\n".join(paras[start:start + 3]))
        size += len(docs[-1].encode())
    copies, sources = [], []
    for src in rng.sample(range(len(docs)), len(docs) // 10):
        words = docs[src].split(" ")
        rate = rng.choice([0.01, 0.02, 0.04, 0.08])
        for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
            words[i] = rng.choice(["edited", "changed", "other"])
        copies.append(" ".join(words))
        sources.append(src)
    return docs, copies, sources


def _signature_rates(texts: list[str], repeat: int) -> dict[str, float]:
    """Documents per second: datatrove's signature stage vs curate's keys, interleaved, best of ``repeat``."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    from tests.conftest import make_stage

    best = {"datatrove_signature_stage": 0.0, "curate_datatrove_identical": 0.0, "curate_fast": 0.0}
    ids = [f"d{i}" for i in range(len(texts))]
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as out:  # a fresh stage each time: no warm caches carried over
            dt = MinhashDedupSignature(output_folder=out, config=MinhashConfig(seed=0))
            dt.get_shingles("warm the tokenizer up")
            t0 = time.perf_counter()
            dt.run(Document(text=t, id=i) for t, i in zip(texts, ids, strict=True))
            best["datatrove_signature_stage"] = max(best["datatrove_signature_stage"],
                                                    len(texts) / (time.perf_counter() - t0))
        for name, kind in (("curate_datatrove_identical", "datatrove"), ("curate_fast", "fast")):

            stage, _ = make_stage("minhash_dedup", shingles=kind)
            stage._shingles.cache.clear()
            stage.keys(["warm the tokenizer up"], ["w"])
            t0 = time.perf_counter()
            for start in range(0, len(texts), 1024):
                stage.keys(texts[start:start + 1024], ids[start:start + 1024])
            best[name] = max(best[name], len(texts) / (time.perf_counter() - t0))
    return best


def _agreement(docs: list[str], copies: list[str], sources: list[int]) -> dict:
    """Rows removed by datatrove-identical shingles vs fast ones, beside the same shingles under another
    seed: MinHash samples other hash values then, so near the threshold pairs are found by chance."""
    import pyarrow as pa
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    from tests.conftest import make_stage

    texts = docs + copies
    ids = [f"d{i}" for i in range(len(texts))]
    removed = {}
    for name, kind, seed in (("datatrove", "datatrove", 0), ("fast", "fast", 0),
                             ("datatrove_other_seed", "datatrove", 1)):
        stage, _ = make_stage("minhash_dedup", shingles=kind)
        stage._a, stage._b = MinhashDedupSignature(output_folder="memory://x",
                                                   config=MinhashConfig(seed=seed)).parameters
        parts = [pa.table({"id": pa.array(ids[s:s + 1024]),
                           "n_chars": pa.array([len(t) for t in texts[s:s + 1024]], pa.int64()),
                           **stage.keys(texts[s:s + 1024], ids[s:s + 1024])}) for s in range(0, len(texts), 1024)]
        state = stage.combine(parts, 0)
        members = state["_tables"]["members"].to_pylist() if state["clusters"] else []
        removed[name] = {m["id"] for m in members if not m["kept"]}
    planted = {f"d{len(docs) + k}" for k in range(len(copies))}
    base = removed["datatrove"]
    return {"documents": len(texts), "planted_copies": len(copies),
            "removed": {k: len(v) for k, v in removed.items()},
            "planted_removed": {k: len(v & planted) for k, v in removed.items()},
            "rows_with_another_verdict_than_datatrove": {k: len(v ^ base) for k, v in removed.items() if k != "datatrove"},
            "same_verdict_share": {k: round(1 - len(v ^ base) / len(texts), 5)
                                   for k, v in removed.items() if k != "datatrove"}}


def shingles_report(mb: float, repeat: int) -> dict:
    docs, copies, sources = _documents(mb)
    texts = docs + copies
    rates = _signature_rates(texts, repeat)
    size = sum(len(t.encode()) for t in texts) / 1e6
    return {"mb": round(size, 1), "documents": len(texts),
            "docs_per_s": {k: round(v) for k, v in rates.items()},
            "mb_per_s": {k: round(v * size / len(texts), 3) for k, v in rates.items()},
            "vs_datatrove_signature_stage": {k: round(v / rates["datatrove_signature_stage"], 2)
                                             for k, v in rates.items() if k.startswith("curate")},
            "agreement": _agreement(docs, copies, sources)}


# ----------------------------------------------------------------------------- --driver-rows
DRIVER = """
import json, os, sys, threading, time, pathlib
import numpy as np, pyarrow as pa
sys.path.insert(0, sys.argv[3])
from filters.band_groups import Clustering, Rows, cluster_rows, spill_folder
n, folder = int(sys.argv[1]), pathlib.Path(sys.argv[2])
bands, shard = 14, 250_000
rng = np.random.default_rng(0)
for k, lo in enumerate(range(0, n, shard)):  # shards written one at a time: nothing held
    hi = min(n, lo + shard)
    keys = rng.integers(0, 2**63, (hi - lo, bands), dtype=np.uint64)
    src = rng.integers(0, hi - lo, (hi - lo) // 10)
    dst = rng.choice(np.arange(hi - lo), len(src), replace=False)
    ok = dst > src
    take = rng.random((ok.sum(), bands)) < 0.5
    keys[dst[ok]] = np.where(take, keys[src[ok]], keys[dst[ok]])
    table = pa.table({"id": pa.array([f"doc-{i:010d}" for i in range(lo, hi)]),
                      "n_chars": pa.array(rng.integers(100, 10_000, hi - lo)),
                      "bands": pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), bands)})
    with pa.ipc.new_file(str(folder / f"p-{k:05d}.arrow"), table.schema) as w:
        for s in range(0, table.num_rows, 8192):
            w.write_table(table.slice(s, 8192))
    del keys, table
partials = []
for path in sorted(folder.glob("p-*.arrow")):
    with pa.memory_map(str(path)) as src:
        partials.append(pa.ipc.open_file(src).read_all())
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
spill_root = folder / "spill"
def disk():
    total = 0
    for root, _, files in os.walk(spill_root):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
base = status("RssAnon:")
peak = {"anon": 0, "disk": 0}
done = []
def sample():
    while not done:
        peak["anon"] = max(peak["anon"], status("RssAnon:"))
        peak["disk"] = max(peak["disk"], disk())
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
t0 = time.perf_counter()
with spill_folder(spill_root) as scratch:
    rows = Rows(partials)
    how = Clustering(keys=lambda t: t.column("bands").combine_chunks().flatten().to_numpy().reshape(-1, bands),
                     bands=bands)
    state = cluster_rows(rows, how, scratch)
seconds = time.perf_counter() - t0
done.append(1)
t.join()
print(json.dumps({"rows": n, "seconds": round(seconds, 1), "anon_growth_mb": round((peak["anon"] - base) / 2**20, 1),
                  "peak_rss_mb": round(status("VmHWM:") / 2**20, 1), "spill_peak_mb": round(peak["disk"] / 2**20, 1),
                  "clusters": state["clusters"], "duplicates": state["duplicates"]}))
"""


def driver_report(sizes: list[int]) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    points = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", DRIVER, str(n), tmp, root], check=True, capture_output=True,
                                 text=True)
        points.append(json.loads(out.stdout.splitlines()[-1]))
    last = points[-1]
    per_row_disk = last["spill_peak_mb"] * 2**20 / last["rows"]
    return {"points": points, "per_billion_rows": {
        "spill_disk_gb": round(per_row_disk * 1e9 / 1e9, 1),
        "anon_memory_mb": "flat: " + ", ".join(f"{p['anon_growth_mb']} MB at {p['rows']:,}" for p in points),
        "seconds_single_core_estimate": round(last["seconds"] / last["rows"] * 1e9)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--dup-share", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--shingles", action="store_true", help="only the shingle speed and agreement figures")
    ap.add_argument("--driver-rows", help="only the driver memory/disk figures, at these row counts (a,b,c)")
    args = ap.parse_args()
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)
    from curate.testing import write_report

    if args.driver_rows:
        write_report(driver_report([int(x) for x in args.driver_rows.split(",")]), args.json)
        return
    if args.shingles:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest.make_stage
        write_report(shingles_report(args.mb, args.repeat), args.json)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        n, planted = _corpus(folder, args.mb, args.dup_share)
        runs = {"curate": [], "curate_fast": [], "datatrove": []}
        kept = {}
        paths = (("curate", lambda f, w: _curate(f, w)), ("curate_fast", lambda f, w: _curate(f, w, "fast")),
                 ("datatrove", _datatrove))
        for _ in range(args.repeat):
            for name, fn in paths:
                seconds, kept[name] = fn(folder, args.workers)
                runs[name].append(seconds)
        med = {k: statistics.median(v) for k, v in runs.items()}
        report = {"documents": n, "mb": args.mb, "planted": len(planted), "workers": args.workers,
                  "seconds": {k: round(v, 1) for k, v in med.items()},
                  "docs_per_s": {k: round(n / v) for k, v in med.items()},
                  "removed": {k: n - len(v) for k, v in kept.items()},
                  "planted_removed": {k: len(planted - v) for k, v in kept.items()},
                  "speed_ratio": round(med["datatrove"] / med["curate"], 3),
                  "speed_ratio_fast": round(med["datatrove"] / med["curate_fast"], 3)}
    write_report(report, args.json)


if __name__ == "__main__":
    main()

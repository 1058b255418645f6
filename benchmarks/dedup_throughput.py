"""minhash_dedup vs datatrove's own four-step MinHash pipeline: same corpus, same parameters, one run.

The corpus: ``--mb`` of JSONL documents of real paragraphs (the machine's standard-library docstrings),
plus near-copies of ``--dup-share`` of them (3% of words replaced: Jaccard ≈ 0.8–0.9) appended at the
end. Both sides use 5-gram shingles, 14 bands × 8 hashes, 64-bit xxhash, and ``--workers`` processes:

* **curate**: ``curate run`` with ``minhash_dedup`` (signatures while the first phase writes its
  intermediate file, clustering once in the driver, filtering in the second phase) → Parquet;
* **curate, fast shingles**: the same with ``shingles: fast`` (whitespace words, n-grams hashed in numpy);
* **datatrove**: ``LocalPipelineExecutor`` running ``MinhashDedupSignature`` → ``MinhashDedupBuckets``
  → ``MinhashDedupCluster`` → ``MinhashDedupFilter`` (JsonlReader in, JsonlWriter out), its documented
  recipe.

Reported: wall time (median of ``--repeat``), documents/s, duplicates removed by each, and how many
planted copies each removed.

Usage: ``python benchmarks/dedup_throughput.py [--mb 50] [--workers 2] [--repeat 1] [--json out.json]``
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
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--dup-share", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    from curate.testing import write_report

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

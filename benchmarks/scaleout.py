"""Scale-out: the Dask executor with 1 and 2 workers on a CPU-bound job, and what a shard costs it.

Two measurements, each ``curate run`` in its own process (start-up included, as a user sees it):

1. **CPU-bound job** — ``minhash_dedup`` with datatrove's shingles (Python-bound: spaCy words and a hash
   per n-gram) over ``--mb`` of generated JSONL in ``--files`` files, with ``kind: dask`` and 1 then 2
   workers (LocalCluster), and the local executor with 2 workers for reference. Reported: wall time
   (median of ``--repeat``), the 2-worker speed-up (goal ≥ 1.7× on 2 cores), and whether every run
   wrote the same output (sha256 of each sink's ``index.json``).
2. **Per-shard overhead** — ``heuristics`` on tiny shards (4 documents each), with 20 and ``--shards``
   shards, under the local executor and under Dask (2 workers each). The cost of one more shard is the
   slope ``(t(N) - t(20)) / (N - 20)``, which leaves out the fixed start-up (CLI, cluster, workers),
   in wall time and in CPU time (driver, scheduler and workers together).

Usage: ``python benchmarks/scaleout.py [--mb 12] [--files 8] [--shards 200] [--repeat 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXECUTORS = {
    "dask_1": "{kind: dask, workers: 1, dashboard: false}",
    "dask_2": "{kind: dask, workers: 2, dashboard: false}",
    "local_2": "{kind: local, workers: 2}",
}


def _split_corpus(folder: Path, mb: float, files: int) -> int:
    """``mb`` of real-paragraph JSONL documents dealt round-robin into ``files`` files; the count."""
    from curate.testing import write_jsonl_corpus

    base = folder / "base.jsonl"
    n = write_jsonl_corpus(base, int(mb * 1_000_000))
    lines = base.read_bytes().splitlines(keepends=True)
    base.unlink()
    data = folder / "data"
    data.mkdir()
    for f in range(files):
        (data / f"part-{f:03d}.jsonl").write_bytes(b"".join(lines[f::files]))
    return n


def _tiny_corpus(folder: Path, shards: int) -> Path:
    """``shards`` files of 4 short documents each (one shard per file)."""
    data = folder / f"tiny-{shards}"
    data.mkdir()
    for f in range(shards):
        rows = [f'{{"id": "t{f}-{i}", "text": "short document {f} {i} with a few words to score"}}\n' for i in range(4)]
        (data / f"t-{f:04d}.jsonl").write_text("".join(rows))
    return data


def _manifest(folder: Path, name: str, data: Path, stage: str, executor: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"""name: scaleout-{name}
source: {{kind: jsonl, paths: ["{data}/*.jsonl"], id_field: id}}
stages:
  - {stage}
sink: {{kind: jsonl}}
executor: {executor}
""")
    return path


def _run(manifest: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``curate run`` from an empty run directory, its process
    start-up included. CPU time sums the driver and every worker (children are reaped before the
    driver exits), which a machine shared with other work disturbs far less than wall time."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "curate", "run", str(manifest), "-o", str(out), "--no-progress"],
                   check=True, capture_output=True, env={**os.environ, "CURATE_FAULTS": ""})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _median_run(manifest: Path, out: Path, repeat: int) -> tuple[float, float]:
    runs = [_run(manifest, out) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _index_digest(out: Path) -> str:
    return hashlib.sha256((out / "jsonl" / "index.json").read_bytes()).hexdigest()


def cpu_bound(folder: Path, mb: float, files: int, repeat: int) -> dict:
    """Wall and CPU time of the CPU-bound job per executor; the 2-worker Dask speed-up."""
    docs = _split_corpus(folder, mb, files)
    stage = "minhash_dedup: {n_grams: 5, num_buckets: 14, hashes_per_bucket: 8}"
    seconds, cpu, digests = {}, {}, {}
    for name, executor in EXECUTORS.items():
        m = _manifest(folder, f"cpu-{name}", folder / "data", stage, executor)
        out = folder / f"run-cpu-{name}"
        seconds[name], cpu[name] = _median_run(m, out, repeat)
        digests[name] = _index_digest(out)
    return {"documents": docs, "mb": mb, "files": files,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
            "docs_per_s": {k: round(docs / v) for k, v in seconds.items()},
            "dask_speedup_2_vs_1": round(seconds["dask_1"] / seconds["dask_2"], 3),
            "dask_2_vs_local_2": round(seconds["local_2"] / seconds["dask_2"], 3),
            "same_output": len(set(digests.values())) == 1}


def per_shard(folder: Path, shards: int, repeat: int) -> dict:
    """Wall and CPU time for 20 and ``shards`` tiny shards per executor; the cost of one more shard."""
    small = 20
    wall: dict[str, dict[int, float]] = {}
    cpu: dict[str, dict[int, float]] = {}
    for name in ("local_2", "dask_2"):
        wall[name], cpu[name] = {}, {}
        for n in (small, shards):
            data = folder / f"tiny-{n}"
            if not data.exists():
                _tiny_corpus(folder, n)
            m = _manifest(folder, f"tiny-{name}-{n}", data, "heuristics: {}", EXECUTORS[name])
            wall[name][n], cpu[name][n] = _median_run(m, folder / f"run-tiny-{name}-{n}", repeat)

    def slope(t: dict[str, dict[int, float]]) -> dict[str, float]:
        return {k: 1000 * (v[shards] - v[small]) / (shards - small) for k, v in t.items()}

    wall_ms, cpu_ms = slope(wall), slope(cpu)
    return {"shards": [small, shards],
            "seconds": {k: {str(n): round(t, 2) for n, t in v.items()} for k, v in wall.items()},
            "cpu_seconds": {k: {str(n): round(t, 2) for n, t in v.items()} for k, v in cpu.items()},
            "ms_per_shard": {k: round(v, 1) for k, v in wall_ms.items()},
            "cpu_ms_per_shard": {k: round(v, 1) for k, v in cpu_ms.items()},
            "dask_extra_ms_per_shard": round(wall_ms["dask_2"] - wall_ms["local_2"], 1),
            "dask_extra_cpu_ms_per_shard": round(cpu_ms["dask_2"] - cpu_ms["local_2"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=12)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    from curate.testing import write_report

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
                  "cpu_bound": cpu_bound(folder, args.mb, args.files, args.repeat),
                  "per_shard": per_shard(folder, args.shards, args.repeat),
                  "load_after": round(os.getloadavg()[0], 2)}
    write_report(report, args.json)


if __name__ == "__main__":
    main()

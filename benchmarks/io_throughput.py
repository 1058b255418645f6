"""JSONL → Parquet and → WebDataset: curate's writers beside pyarrow's and webdataset's own, one run.

Two comparisons on the same generated corpus:

1. **writer only** — the same in-memory documents table written by ``pq.write_table`` vs curate's
   Parquet sink, and by ``webdataset.ShardWriter`` vs curate's WebDataset sink (same members:
   ``txt`` + ``json`` with id/source/meta). This is the "writer overhead" the goal bounds (≤ 10%).
2. **end to end** — ``curate run`` (1 and 2 workers) vs the script a user would write
   (``pyarrow.json.read_json`` → ``pq.write_table``; orjson lines → ``ShardWriter``).

Usage: ``python benchmarks/io_throughput.py [--mb 200] [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _documents(path: Path) -> pa.Table:
    """The corpus as curate's documents table, read by curate's own JSONL reader."""
    from curate.context import RunContext
    from curate.plugins import kinds_of
    from curate.rundir import RunDir

    cls = kinds_of("source")["jsonl"]
    reader = cls(cls.Params(paths=[str(path)], id_field="id", shard_bytes="100GB"))
    shard = reader.shards()[0]
    rd = RunDir(path.parent / "scratch-run")
    return pa.Table.from_batches(list(reader.read(shard, RunContext(0, shard, rd))))


def writer_only(table: pa.Table, work: Path, repeat: int) -> dict:
    import webdataset as wds

    from curate.plugins import kinds_of

    batches = table.to_batches(max_chunksize=2048)
    out = {}

    def ours(kind: str, **params):
        def run():
            folder = work / f"ours-{kind}"
            shutil.rmtree(folder, ignore_errors=True)
            cls = kinds_of("sink")[kind]
            writer = cls(cls.Params(path=folder.name, **params), work).writer("00000")
            for b in batches:
                writer.write(b)
            writer.close()
        return run

    def base_parquet():
        pq.write_table(table, work / "base.parquet", compression="zstd")

    def base_wds():
        folder = work / "base-wds"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        with wds.ShardWriter(str(folder / "%05d.tar"), maxsize=256e6, maxcount=10**9, verbose=0) as sink:
            for b in batches:
                for i, row in enumerate(b.to_pylist()):
                    meta = orjson.loads(row["meta"]) if row["meta"] else None
                    sink.write({"__key__": f"k{i:07d}", "txt": row["text"].encode(),
                                "json": orjson.dumps({"id": row["id"], "meta": meta, "source": row["source"]},
                                                     option=orjson.OPT_SORT_KEYS)})

    mb = table.column("text").nbytes / 1e6
    for name, base, mine in (("parquet", base_parquet, ours("parquet", shard_bytes="100GB")),
                             ("webdataset", base_wds, ours("webdataset", shard_bytes="256MB"))):
        tb, to = _timed(base, repeat), _timed(mine, repeat)
        out[name] = {"baseline_s": round(tb, 3), "ours_s": round(to, 3), "baseline_MBps": round(mb / tb, 1),
                     "ours_MBps": round(mb / to, 1), "docs_per_s": round(table.num_rows / to),
                     "overhead_pct": round(100 * (to / tb - 1), 1)}
    return out


def end_to_end(path: Path, work: Path, repeat: int, n_docs: int) -> dict:
    import webdataset as wds

    mb = path.stat().st_size / 1e6
    out = {}

    def base_parquet():
        table = pj.read_json(path)
        pq.write_table(table, work / "e2e.parquet", compression="zstd")

    def base_wds():
        folder = work / "e2e-wds"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        with open(path, "rb") as fh, wds.ShardWriter(str(folder / "%05d.tar"), maxsize=256e6, verbose=0) as sink:
            for i, line in enumerate(fh):
                rec = orjson.loads(line)
                text = rec.pop("text")
                sink.write({"__key__": f"k{i:08d}", "txt": text.encode(), "json": orjson.dumps(rec)})

    def ours(kind: str, workers: int):
        manifest = work / f"{kind}.yaml"
        manifest.write_text(json.dumps({
            "name": "bench", "source": {"kind": "jsonl", "paths": [str(path)], "id_field": "id",
                                        "shard_bytes": "64MB"},
            "stages": [], "sink": {"kind": kind}, "executor": {"kind": "local", "workers": workers}}))

        def run():
            subprocess.run([sys.executable, "-m", "curate", "run", str(manifest), "-o", str(work / f"run-{kind}"),
                            "--restart", "--no-progress"], check=True, capture_output=True)
        return run

    for name, base in (("parquet", base_parquet), ("webdataset", base_wds)):
        tb = _timed(base, repeat)
        row = {"baseline_s": round(tb, 3), "baseline_MBps": round(mb / tb, 1)}
        for workers in (1, 2):
            t = _timed(ours(name, workers), repeat)
            row[f"ours_{workers}w_s"] = round(t, 3)
            row[f"ours_{workers}w_MBps"] = round(mb / t, 1)
            row[f"ours_{workers}w_docs_per_s"] = round(n_docs / t)
            row[f"ratio_{workers}w"] = round(tb / t, 2)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)

    from curate.testing import write_jsonl_corpus, write_report

    work = Path(tempfile.mkdtemp(prefix="curate-io-"))
    try:
        corpus = work / "corpus.jsonl"
        n_docs = write_jsonl_corpus(corpus, args.mb * 1_000_000)
        table = _documents(corpus)
        report = {"corpus_MB": round(corpus.stat().st_size / 1e6, 1), "docs": n_docs,
                  "writer_only": writer_only(table, work, args.repeat)}
        del table
        if not args.skip_e2e:
            report["end_to_end"] = end_to_end(corpus, work, args.repeat, n_docs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_report(report, args.json)


if __name__ == "__main__":
    main()

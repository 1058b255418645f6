"""JSONL → Parquet and → WebDataset: curate's reader and writers beside pyarrow's and webdataset's own, one run.

Three comparisons on the same generated corpus, every contender interleaved with the others in each
repeat (the best and the median of ``--repeat`` are reported: on a shared machine the best is the one
least disturbed):

1. **writer only** — the same in-memory documents table written by ``pq.write_table`` vs curate's
   Parquet sink, and by ``webdataset.ShardWriter`` vs curate's WebDataset sink (same members:
   ``txt`` + ``json`` with id/source/meta). This is the "writer overhead" the goal bounds (≤ 10%);
   its figures are medians (the smoke test in ``tests/test_scale.py`` bounds them).
2. **reader only** — in this process: ``pyarrow.json.read_json(path)`` (pyarrow's documented defaults:
   ``use_threads=True``, 1 MB blocks, inferred schema) vs curate's JSONL reader over the same file
   (every batch, ids and meta, bad lines checked).
3. **end to end** — ``curate run`` (no stages; 1 worker with the source's default 256 MB shards, and 2
   workers with 64 MB shards so that both have ranges of the file to read) vs the script pyarrow's documentation
   gives: ``table = pyarrow.json.read_json(path)`` then ``pyarrow.parquet.write_table(table, out,
   compression="zstd")`` (zstd because it is the Parquet sink's default codec). The script runs both as a
   function in this process (pyarrow already imported) and as its own ``python`` process (what a user
   runs, paying interpreter start and imports as ``curate run`` does); ratios are given against both.
   WebDataset: orjson lines → ``ShardWriter``. With ``--compare-tree DIR`` (another checkout of curate,
   e.g. ``git archive <commit> curate | tar -x -C DIR``) that version runs too, as ``before_*``, so a
   change is measured before and after in one run. ``startup_s`` is ``curate run`` on a one-line file.

Versions, CPU count, load average and every setting are printed with the figures.

Usage: ``python benchmarks/io_throughput.py [--mb 200] [--repeat 3] [--json out.json] [--compare-tree DIR]``
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


def _interleaved(contenders: dict, repeat: int) -> dict[str, dict[str, float]]:
    """Run every contender once per repeat, in turn; best and median seconds of each."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"best_s": round(min(t), 3), "median_s": round(statistics.median(t), 3)} for name, t in times.items()}


def _settings(args) -> dict:
    import os
    import platform

    import numpy

    import curate

    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "describe", "--always",
                                 "--dirty"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "pyarrow": pa.__version__,
            "orjson": orjson.__version__, "numpy": numpy.__version__,
            "curate": getattr(curate, "__version__", None), "curate_commit": commit,
            "corpus_MB": args.mb, "repeat": args.repeat, "parquet_compression": "zstd",
            "read_json": "pyarrow.json.read_json(path): defaults (use_threads=True, block_size=1 MB, inferred schema)",
            "curate_source": "jsonl, id_field: id, shard_bytes: default (256 MB) with 1 worker, 64MB with 2, "
                             "batch defaults (2048 rows / 16 MB)",
            "compare_tree": args.compare_tree}


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
        times = _interleaved({"base": base, "ours": mine}, repeat)
        tb, to = times["base"]["median_s"], times["ours"]["median_s"]
        bb, bo = times["base"]["best_s"], times["ours"]["best_s"]
        out[name] = {"baseline_s": round(tb, 3), "ours_s": round(to, 3), "baseline_MBps": round(mb / tb, 1),
                     "ours_MBps": round(mb / to, 1), "docs_per_s": round(table.num_rows / to),
                     "overhead_pct": round(100 * (to / tb - 1), 1),
                     "overhead_best_pct": round(100 * (bo / bb - 1), 1)}  # noise only adds time: best of each
    return out


def reader_only(path: Path, work: Path, repeat: int) -> dict:
    """pyarrow's JSON reader vs curate's JSONL reader, in this process, over the same file."""
    from curate.context import RunContext
    from curate.plugins import kinds_of
    from curate.rundir import RunDir

    cls = kinds_of("source")["jsonl"]
    reader = cls(cls.Params(paths=[str(path)], id_field="id", shard_bytes="64MB"))
    shards = reader.shards()

    def ours():
        rd = RunDir(work / "reader-run")
        for shard in shards:
            ctx = RunContext(0, shard, rd)
            for _ in reader.read(shard, ctx):
                pass
            ctx.close()

    mb = path.stat().st_size / 1e6
    times = _interleaved({"read_json": lambda: pj.read_json(path), "curate_reader": ours}, repeat)
    out = {name: {**t, "MBps": round(mb / t["best_s"], 1)} for name, t in times.items()}
    out["ratio"] = round(times["read_json"]["best_s"] / times["curate_reader"]["best_s"], 2)
    return out


_PEER_SCRIPT = """import sys
import pyarrow.json as pj
import pyarrow.parquet as pq
table = pj.read_json(sys.argv[1])
pq.write_table(table, sys.argv[2], compression="zstd")
"""


def end_to_end(path: Path, work: Path, repeat: int, n_docs: int, compare_tree: str | None = None) -> dict:
    import os

    import webdataset as wds

    from curate.testing import tree_env

    mb = path.stat().st_size / 1e6
    peer_script = work / "peer.py"
    peer_script.write_text(_PEER_SCRIPT)
    tiny = work / "tiny.jsonl"
    with open(path, "rb") as fh:
        tiny.write_bytes(fh.readline())

    def base_parquet():
        table = pj.read_json(path)
        pq.write_table(table, work / "e2e.parquet", compression="zstd")

    def base_parquet_script():
        subprocess.run([sys.executable, str(peer_script), str(path), str(work / "e2e-script.parquet")], check=True)

    def base_wds():
        folder = work / "e2e-wds"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        with open(path, "rb") as fh, wds.ShardWriter(str(folder / "%05d.tar"), maxsize=256e6, verbose=0) as sink:
            for i, line in enumerate(fh):
                rec = orjson.loads(line)
                text = rec.pop("text")
                sink.write({"__key__": f"k{i:08d}", "txt": text.encode(), "json": orjson.dumps(rec)})

    def ours(kind: str, workers: int, tree: str | None = None, corpus: Path = path):
        tag = f"{kind}-{workers}-{'before' if tree else 'now'}-{corpus.stem}"
        manifest = work / f"{tag}.yaml"
        source = {"kind": "jsonl", "paths": [str(corpus)], "id_field": "id"}
        if workers > 1:
            source["shard_bytes"] = "64MB"  # ranges of the file for the workers to share (default: 256 MB)
        manifest.write_text(json.dumps({
            "name": "bench", "source": source,
            "stages": [], "sink": {"kind": kind}, "executor": {"kind": "local", "workers": workers}}))
        # started in `work`: from the repository root, `python -m curate` would import this checkout first
        env = tree_env(tree or Path(__file__).resolve().parents[1], work)  # this checkout, or the other one

        def run():
            subprocess.run([sys.executable, "-m", "curate", "run", str(manifest), "-o", str(work / f"run-{tag}"),
                            "--restart", "--no-progress"], check=True, capture_output=True, env=env, cwd=str(work))
        return run

    out = {}
    for name, peers in (("parquet", {"script_inprocess": base_parquet, "script_process": base_parquet_script}),
                        ("webdataset", {"script_inprocess": base_wds})):
        contenders = dict(peers)
        for workers in (1, 2):
            contenders[f"ours_{workers}w"] = ours(name, workers)
            if compare_tree:
                contenders[f"before_{workers}w"] = ours(name, workers, compare_tree)
        contenders["startup"] = ours(name, 1, corpus=tiny)
        if compare_tree:
            contenders["before_startup"] = ours(name, 1, compare_tree, corpus=tiny)
        times = _interleaved(contenders, repeat)
        row: dict = {}
        for who, t in times.items():
            row[f"{who}_s"] = t["best_s"]
            row[f"{who}_median_s"] = t["median_s"]
            if "startup" not in who:
                row[f"{who}_MBps"] = round(mb / t["best_s"], 1)
        for who in times:
            if who.startswith(("ours_", "before_")) and "startup" not in who:
                for peer in peers:
                    row[f"ratio_{who}_vs_{peer}"] = round(times[peer]["best_s"] / times[who]["best_s"], 2)
                row[f"{who}_docs_per_s"] = round(n_docs / times[who]["best_s"])
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--skip-e2e", action="store_true", help="writer (and reader) only")
    ap.add_argument("--skip-reader", action="store_true")
    ap.add_argument("--compare-tree", help="another checkout of curate (the folder holding its `curate/` "
                                           "package) to run end to end beside this one")
    args = ap.parse_args(argv)
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)
    if args.compare_tree:
        byte_compile(args.compare_tree)

    from curate.testing import write_jsonl_corpus, write_report

    settings = _settings(args)
    print("settings:", json.dumps(settings), flush=True)
    work = Path(tempfile.mkdtemp(prefix="curate-io-"))
    try:
        corpus = work / "corpus.jsonl"
        n_docs = write_jsonl_corpus(corpus, args.mb * 1_000_000)
        table = _documents(corpus)
        report = {"settings": settings, "corpus_MB": round(corpus.stat().st_size / 1e6, 1), "docs": n_docs,
                  "writer_only": writer_only(table, work, args.repeat)}
        del table
        if not args.skip_reader:
            report["reader_only"] = reader_only(corpus, work, args.repeat)
        if not args.skip_e2e:
            report["end_to_end"] = end_to_end(corpus, work, args.repeat, n_docs, args.compare_tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_report(report, args.json)


if __name__ == "__main__":
    main()

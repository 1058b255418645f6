"""`curate compact` against the rewrite a user would otherwise script, on the same many-small-files output.

    python benchmarks/compact_throughput.py --mb 200 --files 400 --target-mb 64

The input is a finished run directory made here: ``--mb`` of real-text documents (the machine's own
docstrings) written by curate's Parquet and WebDataset sinks into ``--files`` small files each. Then:

- **Parquet**: ``curate.compact.compact`` vs ``pyarrow.dataset.write_dataset`` (what pyarrow's docs give
  for rewriting a dataset into files of a bounded size: ``max_rows_per_file``, ``max_rows_per_group``),
  zstd both, rows per file chosen to land near the same target;
- **WebDataset**: ``curate.compact.compact`` vs ``webdataset.ShardWriter(maxsize=…)`` fed by
  ``webdataset.WebDataset(urls)`` without decoding (webdataset's own resharding recipe).

Reported: MB/s of input, the ratio curate/peer, files written, peak memory of the process. Curate also
hashes every file, writes under temporary names, keeps a resumable progress file and checks the
source against its index; the peers do none of that.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import orjson
import pyarrow as pa
import yaml


def make_run(root: Path, mb: int, files: int) -> Path:
    """A finished run directory with a Parquet and a WebDataset sink of ``files`` files each."""
    from curate.plugins import kinds_of
    from curate.sinks.base import write_index
    from curate.testing import write_jsonl_corpus

    corpus = root / "corpus.jsonl"
    write_jsonl_corpus(corpus, mb * 1_000_000)
    rows = [orjson.loads(line) for line in corpus.read_bytes().splitlines()]
    table = pa.Table.from_pylist([{"id": str(r.get("id", i)), "text": r["text"]} for i, r in enumerate(rows)])
    per = -(-table.num_rows // files)
    outputs = {}
    for kind in ("parquet", "webdataset"):
        cls = kinds_of("sink")[kind]
        sink = cls(cls.Params(), root / "run")
        entries = []
        for i in range(files):
            w = sink.writer(f"{i:05d}")
            for b in table.slice(i * per, per).to_batches(max_chunksize=2048):
                w.write(b)
            entries += w.close()
        index = write_index(sink, entries, table.schema.names)
        outputs[f"sink:{kind}"] = {"path": str(sink.directory), "files": len(entries),
                                   "samples": index["total_samples"], "bytes": index["total_bytes"]}
    run = root / "run"
    (run / "manifest.resolved.yaml").write_text(yaml.safe_dump({
        "name": "bench", "seed": 0, "source": {"kind": "jsonl", "paths": [str(corpus)]},
        "sink": [{"kind": "parquet"}, {"kind": "webdataset"}]}))
    (run / "stats.json").write_bytes(orjson.dumps({"name": "bench", "stages": {}, "outputs": outputs}))
    return run


def folder_bytes(folder: Path, pattern: str) -> tuple[int, int]:
    files = sorted(folder.rglob(pattern))
    return len(files), sum(f.stat().st_size for f in files)


def curate_compact(run: Path, kind: str, target: int) -> tuple[float, int]:
    from curate.compact import compact

    shutil.rmtree(run / "compacted", ignore_errors=True)
    t0 = time.perf_counter()
    compact(run, sink=kind, target_bytes=target)
    seconds = time.perf_counter() - t0
    return seconds, folder_bytes(run / "compacted" / kind, "part-*")[0]


def pyarrow_rewrite(run: Path, target: int, out: Path) -> tuple[float, int]:
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    files = sorted(str(p) for p in (run / "parquet").glob("*.parquet"))
    n_files, size = folder_bytes(run / "parquet", "*.parquet")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    per_file = max(1, int(rows * target / size))
    t0 = time.perf_counter()
    dataset = ds.dataset(files, format="parquet")
    ds.write_dataset(dataset, out, format="parquet", max_rows_per_file=per_file,
                     max_rows_per_group=min(per_file, max(1, per_file // 32)),
                     file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
                     existing_data_behavior="overwrite_or_ignore")
    seconds = time.perf_counter() - t0
    return seconds, folder_bytes(out, "*.parquet")[0]


def webdataset_reshard(run: Path, target: int, out: Path) -> tuple[float, int]:
    import webdataset as wds

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    urls = [str(p) for p in sorted((run / "webdataset").glob("*.tar"))]
    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "part-%05d.tar"), maxsize=target, maxcount=10**9, verbose=0) as sink:
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            sink.write({k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"})
    seconds = time.perf_counter() - t0
    return seconds, folder_bytes(out, "*.tar")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--target-mb", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", help="save the JSON report here")
    args = ap.parse_args()
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)
    from curate.testing import write_report

    target = args.target_mb * 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root, args.mb, args.files)
        report: dict = {"mb": args.mb, "files_in": args.files, "target_mb": args.target_mb, "results": {}}
        for kind, peer_name, peer in (("parquet", "pyarrow.dataset.write_dataset", pyarrow_rewrite),
                                      ("webdataset", "webdataset.ShardWriter", webdataset_reshard)):
            size = folder_bytes(run / kind, "*.parquet" if kind == "parquet" else "*.tar")[1]
            ours, theirs = [], []
            for _ in range(args.repeat):
                s, n_ours = curate_compact(run, kind, target)
                ours.append(s)
                s, n_theirs = peer(run, target, root / f"peer-{kind}")
                theirs.append(s)
            a, b = statistics.median(ours), statistics.median(theirs)
            report["results"][kind] = {
                "input_mb": round(size / 1e6, 1),
                "curate_mb_s": round(size / 1e6 / a, 1), "curate_files": n_ours,
                "peer": peer_name, "peer_mb_s": round(size / 1e6 / b, 1), "peer_files": n_theirs,
                "speed_ratio_curate_over_peer": round(b / a, 2)}
    write_report(report, args.out)


if __name__ == "__main__":
    main()

"""Bounded memory at scale: ``--gb`` GB of JSONL through tokenize → UtK → pack → Parquet, peak PSS of the tree.

The corpus is ``--files`` zstd-compressed JSONL files (compressed so that 10 GB of JSONL fits on a small
disk; each file is one shard) of real paragraphs from the machine's standard-library docstrings, with
the long tail real corpora have: web-length documents, 0.2% book-length ones and one ~8 MB document per
file. The job is the long-context recipe — ``tokenize`` → ``utk`` (32K windows) → ``pack`` (best fit,
32K) → Parquet — with the local executor and 2 workers, and the real Llama/Mistral SentencePiece
tokenizer that ``mistral_common`` ships. The whole process tree (driver and workers) is sampled for PSS
(shared library pages counted once across processes) and RSS. Inputs and outputs are deleted at the end.

Usage: ``python benchmarks/scale_memory.py [--gb 10] [--files 20] [--workers 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utk_throughput import make_tokenizer, versions  # noqa: E402


def write_compressed_corpus(folder: Path, total_bytes: int, files: int) -> tuple[int, int]:
    """``files`` ``.jsonl.zst`` files of about ``total_bytes / files`` JSONL bytes each; ``(documents, bytes)``."""
    import numpy as np
    import orjson
    import zstandard

    from curate.testing import _paragraphs

    pool = _paragraphs()
    rng = np.random.default_rng(0)
    per_file = total_bytes // files
    documents = written = 0
    folder.mkdir(parents=True)
    for f in range(files):
        with open(folder / f"part-{f:03d}.jsonl.zst", "wb") as raw, \
                zstandard.ZstdCompressor(level=3, threads=2).stream_writer(raw) as out:
            size, giant_done = 0, False
            while size < per_file:
                lines = []
                for _ in range(256):
                    count = int(rng.integers(4, 60))
                    if rng.random() < 0.002:
                        count = int(rng.integers(1000, 5000))
                    if not giant_done and size > per_file // 2:
                        count, giant_done = 60_000, True
                    text = "\n\n".join(pool[i] for i in rng.integers(0, len(pool), count))
                    lines.append(orjson.dumps({"id": f"doc-{documents}", "text": text}))
                    documents += 1
                chunk = b"\n".join(lines) + b"\n"
                out.write(chunk)
                size += len(chunk)
            written += size
    return documents, written


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=10.0, help="JSONL size (uncompressed) in GB")
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)

    import subprocess

    from curate.testing import TreeMemory, write_report

    work = Path(tempfile.mkdtemp(prefix="curate-scale-"))
    report: dict = {"versions": versions()}
    try:
        t0 = time.perf_counter()
        report["documents"], jsonl_bytes = write_compressed_corpus(work / "in", int(args.gb * 1e9), args.files)
        report["jsonl_GB"] = round(jsonl_bytes / 1e9, 2)
        report["compressed_GB"] = round(sum(f.stat().st_size for f in (work / "in").iterdir()) / 1e9, 2)
        report["corpus_write_seconds"] = round(time.perf_counter() - t0, 1)
        tok = make_tokenizer(work / "tok")
        manifest = work / "scale.yaml"
        manifest.write_text(json.dumps({
            "name": "bench-scale", "seed": 7,
            "source": {"kind": "jsonl", "paths": [str(work / "in")]},
            "tokenizer": {"path": str(tok)},
            "stages": [{"tokenize": {}}, {"utk": {"seq_len": 32768}}, {"pack": {"seq_len": 32768}}],
            "sink": {"kind": "parquet"}, "executor": {"kind": "local", "workers": args.workers}}))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(manifest), "-o", str(work / "run"),
                                 "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with TreeMemory(proc.pid) as mem:
            out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err.decode()[-3000:])
        seconds = time.perf_counter() - t0
        stats = json.loads((work / "run" / "stats.json").read_text())
        tokens = stats["stages"]["tokenize"]["tokens_out"]
        out_bytes = sum(f.stat().st_size for f in (work / "run").rglob("*.parquet"))
        report.update({
            "workers": args.workers, "seconds": round(seconds, 1), "MB_per_s": round(jsonl_bytes / 1e6 / seconds, 2),
            "tokens": tokens, "M_tokens_per_s": round(tokens / seconds / 1e6, 3),
            "peak_pss_MB": round(mem.peak / 1e6), "peak_rss_MB": round(mem.peak_rss / 1e6),
            "output_GB": round(out_bytes / 1e9, 2), "rows_out": stats["stages"]["pack"]["rows_out"],
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_report(report, args.json)


if __name__ == "__main__":
    main()

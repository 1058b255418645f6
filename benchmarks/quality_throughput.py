"""Quality rules: ``engine: fast`` and ``engine: datatrove`` against datatrove's own pipeline, one run.

The corpus is web-like JSONL built from real paragraphs (the machine's own standard-library
docstrings): prose documents, and about a third turned into what crawls hold — menus of short lines,
bullet lists, repeated boilerplate lines, link lists, cookie notices — so each rule keeps and drops a
fair share. It is written as 2 files, one per datatrove task.

For each rule (``gopher_quality``, ``gopher_repetition``, ``c4_quality``, ``fineweb_quality``), three jobs
do the same work, JSONL in → rule → Parquet out, each in its own process, 2 ways parallel:

1. ``datatrove``: ``LocalPipelineExecutor(tasks=2, workers=2)``: ``JsonlReader`` → the rule's filter →
   ``ParquetWriter`` (datatrove's documented way to run a filter);
2. ``curate datatrove``: ``curate run`` with the stage's ``engine: datatrove`` (2 local workers);
3. ``curate fast``: ``curate run`` with ``engine: fast`` (2 local workers).

Reported: seconds, MB/s, ``x_datatrove`` (datatrove's seconds over the job's), the whole process tree's
peak PSS, rows kept, and the agreement of the fast engine's keep/drop verdicts with datatrove's (by id).

Usage: ``python benchmarks/quality_throughput.py [--mb 50] [--rules gopher_quality ...] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utk_throughput import run_job, split_lines, versions  # noqa: E402

RULES = {  # stage name → datatrove class
    "gopher_quality": "GopherQualityFilter", "gopher_repetition": "GopherRepetitionFilter",
    "c4_quality": "C4QualityFilter", "fineweb_quality": "FineWebQualityFilter",
}

BOILERPLATE = ["Home", "About us", "Contact", "Privacy Policy", "Terms of Use", "Log in", "Sign up", "Search",
               "Share this page", "Read more...", "Next page", "Previous page", "Back to top",
               "This site uses cookies to improve your experience.", "Accept all cookies",
               "Please enable JavaScript to view the comments."]


def write_corpus(path: Path, target_bytes: int, seed: int = 0) -> int:
    """About ``target_bytes`` of web-like JSONL documents from real paragraphs; returns the document count."""
    import numpy as np
    import orjson

    from curate.testing import _paragraphs

    pool = _paragraphs()
    rng = np.random.default_rng(seed)
    written = n = 0
    with open(path, "wb") as fh:
        while written < target_bytes:
            paras = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(2, 40)))]
            kind = rng.random()
            if kind < 0.10:  # navigation: menus and short lines around a little prose
                menu = [BOILERPLATE[i] for i in rng.integers(0, len(BOILERPLATE), 12)]
                paras = menu[:6] + paras[:2] + menu[6:]
            elif kind < 0.18:  # a list page
                paras = [f"- {p.split('. ')[0][:80]}" for p in paras] * 2
            elif kind < 0.26:  # repeated boilerplate between paragraphs
                line = BOILERPLATE[int(rng.integers(0, len(BOILERPLATE)))]
                paras = [x for p in paras for x in (p, line)]
            elif kind < 0.32:  # one paragraph copied over and over
                paras = paras[:1] * int(rng.integers(3, 12)) + paras[1:3]
            text = ("\n" if kind < 0.18 else "\n\n").join(paras)
            line = orjson.dumps({"id": f"doc-{n}", "text": text}) + b"\n"
            fh.write(line)
            written += len(line)
            n += 1
    return n


def datatrove_code(rule: str, work: Path, out: Path) -> str:
    return textwrap.dedent(f"""
        import pyarrow.parquet as pq, glob
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.writers import ParquetWriter
        from datatrove.pipeline.filters import {RULES[rule]}
        LocalPipelineExecutor(pipeline=[
            JsonlReader("{work}/in", glob_pattern="*.jsonl"),
            {RULES[rule]}(),
            ParquetWriter("{out}"),
        ], tasks=2, workers=2, logging_dir="{work}/dt-logs-{rule}").run()
        ids = [i for f in sorted(glob.glob("{out}/*.parquet")) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        print(__import__("json").dumps(ids))
    """)


def curate_code(rule: str, engine: str, work: Path, out: Path) -> str:
    manifest = work / f"{rule}-{engine}.yaml"
    manifest.write_text(json.dumps({
        "name": f"bench-{rule}-{engine}", "seed": 1,
        "source": {"kind": "jsonl", "paths": [str(work / "in")], "id_field": "id"},
        "stages": [{rule: {"engine": engine}}],
        "sink": {"kind": "parquet"}, "executor": {"kind": "local", "workers": 2}}))
    return textwrap.dedent(f"""
        import glob, json, subprocess, sys
        import pyarrow.parquet as pq
        subprocess.run([sys.executable, "-m", "curate", "run", "{manifest}", "-o", "{out}", "--restart",
                        "--no-progress"], check=True, capture_output=True)
        ids = [i for f in sorted(glob.glob("{out}/**/*.parquet", recursive=True))
               for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        print(json.dumps(ids))
    """)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=50, help="corpus size in MB (default 50)")
    ap.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    ap.add_argument("--skip", nargs="*", default=[], choices=["datatrove", "curate-datatrove", "curate-fast"])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)

    from curate.testing import write_report

    work = Path(tempfile.mkdtemp(prefix="curate-quality-"))
    report: dict = {"versions": versions(), "settings": {
        "datatrove": "LocalPipelineExecutor(tasks=2, workers=2): JsonlReader (2 files) -> filter -> ParquetWriter",
        "curate": "curate run, local executor, 2 workers: jsonl (2 files) -> stage -> parquet",
    }}
    try:
        corpus = work / "corpus.jsonl"
        report["documents"] = write_corpus(corpus, args.mb * 1_000_000)
        split_lines(corpus, work / "in", 2)
        corpus.unlink()
        mb = sum(f.stat().st_size for f in (work / "in").iterdir()) / 1e6
        report["corpus_MB"] = round(mb, 1)
        env = {"HF_HUB_OFFLINE": "1"}
        for rule in args.rules:
            jobs = {"datatrove": datatrove_code(rule, work, work / f"dt-{rule}"),
                    "curate-datatrove": curate_code(rule, "datatrove", work, work / f"cd-{rule}"),
                    "curate-fast": curate_code(rule, "fast", work, work / f"cf-{rule}")}
            figures, kept = {}, {}
            for name, code in jobs.items():
                if name in args.skip:
                    continue
                result = run_job(f"{rule} {name}", code, env)
                kept[name] = set(json.loads(result["stdout"].strip().splitlines()[-1]))
                figures[name] = {"seconds": round(result["seconds"], 2), "MB_per_s": round(mb / result["seconds"], 2),
                                 "peak_pss_MB": result["peak_pss_MB"], "rows_kept": len(kept[name])}
            if "datatrove" in figures:
                for name in figures:
                    figures[name]["x_datatrove"] = round(figures["datatrove"]["seconds"] / figures[name]["seconds"], 2)
            reference = kept.get("datatrove", kept.get("curate-datatrove"))
            if reference is not None and "curate-fast" in kept:
                differ = len(reference ^ kept["curate-fast"])
                figures["fast_agreement"] = round(1 - differ / report["documents"], 5)
                figures["fast_differing_documents"] = differ
            report[rule] = figures
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_report(report, args.json)


if __name__ == "__main__":
    main()

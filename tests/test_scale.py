"""Scale checks, marked slow: a 1 GB JSONL runs in bounded memory; the IO benchmark runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curate.testing import TreeMemory, write_jsonl_corpus
from tests.conftest import write_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_gigabyte_jsonl_runs_in_bounded_memory(tmp_path, capsys):
    corpus = tmp_path / "big.jsonl"
    n_docs = write_jsonl_corpus(corpus, 1_000_000_000)
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: big
        source: {{kind: jsonl, paths: ["{corpus}"], id_field: id}}
        stages:
          - heuristics: {{min_words: 50}}
        sink: [{{kind: parquet}}, {{kind: webdataset, shard_bytes: 512MB}}]
        executor: {{kind: local, workers: 2}}
        """)
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(m), "-o", str(tmp_path / "run"),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with TreeMemory(proc.pid) as mem:
        out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    read = stats["stages"]["read"]
    assert read["rows_in"] == n_docs
    kept = stats["stages"]["heuristics"]["rows_out"]
    assert stats["outputs"]["sink:parquet"]["samples"] == kept == stats["outputs"]["sink:webdataset"]["samples"]
    with capsys.disabled():
        print(f"\n1 GB JSONL ({n_docs} docs): peak memory of the whole process tree "
              f"{mem.peak / 1e6:.0f} MB PSS ({mem.peak_rss / 1e6:.0f} MB summed RSS)")
    assert mem.peak <= 1_000_000_000


@pytest.mark.slow
def test_io_benchmark_runs_and_writers_stay_near_the_libraries(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import io_throughput

    report = io_throughput.main(["--mb", "40", "--repeat", "3", "--skip-e2e"])
    with capsys.disabled():
        print("\nwriter-only overhead:", {k: v["overhead_pct"] for k, v in report["writer_only"].items()})
    for fmt in ("parquet", "webdataset"):
        figures = report["writer_only"][fmt]
        assert figures["ours_MBps"] > 0 and figures["baseline_MBps"] > 0
        # The goal (≤ 10% overhead) is measured on 200 MB by hand; on 40 MB in a busy CI run a
        # looser bound on the best of each (noise only adds time) still catches a real regression.
        assert figures["overhead_best_pct"] < 35, figures

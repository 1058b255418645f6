"""End to end through the real CLI: outputs load unchanged, runs are byte-identical, resume works."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, make_text, write_jsonl, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def _index(run: Path, sink: str) -> dict:
    return json.loads((run / sink / "index.json").read_text())


def test_quickstart_output_loads_with_datasets_and_webdataset(tmp_path):
    import datasets
    import webdataset as wds

    run = tmp_path / "qs"
    cli("run", str(ROOT / "manifests" / "quickstart.yaml"), "-o", str(run), "--no-progress")
    stats = json.loads((run / "stats.json").read_text())
    n = stats["stages"]["utk"]["rows_out"]
    assert n > 50 and stats["stages"]["select"]["rows_out"] > 200
    assert stats["outputs"]["sink:parquet"]["samples"] == n == stats["outputs"]["sink:webdataset"]["samples"]
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{run}/parquet/*.parquet")), split="train")
    assert ds.num_rows == n and {"input_ids", "loss_mask", "doc_offsets", "n_tokens", "lineage"} <= set(ds.column_names)
    assert ds.num_rows == _index(run, "parquet")["total_samples"]
    assert max(ds["n_tokens"]) <= 4096 and sum(ds["n_tokens"]) == stats["stages"]["utk"]["tokens_out"]
    tars = sorted(glob.glob(f"{run}/webdataset/*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert len(samples) == n and samples[0]["input_ids.npy"].tolist() == ds[0]["input_ids"]
    assert max(s["samples"] for s in _index(run, "webdataset")["shards"]) <= 100  # shard_samples: 100
    # every drop is counted with a reason: in - out == dropped, stage by stage
    for label in ("read", "heuristics", "select"):
        s = stats["stages"][label]
        assert s["rows_in"] - s["rows_out"] == sum(s["drops"].values()), label
    # the quarantined rows are exactly the heuristics drops, with their reasons
    import pyarrow.parquet as pq

    q = pq.read_table(sorted(glob.glob(f"{run}/quarantine/heuristics/*.parquet")))
    assert q.num_rows == sum(stats["stages"]["heuristics"]["drops"].values())
    assert set(q.column("drop_reason").to_pylist()) <= set(stats["stages"]["heuristics"]["drops"])
    _check_quickstart_table(stats)
    # the CLI reads it all back, UtK windows decoded with the run tokenizer
    shown = cli("inspect", str(run), "-n", "3").stdout
    assert "sample 0" in shown and "<|knot_1_tail|>" in shown and "backtrace" in shown
    assert "select" in cli("stats", str(run)).stdout


def _corpus_manifest(tmp_path: Path, files: int = 6, docs: int = 300, workers: int = 2, extra: str = "") -> Path:
    for f in range(files):
        write_jsonl(tmp_path / "in" / f"p{f}.jsonl",
                    [{"text": make_text(f * docs + i, 20 + (i * 37) % 400)} for i in range(docs)])
    return write_manifest(tmp_path / "m.yaml", f"""
        name: det
        seed: 3
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], batch_rows: 64}}
        stages:
          - heuristics: {{min_words: 30}}
          - select: {{top: {{column: scores.heuristics.n_words, fraction: 0.5}}}}
        sink:
          - {{kind: parquet, shard_samples: 70}}
          - {{kind: webdataset, shard_bytes: 100KB}}
          - {{kind: jsonl}}
          - {{kind: arrow}}
        executor: {{kind: local, workers: {workers}}}
        {extra}
        """)


def _shas(run: Path) -> dict:
    return {sink: [(s["name"], s["sha256"]) for s in _index(run, sink)["shards"]]
            for sink in ("parquet", "webdataset", "jsonl", "arrow")}


def test_two_runs_and_worker_counts_give_identical_bytes(tmp_path):
    m = _corpus_manifest(tmp_path)
    cli("run", str(m), "-o", str(tmp_path / "a"), "--no-progress")
    cli("run", str(m), "-o", str(tmp_path / "b"), "--no-progress", "--workers", "1")
    a, b = _shas(tmp_path / "a"), _shas(tmp_path / "b")
    assert a == b and len(a["parquet"]) > 6 and len(a["webdataset"]) > 6
    # the sha256 in the index is the file's real digest
    import hashlib

    for name, sha in a["webdataset"]:
        assert hashlib.sha256((tmp_path / "a" / "webdataset" / name).read_bytes()).hexdigest() == sha
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    kept = stats["stages"]["select"]["rows_out"]
    assert kept == round(0.5 * stats["stages"]["select"]["rows_in"])  # exact top fraction


def test_rerun_skips_and_fingerprint_change_is_refused(tmp_path):
    m = _corpus_manifest(tmp_path, files=3, docs=50, workers=1)
    run = tmp_path / "r"
    cli("run", str(m), "-o", str(run), "--no-progress")
    before = _shas(run)
    again = cli("run", str(m), "-o", str(run), "--no-progress")
    assert "resumed" in again.stdout and _shas(run) == before
    m.write_text(m.read_text().replace("min_words: 30", "min_words: 31"))
    refused = cli("run", str(m), "-o", str(run), "--no-progress", check=False)
    assert refused.returncode == 2 and "manifest changed" in refused.stderr and "--restart" in refused.stderr
    cli("run", str(m), "-o", str(run), "--no-progress", "--restart")
    # the executor is not part of the fingerprint: more workers resume the same run
    resumed = cli("run", str(m), "-o", str(run), "--no-progress", "--workers", "2")
    assert "resumed" in resumed.stdout


def test_sigkill_midway_then_rerun_gives_identical_bytes(tmp_path):
    m = _corpus_manifest(tmp_path, files=24, docs=400)
    ref = tmp_path / "ref"
    cli("run", str(m), "-o", str(ref), "--no-progress")
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(m), "-o", str(run), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "completions").glob("p0-*.json"))) < 4:
        time.sleep(0.01)
    done_at_kill = len(list((run / "completions").glob("*.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done_at_kill < 48, "the kill must land midway"
    assert not (run / "parquet" / "index.json").exists()
    cli("run", str(m), "-o", str(run), "--no-progress")
    assert _shas(run) == _shas(ref)
    assert not list(run.rglob(".tmp-*"))
    def counts(r: Path) -> dict:
        stages = json.loads((r / "stats.json").read_text())["stages"]
        return {k: (v["rows_in"], v["rows_out"], v["drops"]) for k, v in stages.items()}

    assert counts(run) == counts(ref)


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_shard_is_reported_and_others_complete(tmp_path, workers):
    m = _corpus_manifest(tmp_path, files=3, docs=40, workers=workers)
    # a stage error fails each shard loudly, with the traceback in that shard's log, and the run exits
    # non-zero, naming each shard's input file and the stage
    fault = '[{"point": "stage", "label": "heuristics", "action": "raise"}]'
    proc = cli("run", str(m), "-o", str(tmp_path / "f"), "--no-progress", check=False,
               env={"CURATE_FAULTS": fault})
    assert proc.returncode == 1
    assert "3 shard(s) failed in phase 0" in proc.stderr
    assert "in stage heuristics" in proc.stderr and ".jsonl" in proc.stderr
    log = (tmp_path / "f" / "logs" / "p0-00000.log").read_text()
    assert "InjectedFault" in log and "Traceback" in log


def test_bad_records_are_counted_in_stats_and_kept_in_failures(tmp_path):
    good = [json.dumps({"text": make_text(i, 60)}) for i in range(10)]
    lines = good[:3] + ['{"text": broken'] + good[3:6] + ['{"body": "no text"}', '{"text": ""}'] + good[6:]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: bad
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"]}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["stages"]["read"]["drops"] == {"empty_text": 1, "invalid_json": 1, "invalid_utf8": 1,
                                                "missing_text_field": 1}
    assert stats["stages"]["read"]["rows_in"] == 14 and stats["outputs"]["sink:parquet"]["samples"] == 10
    failures = [json.loads(line) for line in (tmp_path / "run" / "failures" / "p0-00000.jsonl").read_text().splitlines()]
    assert [(f["line"], f["reason"]) for f in failures] == [
        (4, "invalid_json"), (8, "missing_text_field"), (9, "empty_text"), (14, "invalid_utf8")]
    assert all(f["file"].endswith("a.jsonl") and f["record"] for f in failures)


def test_run_shard_redoes_one_shard_identically(tmp_path):
    """`curate run-shard` (what cluster launchers call) rewrites one shard's files byte for byte."""
    m = _corpus_manifest(tmp_path, files=3, docs=60, workers=1)
    m.write_text(m.read_text().replace("  - select: {top: {column: scores.heuristics.n_words, fraction: 0.5}}\n", ""))
    run = tmp_path / "r"
    cli("run", str(m), "-o", str(run), "--no-progress")
    before = _shas(run)
    for p in list((run / "parquet").glob("00001-*")) + [run / "completions" / "p0-00001.json"]:
        p.unlink()
    cli("run-shard", str(m), "-o", str(run), "--phase", "0", "--shard", "00001")
    assert (run / "completions" / "p0-00001.json").exists()
    names = sorted(p.name for p in (run / "parquet").glob("*.parquet"))
    assert names == [n for n, _ in before["parquet"]]
    cli("run", str(m), "-o", str(run), "--no-progress")
    assert _shas(run) == before
    refused = cli("run-shard", str(m), "-o", str(tmp_path / "elsewhere"), "--phase", "0", "--shard", "00001",
                  check=False)
    assert refused.returncode == 2 and "not a run directory yet" in refused.stderr


def _check_quickstart_table(stats: dict) -> None:
    """docs/quickstart.md's stats table shows what the quickstart produces today."""
    import re

    text = (ROOT / "docs" / "quickstart.md").read_text()
    table = re.search(r"```text\nstage +rows in.*?```", text, re.S).group(0).splitlines()[2:-1]
    for line in table:
        label, rows_in, rows_out, *rest = line.split()
        got = stats["stages"][label]
        assert int(rows_in.replace(",", "")) == got["rows_in"], (line, got)
        assert int(rows_out.replace(",", "")) == got["rows_out"], (line, got)
        drops = dict(re.findall(r"(\w+): ([\d,]+)", line))
        assert {k: int(v.replace(",", "")) for k, v in drops.items()} == got["drops"], (line, got)
        tokens = [t for t in rest if re.fullmatch(r"[\d,]+", t) and t not in drops.values()]
        if tokens:
            assert int(tokens[-1].replace(",", "")) == got["tokens_out"], (line, got)

"""The run as steps a scheduler can run: prepare, run-shard, combine, finalize, status — same bytes as `curate run`."""

from __future__ import annotations

import hashlib
import json

from tests.conftest import cli, make_text, write_jsonl, write_manifest


def _manifest(tmp_path):
    for f in range(3):
        write_jsonl(tmp_path / "in" / f"p{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": make_text(f * 30 + i, 20 + i)} for i in range(30)])
    return write_manifest(tmp_path / "m.yaml", f"""
        name: steps
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        stages:
          - heuristics: {{min_words: 1}}
          - select: {{top: {{column: scores.heuristics.n_words, fraction: 0.5}}}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _status(run):
    return json.loads(cli("status", str(run), "--json").stdout)


def test_steps_by_hand_give_the_bytes_of_curate_run(tmp_path):
    m, run = _manifest(tmp_path), tmp_path / "st"
    cli("run", str(m), "-o", str(tmp_path / "ref"), "--no-progress")
    shown = cli("prepare", str(m), "-o", str(run)).stdout
    assert "curate combine" in shown and "curate finalize" in shown
    refused = cli("run-shard", str(m), "-o", str(run), "--phase", "0", "--shard", "nope", check=False)
    assert refused.returncode == 2 and "no shard named 'nope'" in refused.stderr
    for shard in ("00000", "00001"):
        cli("run-shard", str(m), "-o", str(run), "--phase", "0", "--shard", shard)
    early = cli("combine", str(m), "-o", str(run), "--phase", "1", check=False)
    assert early.returncode == 2 and "not complete: 00002" in early.stderr
    st = _status(run)
    assert st["phases"][0]["done"] == ["00000", "00001"] and st["phases"][0]["pending"] == ["00002"]
    assert st["phases"][1]["combined"] is False and st["finished"] is False
    cli("run-shard", str(m), "-o", str(run), "--phase", "0", "--shard", "00002")
    assert "already complete" in cli("run-shard", str(m), "-o", str(run), "--phase", "0", "--shard", "00002").stdout
    cli("combine", str(m), "-o", str(run), "--phase", "1")
    assert "already combined" in cli("combine", str(m), "-o", str(run), "--phase", "1").stdout
    for shard in ("00000", "00001", "00002"):
        cli("run-shard", str(m), "-o", str(run), "--phase", "1", "--shard", shard)
    cli("finalize", str(m), "-o", str(run))
    cli("finalize", str(m), "-o", str(run))  # idempotent
    assert _status(run)["finished"] is True
    assert _digest(run / "parquet") == _digest(tmp_path / "ref" / "parquet")


def test_status_names_failed_shards_and_their_logs(tmp_path):
    m, run = _manifest(tmp_path), tmp_path / "run"
    fault = '[{"point": "stage", "label": "heuristics", "shard": "00001", "action": "raise"}]'
    proc = cli("run", str(m), "-o", str(run), "--no-progress", check=False, env={"CURATE_FAULTS": fault})
    assert proc.returncode == 1
    st = _status(run)
    assert st["phases"][0]["done"] == ["00000", "00002"]
    assert list(st["phases"][0]["failed"]) == ["00001"]
    assert st["phases"][0]["failed"]["00001"].endswith("logs/p0-00001.log")
    text = cli("status", str(run)).stdout
    assert "failed phase 0 shard 00001" in text and "p0-00001.log" in text
    # the shard fails again under run-shard: a one-line message with its input file, stage and log
    again = cli("run-shard", str(m), "-o", str(run), "--phase", "0", "--shard", "00001", check=False,
                env={"CURATE_FAULTS": fault})
    assert again.returncode == 1 and "in stage heuristics" in again.stderr and "Traceback" not in again.stderr
    cli("run", str(m), "-o", str(run), "--no-progress")
    assert _status(run)["finished"] is True

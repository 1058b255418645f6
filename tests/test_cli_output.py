"""What the CLI prints: install hints with their extra intact, progress lines when piped, stage times."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_text, write_jsonl, write_manifest


def test_install_hints_keep_their_brackets(monkeypatch, capsys):
    from curate import cli
    from curate.errors import MissingDependency

    def boom():
        raise MissingDependency("sentence_transformers", "embed")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "pip install 'curate-longctx[embed]'" in capsys.readouterr().err


def _manifest(tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": make_text(i)} for i in range(20)])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": make_text(i + 20)} for i in range(20)])
    return write_manifest(tmp_path / "m.yaml", f"""
        name: piped
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], batch_rows: 4}}
        stages:
          - heuristics: {{min_words: 1}}
          - select: {{top: {{column: scores.heuristics.n_words, fraction: 0.5}}}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)


def test_progress_lines_when_stderr_is_a_pipe(tmp_path):
    m = _manifest(tmp_path)
    slow = [{"point": "stage", "label": "heuristics", "shard": "00000", "after": 1, "action": "sleep", "seconds": 6}]
    env = {**os.environ, "CURATE_FAULTS": json.dumps(slow)}
    proc = subprocess.run([sys.executable, "-m", "curate", "run", str(m), "-o", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "phase 1/2 [heuristics]: 2 shard(s) to run" in err
    assert "phase 1/2 [heuristics]: 0/2 shards" in err and "(running)" in err  # a line while the shard sleeps
    assert "phase 1/2 [heuristics]: 2/2 shards" in err and "(done)" in err
    assert "phase 2/2 [select]" in err
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    # the global stage's seconds include its observe (phase 1) and combine work
    combine = json.loads((tmp_path / "run" / "stats" / "combine-1.json").read_text())["select"]["seconds"]
    observe = sum(json.loads(p.read_text()).get("select", {}).get("seconds", 0)
                  for p in (tmp_path / "run" / "stats").glob("p0-*.json"))
    assert observe > 0 and combine > 0
    assert stats["stages"]["select"]["seconds"] >= round(combine + observe, 4) - 1e-3
    assert (tmp_path / "run" / "logs" / "run.log").exists()

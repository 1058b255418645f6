"""Teacher tasks against a scripted loopback OpenAI-compatible server (tests/fake_openai.py).

Mechanics only (the fake's answers are deterministic placeholders): retries of 500/429/timeouts/
malformed/empty answers, Retry-After, context-length refusals, bounded and adaptive concurrency, the
per-shard cache (a rerun sends nothing answered, also after a kill), persistent failures leaving the
shard incomplete, structured-output repair, stats, secrets, and IN2 context construction.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import cli, make_text, write_jsonl, write_manifest
from tests.fake_openai import FakeOpenAI

pytest.importorskip("openai", reason="the `llm` extra is not installed")


def _docs(folder: Path, files: int = 2, per_file: int = 12, paragraphs: int = 8) -> Path:
    for f in range(files):
        rows = [{"id": f"d{f}-{i}", "text": "\n".join(make_text(f * 1000 + i * 17 + k, 30) for k in range(paragraphs))}
                for i in range(per_file)]
        write_jsonl(folder / f"part-{f}.jsonl", rows)
    return folder


def _teacher(fake: FakeOpenAI, **extra) -> str:
    base = {"backend": "openai", "model": "fake-model", "base_url": fake.base_url, "api_key": "sk-test",
            "max_concurrency": 8, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5}
    base.update(extra)
    return json.dumps(base)


def _manifest(tmp: Path, stages: str, workers: int = 1, per_file: int = 12) -> Path:
    data = _docs(tmp / "data", per_file=per_file)
    return write_manifest(tmp / "m.yaml", f"""
        name: teach
        seed: 5
        source: {{kind: jsonl, paths: ["{data}/*.jsonl"], id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
        {stages}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: {workers}}}
        """)


def _summarize(fake, **extra) -> str:
    return f"  - summarize: {{chunk_tokens: 60, fanout: 2, teacher: {_teacher(fake, **extra)}}}"


def _rows(run: Path) -> list[dict]:
    return pq.read_table(sorted((run / "parquet").glob("*.parquet"))).to_pylist()


def _stats(run: Path, label: str) -> dict:
    return json.loads((run / "stats.json").read_text())["stages"][label]


def _cached(run: Path) -> int:
    n = 0
    for db in (run / "cache").rglob("*.sqlite"):
        with sqlite3.connect(db) as con:
            n += con.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    return n


def test_summarize_answers_every_row_and_a_rerun_sends_nothing(tmp_path):
    with FakeOpenAI(latency=0.005) as fake:
        m = _manifest(tmp_path, _summarize(fake, price={"input_per_million": 2.0, "output_per_million": 4.0}))
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        sent = fake.total_requests
        rows = _rows(tmp_path / "run")
        assert len(rows) == 24 and all(r["summary"] and r["summary_levels"] >= 1 for r in rows)
        assert all(r["messages"][-1] == {"role": "assistant", "content": r["summary"]} for r in rows)
        lineage = json.loads(rows[0]["lineage"])
        assert lineage["teacher"]["model"] == "fake-model" and lineage["sources"] == [rows[0]["id"]]
        st = _stats(tmp_path / "run", "summarize")["metrics"]
        assert st["requests_sent"]["sum"] == sent == _cached(tmp_path / "run")
        assert st["cost_usd"]["sum"] == pytest.approx(
            (st["prompt_tokens"]["sum"] * 2 + st["completion_tokens"]["sum"] * 4) / 1e6)
        hist = _stats(tmp_path / "run", "summarize")["histograms"]["latency_s"]
        assert hist["count"] == sent and hist["p50"] <= hist["p90"] <= hist["p99"] <= hist["max"]
        # a fresh run into a new directory that reuses nothing sends the same requests; a rerun of the
        # finished run sends none; a --restart (cache cleared) sends them all again
        fake.reset_counters()
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        assert fake.total_requests == 0


def test_retries_then_answers_and_counts(tmp_path):
    # every prompt: a 500, then a 429 with Retry-After 0, then a malformed body, then an empty answer,
    # then a timeout, then the answer
    script = {"*": ["status 500", "status 429 0", "malformed", "empty", "hang", "ok"]}
    with FakeOpenAI(script=script) as fake:
        m = _manifest(tmp_path, _summarize(fake, timeout_s=0.5, max_retries=6), per_file=3)
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        per_key = fake.requests_per_key
        # each distinct prompt went through the whole script (the same prompt sent again later, by
        # another document, finds the script used up and is answered at once)
        assert min(per_key.values()) >= 6
        st = _stats(tmp_path / "run", "summarize")["metrics"]
        assert st["retries"]["sum"] == 5 * len(per_key)
        for reason in ("http_500", "http_429", "malformed", "empty", "timeout"):
            assert st[f"retry_{reason}"]["sum"] == len(per_key), reason
        assert len(_rows(tmp_path / "run")) == 6


def test_retry_after_is_honoured():
    from synthesizers.teachers.base import Request
    from synthesizers.teachers.openai_backend import OpenAITeacher
    from synthesizers.teachers.spec import TeacherSpec

    with FakeOpenAI(script={"*": ["status 429 1", "ok"]}) as fake:
        t = OpenAITeacher(TeacherSpec(model="m", base_url=fake.base_url, api_key="k", backoff_s=0.0))
        try:
            t0 = time.monotonic()
            replies = dict(t.stream([Request(messages=({"role": "user", "content": f"q{i}"},)) for i in range(3)]))
            waited = time.monotonic() - t0
        finally:
            t.close()
    assert all(r.ok and r.attempts == 2 for r in replies.values())
    assert waited >= 1.0


def test_persistent_failures_leave_the_shard_incomplete_then_a_rerun_sends_only_those(tmp_path):
    with FakeOpenAI() as fake:
        m = _manifest(tmp_path, _summarize(fake, max_retries=2))
        first = {}

        def script(n, key, attempt, req):  # the first key seen fails for ever (until the script changes)
            first.setdefault("key", key)
            return "status 503" if key == first["key"] else "ok"

        fake.script = script
        proc = cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress", check=False)
        assert proc.returncode != 0
        out = proc.stdout + proc.stderr
        assert "failed after every retry" in out and "HTTP 503" in out, out
        assert fake.requests_per_key[first["key"]] % 3 == 0  # 1 + max_retries per shard attempt
        answered = {key for key, status in fake.events if status == 200}
        fake.script = None
        fake.reset_counters()
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        # the rerun sends the failed request and what depended on it (the merges of its document),
        # at most once per shard (each shard has its own cache), and never a request that was answered
        assert first["key"] in fake.requests_per_key
        assert not answered & set(fake.requests_per_key)
        assert max(fake.requests_per_key.values()) <= 2
        assert len(_rows(tmp_path / "run")) == 24


def test_context_length_refusals_are_counted_and_never_retried(tmp_path):
    with FakeOpenAI(script={"*": "context_length"}) as fake:
        m = _manifest(tmp_path, _summarize(fake))
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        st = _stats(tmp_path / "run", "summarize")
        assert st["drops"] == {"context_length": 24} and st["rows_out"] == 0
        assert "retries" not in st["metrics"]  # never retried
        assert st["metrics"]["requests_sent"]["sum"] == fake.total_requests


def test_concurrency_never_exceeds_the_bound(tmp_path):
    from synthesizers.teachers.base import Request
    from synthesizers.teachers.openai_backend import OpenAITeacher
    from synthesizers.teachers.spec import TeacherSpec

    with FakeOpenAI(latency=0.02) as fake:
        for adaptive in (False, True):
            fake.reset_counters()
            t = OpenAITeacher(TeacherSpec(model="m", base_url=fake.base_url, api_key="k", max_concurrency=6,
                                          adaptive=adaptive))
            try:
                replies = list(t.stream([Request(messages=({"role": "user", "content": f"q{i}"},))
                                         for i in range(200)]))
            finally:
                t.close()
            assert len(replies) == 200 and all(r.ok for _, r in replies)
            assert fake.max_inflight <= 6
            assert t.limiter.max_inflight <= 6
        assert fake.max_inflight == 6  # adaptive grows up to the ceiling on a server that keeps up


def test_adaptive_concurrency_backs_off_on_a_capped_server():
    from synthesizers.teachers.base import Request
    from synthesizers.teachers.openai_backend import OpenAITeacher
    from synthesizers.teachers.spec import TeacherSpec

    with FakeOpenAI(latency=0.02, capacity=6, capacity_retry_after=0) as fake:
        t = OpenAITeacher(TeacherSpec(model="m", base_url=fake.base_url, api_key="k", max_concurrency=64,
                                      backoff_s=0.01, max_backoff_s=0.05, max_retries=20))
        try:
            replies = list(t.stream([Request(messages=({"role": "user", "content": f"q{i}"},))
                                     for i in range(600)]))
        finally:
            t.close()
        assert all(r.ok for _, r in replies)
        rejected = fake.by_status.get(429, 0)
        assert rejected < 0.25 * 600, fake.by_status
        settled = [v for _, v in t.limiter.history[len(t.limiter.history) // 2:]]
        assert max(settled) <= 16, t.limiter.history[-20:]


def test_a_killed_run_resends_nothing_it_had_answered(tmp_path):
    with FakeOpenAI(latency=0.03) as fake:
        m = _manifest(tmp_path, _summarize(fake, max_concurrency=4))
        cli("run", str(m), "-o", str(tmp_path / "clean"), "--no-progress")
        needed = fake.total_requests
        fake.reset_counters()
        run = tmp_path / "run"
        proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(m), "-o", str(run), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while fake.total_requests < needed // 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = _cached(run)
        assert 0 < answered < needed
        fake.reset_counters()
        cli("run", str(m), "-o", str(run), "--no-progress")
        assert fake.total_requests == needed - answered
        from tests.test_faults import output_digest

        assert output_digest(run) == output_digest(tmp_path / "clean")


def test_fault_in_the_stage_then_rerun_is_identical_and_sends_nothing_twice(tmp_path):
    from tests.test_faults import output_digest

    with FakeOpenAI() as fake:
        m = _manifest(tmp_path, _summarize(fake))
        cli("run", str(m), "-o", str(tmp_path / "clean"), "--no-progress")
        needed = fake.total_requests
        fake.reset_counters()
        faults = json.dumps([{"point": "sink", "after": 1, "action": "raise"}])
        proc = cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress", check=False,
                   env={"CURATE_FAULTS": faults})
        assert proc.returncode != 0
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        assert fake.total_requests == needed
        assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def test_api_key_from_the_environment_is_sent_and_never_written(tmp_path):
    secret = "sk-very-secret-0123456789"
    with FakeOpenAI(api_key=secret) as fake:
        teacher = _teacher(fake).replace('"sk-test"', '"${OPENAI_API_KEY}"')
        m = _manifest(tmp_path, f"  - summarize: {{chunk_tokens: 60, teacher: {teacher}}}")
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress", env={"OPENAI_API_KEY": secret})
        assert fake.last_authorization == f"Bearer {secret}"
    for p in (tmp_path / "run").rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def test_unparsable_answers_are_repaired_then_counted(tmp_path):
    # every first answer is not JSON; the repair turn (the conversation with the error) is answered well
    def script(n, key, attempt, req):
        return "bad_json_content" if len(req["messages"]) == 1 else "ok"

    with FakeOpenAI(script=script) as fake:
        stage = f"  - segment_qa: {{min_tokens: 200, max_tokens: 400, teacher: {_teacher(fake)}}}"
        m = _manifest(tmp_path, stage)
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        st = _stats(tmp_path / "run", "segment_qa")["metrics"]
        assert st["repairs"]["sum"] == 24 and "unparsable" not in st
        assert len(_rows(tmp_path / "run")) == 24
    with FakeOpenAI(script={"*": "bad_json_content"}) as fake:  # never parsable: dropped, counted, recorded
        stage = f"  - segment_qa: {{min_tokens: 200, max_tokens: 400, teacher: {_teacher(fake)}}}"
        m = write_manifest(tmp_path / "m2.yaml", (tmp_path / "m.yaml").read_text().replace(
            (tmp_path / "m.yaml").read_text().split("stages:\n")[1].split("sink:")[0], stage + "\n"))
        cli("run", str(m), "-o", str(tmp_path / "run2"), "--no-progress")
        st = _stats(tmp_path / "run2", "segment_qa")
        assert st["drops"] == {"unparsable": 24}
        failures = [json.loads(line) for f in (tmp_path / "run2" / "failures").glob("*.jsonl")
                    for line in f.read_text().splitlines()]
        assert len(failures) == 24 and all(f["record"] for f in failures)


def test_segment_qa_places_evidence_at_the_recorded_depth(tmp_path):
    from curate.tokenizer import CurateTokenizer

    with FakeOpenAI() as fake:
        stage = (f"  - segment_qa: {{segment_tokens: 32, min_tokens: 300, max_tokens: 700, multi_hop_fraction: 0.5,"
                 f" teacher: {_teacher(fake)}}}")
        m = _manifest(tmp_path, stage)
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    tok = CurateTokenizer.load_run(tmp_path / "run" / "tokenizer")
    rows = _rows(tmp_path / "run")
    assert len(rows) == 24 and {r["qa_type"] for r in rows} == {"single", "multi_hop"}
    sources = {}
    for f in sorted((tmp_path / "data").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            sources[d["id"]] = d["text"]
    depths = []
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": r["answer"]}
        context = user["content"].split("\n\nAnswer the question using the text above.")[0]
        n = len(tok.encode_arrays([context])[0])
        assert n == r["context_tokens"] and 300 <= n <= 700
        assert r["evidence"] and (len(r["evidence"]) >= 2) == (r["qa_type"] == "multi_hop")
        for e in r["evidence"]:
            source = sources[e["source_id"]]
            # the evidence segment is exactly there, and is a piece of its own document
            seg_text = user["content"][e["char_offset"]:e["char_end"]]
            assert seg_text and seg_text in source and context.find(seg_text) >= 0
            # token_offset: where the segment's tokens start in the encoded context
            ids = tok.encode_arrays([context])[0].tolist()
            assert tok.decode(ids[:e["token_offset"]], show_special=False) == context[:e["char_offset"]]
            assert e["depth"] == pytest.approx(e["token_offset"] / n, rel=1e-5)
            depths.append(e["depth"])
        lineage = json.loads(r["lineage"])
        assert lineage["sources"][0] == r["id"].split("#")[0] and len(lineage["sources"]) > 1
    assert min(depths) < 0.25 and max(depths) > 0.75  # spread over the context


def test_batch_api_answers_through_one_batch_and_a_killed_wait_resumes_it(tmp_path):
    with FakeOpenAI(batch_delay=0.3) as fake:
        teacher = _teacher(fake, batch_api=True, batch_poll_s=0.05)
        m = _manifest(tmp_path, f"  - summarize: {{chunk_tokens: 60, teacher: {teacher}}}", per_file=3)
        cli("run", str(m), "-o", str(tmp_path / "clean"), "--no-progress")
        assert fake.batches_created >= 2  # at least one per shard and level
        assert fake.batch_requests == fake.total_requests
        needed, batches = fake.total_requests, fake.batches_created
        assert len(_rows(tmp_path / "clean")) == 6
        # a run killed while it waits for its first batch: the rerun polls that batch, submits no copy
        fake.reset_counters()
        fake.batch_delay = 3.0
        run = tmp_path / "run"
        proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(m), "-o", str(run), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while fake.batches_created < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_batches = fake.batches_created
        assert killed_batches >= 1
        fake.batch_delay = 0.3
        cli("run", str(m), "-o", str(run), "--no-progress")
        assert fake.batches_created == batches  # the interrupted batch was resumed, not sent again
        assert fake.batch_requests == needed
        from tests.test_faults import output_digest

        assert output_digest(run) == output_digest(tmp_path / "clean")


def test_batch_api_failed_lines_leave_the_shard_incomplete_then_a_rerun_sends_them(tmp_path):
    with FakeOpenAI(batch_delay=0.1) as fake:
        first = {}

        def script(n, key, attempt, req):
            first.setdefault("key", key)
            return "status 500" if key == first["key"] and attempt == 0 else "ok"

        fake.script = script
        teacher = _teacher(fake, batch_api=True, batch_poll_s=0.05)
        m = _manifest(tmp_path, f"  - summarize: {{chunk_tokens: 60, teacher: {teacher}}}", per_file=3)
        proc = cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress", check=False,
                   env={"CURATE_FAULTS": ""})
        out = proc.stdout + proc.stderr
        if proc.returncode == 0:  # the executor's own retry of the shard already sent the line again
            assert fake.requests_per_key[first["key"]] >= 2
        else:
            assert "HTTP 500" in out, out
            cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        assert len(_rows(tmp_path / "run")) == 6


def test_an_answer_empty_through_every_retry_counts_as_unusable(tmp_path):
    with FakeOpenAI(script={"*": "empty"}) as fake:
        m = _manifest(tmp_path, _summarize(fake, max_retries=1), per_file=3)
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")  # not a failed shard
        st = _stats(tmp_path / "run", "summarize")
        assert st["drops"] == {"unparsable": 6} and st["rows_out"] == 0
        assert st["metrics"]["retry_empty"]["sum"] == st["metrics"]["requests_sent"]["sum"] == fake.total_requests / 2
        failures = [json.loads(line) for f in (tmp_path / "run" / "failures").glob("*.jsonl")
                    for line in f.read_text().splitlines()]
        assert len(failures) == 6 and all("empty answer" in f["detail"] for f in failures)

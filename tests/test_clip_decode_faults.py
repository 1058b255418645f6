"""clip_score with decoding processes under faults, through ``curate run``: a decoding process killed by
pid while its shard runs costs nothing (the batch is decoded again in a fresh pool), and a worker killed
by pid takes its decoders with it; a plain rerun then writes the bytes of a run that never failed."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import curate_run, write_manifest, write_pair_shards

pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
psutil = pytest.importorskip("psutil")

#: Each shard waits 4 s after its first batch leaves clip_score (its decoders are up by then).
SLOW = [{"point": "stage", "label": "clip_score", "after": 1, "action": "sleep", "seconds": 4}]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Two WebDataset shards of real photos with captions, and a tiny CLIP checkpoint folder."""
    from curate.testing import real_images, save_tiny_clip

    tmp = tmp_path_factory.mktemp("clip-faults")
    photos = real_images(size=160)
    shards = write_pair_shards(tmp / "pairs", photos)
    return shards, save_tiny_clip(tmp / "tiny-clip")


def _manifest(tmp: Path, inputs: tuple[Path, Path], workers: int, executor: str = "") -> Path:
    shards, model = inputs
    return write_manifest(tmp / f"m{workers}.yaml", f"""
        name: clip-faults
        source: {{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved, batch_rows: 3}}
        stages:
          - clip_score: {{model: {model}, batch_size: 2, decode_processes: true, decode_workers: 2}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: {workers}{executor}}}
        """)


def _cli(manifest: Path, out: Path, faults: list | None = None, background: bool = False):
    return curate_run(manifest, out, faults, background)


def _outputs(run: Path) -> dict[str, str]:
    files = sorted((run / "parquet").rglob("*"))
    out = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}
    assert any(k.endswith(".parquet") for k in out) and any(k.endswith("index.json") for k in out), out
    return out


def _spawned(pid: int) -> list[psutil.Process]:
    """Processes started with multiprocessing's spawn under ``pid`` (not its resource tracker)."""
    out = []
    for k in psutil.Process(pid).children(recursive=True):
        try:
            line = " ".join(k.cmdline())
        except psutil.Error:  # gone, or a zombie, since it was listed
            continue
        if "spawn_main" in line and "resource_tracker" not in line:
            out.append(k)
    return out


def _decoders_of(pid: int) -> list[psutil.Process]:
    """The decoding processes directly under ``pid`` (each runs the decoding pool's worker)."""
    return [k for k in _spawned(pid) if _parent(k) == pid]


def _parent(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


def _wait_for(condition, what: str, driver: subprocess.Popen, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, (what, driver.communicate())
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, inputs) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("clip-clean")
    proc = _cli(_manifest(tmp, inputs, 1), tmp / "run")
    assert proc.returncode == 0, proc.stderr
    return _outputs(tmp / "run")


def test_a_decoding_process_killed_mid_shard_costs_nothing(tmp_path, inputs, clean):
    run = tmp_path / "run"
    driver = _cli(_manifest(tmp_path, inputs, 1), run, faults=SLOW, background=True)
    try:
        # one local worker runs in the driver's process: the decoders are its spawned children
        decoders = _wait_for(lambda: len(_decoders_of(driver.pid)) >= 2 and _decoders_of(driver.pid),
                             "decoding processes", driver)
        victim = decoders[0]
        victim.kill()  # SIGKILL by pid, while the shard waits between batches
        victim.wait(10)
        _, stderr = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, stderr
    assert _outputs(run) == clean


def test_a_worker_killed_with_its_decoders_then_a_plain_rerun_gives_the_same_bytes(tmp_path, inputs, clean):
    run = tmp_path / "run"
    manifest = _manifest(tmp_path, inputs, 2, ", task_retries: 0")  # the lost shard is not run again
    driver = _cli(manifest, run, faults=SLOW, background=True)
    try:
        # two spawned workers, each with its own decoders; kill one worker while its shard waits
        def worker_with_decoders():
            for worker in (w for w in _spawned(driver.pid) if _parent(w) == driver.pid):
                decoders = _decoders_of(worker.pid)
                if len(decoders) >= 2:
                    return worker, decoders
            return None

        worker, decoders = _wait_for(worker_with_decoders, "a worker with decoding processes", driver)
        worker.kill()
        _, stderr = driver.communicate(timeout=240)
        gone, alive = psutil.wait_procs(decoders, timeout=20)
        assert not alive, f"decoders outlived their worker: {[p.pid for p in alive]}"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode != 0 and "WorkerLost: its worker process died 1 time(s)" in stderr, stderr
    rerun = _cli(manifest, run)
    assert rerun.returncode == 0, rerun.stderr
    assert _outputs(run) == clean

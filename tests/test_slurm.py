"""The Slurm executor on a real one-node Slurm cluster: same bytes as a local run, resume after a
cancelled array task, dry run, detach, failures reported with their logs, split arrays.

Needs Slurm (``apt-get install slurmctld slurmd slurm-client munge``) and root; otherwise the cluster
tests skip with the reason (see :mod:`tests.slurm_cluster`). Rendering tests run everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, make_text, write_jsonl, write_manifest
from tests.slurm_cluster import slurm  # noqa: F401 - the session fixture

SECRET = "sl-7f3a9c-secret-value"
ENV = {"CURATE_SLURM_TEST_API_KEY": SECRET}
REFERENCES: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Five JSONL input shards (00000 … 00004)."""
    folder = tmp_path_factory.mktemp("slurm-inputs")
    for f in range(5):
        write_jsonl(folder / f"p{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": make_text(f * 40 + i, 15 + (i * 7) % 40)} for i in range(40)])
    return folder


def manifest(path: Path, inputs: Path, executor: str, *, top: bool = True) -> Path:
    """heuristics → select top 50% (a global stage: two phases) or heuristics alone (one phase)."""
    select = "  - select: {top: {column: scores.heuristics.n_words, fraction: 0.5}}" if top else ""
    return write_manifest(path, f"""
        name: slurmtest
        description: "key ${{CURATE_SLURM_TEST_API_KEY}}"
        source: {{kind: jsonl, paths: ["{inputs}/*.jsonl"], id_field: id}}
        stages:
          - heuristics: {{min_words: 1}}
        {select}
        sink: [{{kind: parquet}}, {{kind: jsonl}}]
        executor: {executor}
        """)


def digest(run: Path) -> dict[str, str]:
    """sha256 of every sink file and index.json of a run."""
    return {f"{sink}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for sink in ("parquet", "jsonl") for p in sorted((run / sink).iterdir())}


def reference(tmp_path: Path, inputs: Path, top: bool) -> dict[str, str]:
    """The output digest of the same manifest run by the local executor (computed once per kind)."""
    key = "top" if top else "plain"
    if key not in REFERENCES:
        m = manifest(tmp_path / f"ref-{key}.yaml", inputs, "{kind: local, workers: 1}", top=top)
        cli("run", str(m), "-o", str(tmp_path / f"ref-{key}"), "--no-progress", env=ENV)
        REFERENCES[key] = digest(tmp_path / f"ref-{key}")
    return REFERENCES[key]


def slurm_executor(**extra) -> str:
    items = {"poll_seconds": 0.5, **extra}
    return "{kind: slurm, " + ", ".join(f"{k}: {json.dumps(v)}" for k, v in items.items()) + "}"


def jobs_of(run: Path) -> dict[str, str]:
    """step name → Slurm job id, from the launch record."""
    return {j["step"]: j["job"] for j in json.loads((run / "slurm" / "jobs.json").read_text())["jobs"]}


def squeue(*jobs: str) -> list[list[str]]:
    """``[array job, task, state, reason]`` for every task of ``jobs`` the controller remembers."""
    proc = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs), "-o", "%F|%K|%T|%r"],
                          check=False, capture_output=True, text=True)
    return [line.split("|") for line in proc.stdout.split()]


def times(job: str) -> list[tuple[str, str]]:
    """(start, end) of each task of a job, from ``scontrol show job`` (no accounting here)."""
    text = subprocess.run(["scontrol", "show", "job", job], check=False, capture_output=True,
                          text=True).stdout
    starts = [w.split("=", 1)[1] for w in text.split() if w.startswith("StartTime=")]
    ends = [w.split("=", 1)[1] for w in text.split() if w.startswith("EndTime=")]
    return list(zip(starts, ends, strict=True))


def until(check, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


# ------------------------------------------------------------------------------------- on the cluster

@pytest.mark.usefixtures("slurm")
def test_run_waits_and_writes_the_bytes_of_a_local_run_with_split_arrays(inputs, tmp_path):
    ref = reference(tmp_path, inputs, top=True)
    m, run = manifest(tmp_path / "m.yaml", inputs, slurm_executor(max_array_size=2)), tmp_path / "run"
    proc = cli("run", str(m), "-o", str(run), env=ENV)
    assert "slurm: p0" in proc.stderr and "done" in proc.stdout
    assert digest(run) == ref
    folder = run / "slurm"
    # 5 shards with max_array_size 2: three array jobs per phase (2 + 2 + 1 tasks)
    assert sorted(p.name for p in folder.glob("*.sbatch")) == [
        "combine-p1.sbatch", "finalize.sbatch", "p0-0.sbatch", "p0-1.sbatch", "p0-2.sbatch",
        "p1-0.sbatch", "p1-1.sbatch", "p1-2.sbatch"]
    assert "#SBATCH --array=0-1\n" in (folder / "p0-0.sbatch").read_text()
    assert "#SBATCH --array=0-0\n" in (folder / "p0-2.sbatch").read_text()
    assert (folder / "p0-1.shards").read_text() == "00002\n00003\n"
    script = (folder / "p1-0.sbatch").read_text()
    assert f"run-shard {m} -o {run} --phase 1" in script  # absolute manifest and run directory
    assert all(SECRET not in p.read_text() for p in folder.iterdir())  # reached the jobs by export only
    # every job of a step waited for every job of the step before (afterok on all split arrays)
    jobs = jobs_of(run)
    p0_end = max(end for s in ("p0-0", "p0-1", "p0-2") for _, end in times(jobs[s]))
    combine_start, combine_end = times(jobs["combine-p1"])[0]
    assert combine_start >= p0_end
    assert min(start for s in ("p1-0", "p1-1", "p1-2") for start, _ in times(jobs[s])) >= combine_end
    assert {s[2] for s in squeue(*jobs.values())} == {"COMPLETED"}
    assert (run / "slurm" / f"p0-0-{jobs['p0-0']}_1.out").exists()


@pytest.mark.usefixtures("slurm")
def test_a_cancelled_array_task_fails_the_run_and_a_rerun_gives_the_same_bytes(inputs, tmp_path):
    ref = reference(tmp_path, inputs, top=True)
    m, run = manifest(tmp_path / "m.yaml", inputs, slurm_executor()), tmp_path / "run"
    slow = '[{"point":"stage","label":"heuristics","shard":"00001","after":1,"action":"sleep","seconds":20}]'
    driver = subprocess.Popen([sys.executable, "-m", "curate", "run", str(m), "-o", str(run)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **ENV, "CURATE_FAULTS": slow, "COLUMNS": "200"})
    try:
        job = until(lambda: (run / "slurm" / "jobs.json").exists() and jobs_of(run).get("p0-0"), 60,
                    "the submission")
        until(lambda: ["RUNNING"] == [t[2] for t in squeue(job) if t[1] == "1"]
              and (run / "logs" / "p0-00001.log").exists(), 60, "shard 00001 to start")
        time.sleep(1.0)  # inside the injected 20 s sleep
        subprocess.run(["scancel", f"{job}_1"], check=True)
        _, err = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, err
    assert "1 shard(s) failed" in err and f"job {job}_1 CANCELLED" in err
    assert str(run / "logs" / "p0-00001.log") in err and f"p0-0-{job}_1.out" in err
    assert "may not happen again" in err and "run the same command again" in err
    # the later steps never ran: cancelled, and nothing of phase 1 exists
    assert {t[2] for t in squeue(jobs_of(run)["combine-p1"], jobs_of(run)["finalize"])} == {"CANCELLED"}
    status = json.loads(cli("status", str(run), "--json", env=ENV).stdout)
    assert status["phases"][0]["done"] == ["00000", "00002", "00003", "00004"]
    # the rerun submits only the incomplete shard of phase 0, then the rest
    cli("run", str(m), "-o", str(run), "--no-progress", env=ENV)
    assert (run / "slurm" / "p0-0.shards").read_text() == "00001\n"
    assert digest(run) == ref


@pytest.mark.usefixtures("slurm")
def test_a_failing_shard_is_reported_with_its_logs(inputs, tmp_path):
    m, run = manifest(tmp_path / "m.yaml", inputs, slurm_executor(), top=False), tmp_path / "run"
    fault = '[{"point":"stage","label":"heuristics","shard":"00003","action":"raise"}]'
    proc = cli("run", str(m), "-o", str(run), "--no-progress", check=False,
               env={**ENV, "CURATE_FAULTS": fault})
    assert proc.returncode == 1
    job = jobs_of(run)["p0-0"]
    assert "1 shard(s) failed" in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if "shard 00003 of phase 0" in ln)
    assert f"job {job}_3 FAILED" in line and "in stage heuristics: InjectedFault" in line
    assert str(run / "logs" / "p0-00003.log") in line and str(run / "slurm" / f"p0-0-{job}_3.out") in line
    assert "fix the cause" in proc.stderr and "Traceback" not in proc.stderr
    assert {t[2] for t in squeue(jobs_of(run)["finalize"])} == {"CANCELLED"}
    assert not (run / "stats.json").exists()
    status = json.loads(cli("status", str(run), "--json", env=ENV).stdout)
    assert list(status["phases"][0]["failed"]) == ["00003"]
    cli("run", str(m), "-o", str(run), "--no-progress", env=ENV)  # fixed: only 00003 and finalize run
    assert (run / "slurm" / "p0-0.shards").read_text() == "00003\n"
    assert digest(run) == reference(tmp_path, inputs, top=False)


@pytest.mark.usefixtures("slurm")
def test_dry_run_submits_nothing_and_detach_returns_at_once(inputs, tmp_path):
    m = manifest(tmp_path / "m.yaml", inputs, slurm_executor(shards_per_task=2, array_throttle=2), top=False)
    run = tmp_path / "run"
    dry = cli("run", str(m), "-o", str(run), "--dry-run", env=ENV)
    assert "nothing submitted" in dry.stdout
    folder = run / "slurm"
    assert sorted(p.name for p in folder.iterdir()) == [
        "finalize.sbatch", "p0-0.sbatch", "p0-0.shards", "submit.sh"]
    assert not (folder / "jobs.json").exists()
    queue = subprocess.run(["squeue", "-h", "-o", "%j"], check=False, capture_output=True, text=True).stdout
    assert "slurmtest" not in queue
    assert (folder / "p0-0.shards").read_text() == "00000 00001\n00002 00003\n00004\n"  # shards_per_task: 2
    assert "#SBATCH --array=0-2%2\n" in (folder / "p0-0.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(folder / "submit.sh")], check=False).returncode == 0
    assert "--dependency=afterok:$j0 finalize.sbatch" in (folder / "submit.sh").read_text()

    started = time.monotonic()
    detached = cli("run", str(m), "-o", str(run), "--detach", env=ENV)
    assert time.monotonic() - started < 20
    jobs = jobs_of(run)
    shown = " ".join(detached.stdout.split())
    assert f"curate status {run}" in shown and jobs["p0-0"] in shown
    refused = cli("run", str(m), "-o", str(run), "--no-progress", check=False, env=ENV)
    assert refused.returncode == 1  # by the recorded live jobs, or by a running shard's lock
    assert "still queued or running" in refused.stderr or "being run by another curate" in refused.stderr
    until(lambda: json.loads(cli("status", str(run), "--json", env=ENV).stdout)["finished"], 90,
          "the detached jobs")
    assert digest(run) == reference(tmp_path, inputs, top=False)
    again = cli("run", str(m), "-o", str(run), "--no-progress", env=ENV)  # nothing left: no new jobs
    assert "done" in again.stdout and jobs_of(run) == jobs


@pytest.mark.usefixtures("slurm")
@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is None or
                    importlib.util.find_spec("curate.executors.dask") is None,
                    reason="needs dask_jobqueue and the dask executor (pip install 'curate-longctx[dask]')")
def test_dask_on_the_same_slurm_through_slurmcluster(inputs, tmp_path):
    executor = ('{kind: dask, dashboard: false, cluster: {class: dask_jobqueue.SLURMCluster, queue: debug, '
                'cores: 1, processes: 1, memory: 1GB, walltime: "00:10:00", interface: lo, scale: 2, '
                f'log_directory: "{tmp_path / "dask-logs"}"}}}}')
    m, run = manifest(tmp_path / "m.yaml", inputs, executor), tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress", env=ENV)
    assert digest(run) == reference(tmp_path, inputs, top=True)


# ------------------------------------------------------------------------------------- without a cluster

def test_scripts_render_from_a_custom_template_and_bad_placeholders_are_named(inputs, tmp_path):
    template = tmp_path / "my.sbatch"
    template.write_text("#!/bin/bash\n#SBATCH --array={array}\n#SBATCH --output={output}\n{setup}\n"
                        "for s in $(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {shard_list}); do {run_shard} "
                        "--shard $s; done\n# {step} {stages} {{literal}}\n")
    setup = ["module load python/3.11", "export OMP_NUM_THREADS=1"]
    ex = slurm_executor(template=str(template), setup=setup, partition="cpu", account="proj", time="01:00:00",
                        mem="4G", extra_directives=["--constraint=a100", "#SBATCH --exclusive"],
                        max_array_size=10)
    m, run = manifest(tmp_path / "m.yaml", inputs, ex, top=False), tmp_path / "run with space"
    cli("run", str(m), "-o", str(run), "--dry-run", env=ENV)
    script = (run / "slurm" / "p0-0.sbatch").read_text()
    assert script.startswith("#!/bin/bash\n#SBATCH --array=0-4\n")
    assert f'#SBATCH --output="{run}/slurm/p0-0-%A_%a.out"' in script  # a path with a space is quoted
    assert "module load python/3.11\nexport OMP_NUM_THREADS=1\n" in script
    assert "# p0-0 heuristics {literal}" in script and f"'{run}'" in script
    step = (run / "slurm" / "finalize.sbatch").read_text()
    for line in ("--partition=cpu", "--account=proj", "--time=01:00:00", "--mem=4G", "--constraint=a100"):
        assert f"#SBATCH {line}\n" in step
    assert "#SBATCH --exclusive\n" in step and "--array" not in step

    template.write_text("#SBATCH --array={arary}\n")
    bad = cli("run", str(m), "-o", str(run), "--dry-run", check=False, env=ENV)
    assert bad.returncode == 2 and "KeyError: 'arary'" in bad.stderr and "{array}" in bad.stderr


def test_gres_uses_the_gpu_template_and_the_manifest_must_be_a_file(inputs, tmp_path, monkeypatch):
    m = manifest(tmp_path / "m.yaml", inputs, slurm_executor(gres="gpu:1", max_array_size=3), top=True)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--dry-run", env=ENV)
    script = (run / "slurm" / "p1-0.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1\n" in script and "CUDA_VISIBLE_DEVICES" in script
    assert "--gres" not in (run / "slurm" / "combine-p1.sbatch").read_text()
    assert sorted(p.name for p in (run / "slurm").glob("p0-*.shards")) == ["p0-0.shards", "p0-1.shards"]

    from curate.errors import ConfigError
    from curate.executors.base import LaunchOptions
    from curate.executors.slurm import SlurmExecutor
    from curate.manifest import loads
    from curate.planner import Plan

    monkeypatch.setenv("CURATE_SLURM_TEST_API_KEY", SECRET)
    text = m.read_text().replace("executor:", f"output: {tmp_path / 'r2'}\nexecutor:")
    plan = Plan.build(loads(text))  # a manifest given as text: its path is "<manifest>"
    with pytest.raises(ConfigError, match="needs the manifest as a file"):
        SlurmExecutor(plan.manifest.executor.params).launch(plan, LaunchOptions(dry_run=True), None)


def test_squeue_failures_are_told_apart_from_forgotten_jobs(tmp_path, monkeypatch):
    from curate.executors.slurm import SlurmUnreachable, query

    fake = tmp_path / "bin" / "squeue"
    fake.parent.mkdir()
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    fake.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    fake.chmod(0o755)
    assert query(["41"]) == []  # long finished: the controller forgot it
    fake.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
                    "exit 1\n")
    with pytest.raises(SlurmUnreachable, match="Unable to contact"):
        query(["41"])
    fake.write_text("#!/bin/sh\nprintf '41|0|COMPLETED|None\\n41|1|PENDING|DependencyNeverSatisfied\\n"
                    "7|N/A|RUNNING|None\\n'\n")
    states = query(["41"])
    assert [(t.job, t.task, t.state, t.bad, t.ended) for t in states] == [
        ("41", 0, "COMPLETED", False, True), ("41", 1, "PENDING", True, True)]


def test_a_relaunch_refuses_live_jobs_and_cancels_jobs_that_can_never_run(tmp_path, monkeypatch):
    from rich.console import Console

    from curate.errors import CurateError
    from curate.executors.slurm import check_no_live_jobs

    bin_dir, folder = tmp_path / "bin", tmp_path / "run" / "slurm"
    bin_dir.mkdir()
    folder.mkdir(parents=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (folder / "jobs.json").write_text(json.dumps({"jobs": [{"step": "p0-0", "job": "41"},
                                                           {"step": "finalize", "job": "42"}]}))
    scancel = bin_dir / "scancel"
    scancel.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'cancelled'}\n")
    squeue = bin_dir / "squeue"
    squeue.write_text("#!/bin/sh\nprintf '41|0|COMPLETED|None\\n41|1|FAILED|NonZeroExitCode\\n"
                      "42|N/A|PENDING|DependencyNeverSatisfied\\n'\n")
    for tool in (scancel, squeue):
        tool.chmod(0o755)

    class Plan:  # what check_no_live_jobs reads of a plan
        class run_dir:
            root = tmp_path / "run"

    console = Console(file=io.StringIO(), width=200)
    check_no_live_jobs(Plan, folder, console)  # nothing alive: fine; 42 can never run: cancelled
    assert (tmp_path / "cancelled").read_text() == "42\n"
    assert "cancelled earlier Slurm job(s) 42 that could never run" in console.file.getvalue()
    squeue.write_text("#!/bin/sh\nprintf '41|0|COMPLETED|None\\n41|1|RUNNING|None\\n"
                      "42|N/A|PENDING|Dependency\\n'\n")
    with pytest.raises(CurateError, match=r"job\(s\) 41 42 of an earlier launch are still queued or running"):
        check_no_live_jobs(Plan, folder, console)


def test_status_shows_the_slurm_jobs_of_the_last_submission(tmp_path, monkeypatch):
    """`curate status` asks squeue about RUN/slurm/jobs.json (a detached run's queued jobs)."""
    from curate.manifest import load
    from curate.planner import Plan
    from curate.steps import slurm_jobs

    from tests.conftest import make_text, write_jsonl, write_manifest

    write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": make_text(i)} for i in range(5)])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: st
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"]}}
        sink: {{kind: parquet}}
        executor: {{kind: slurm}}
        """)
    plan = Plan.build(load(m, output=str(tmp_path / "run")))
    assert slurm_jobs(plan) == ([], None)  # never submitted
    folder = tmp_path / "run" / "slurm"
    folder.mkdir(parents=True)
    (folder / "jobs.json").write_text(json.dumps({"jobs": [{"step": "p0-0", "job": "41"},
                                                           {"step": "finalize", "job": "42"}]}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "squeue"
    fake.write_text("#!/bin/sh\nprintf '41|0|RUNNING|None\\n41|1|PENDING|Resources\\n42|N/A|PENDING|Dependency\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs, note = slurm_jobs(plan)
    assert note is None
    assert [(j["step"], j["job"], j["task"], j["state"]) for j in jobs] == [
        ("p0-0", "41", 0, "RUNNING"), ("p0-0", "41", 1, "PENDING"), ("finalize", "42", None, "PENDING")]
    fake.write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2\nexit 1\n")
    jobs, note = slurm_jobs(plan)
    assert jobs == [] and "Unable to contact" in note

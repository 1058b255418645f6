"""Scale-out: the Dask executor with 1 and 2 workers on a CPU-bound job, and what a shard costs each executor.

Three measurements, each ``curate run`` in its own process (start-up included, as a user sees it):

1. **CPU-bound job** — ``minhash_dedup`` with datatrove's shingles (Python-bound: spaCy words and a hash
   per n-gram) over ``--mb`` of generated JSONL in ``--files`` files, with ``kind: dask`` and 1 then 2
   workers (LocalCluster), and the local executor with 2 workers for reference. Reported: wall time
   (median of ``--repeat``), the 2-worker speed-up (goal ≥ 1.7× on 2 cores), and whether every run
   wrote the same output (sha256 of each sink's ``index.json``).
2. **Per-shard overhead** — ``heuristics`` on tiny shards (4 documents each), with 20 and ``--shards``
   shards, under the local executor and under Dask (2 workers each). The cost of one more shard is the
   slope ``(t(N) - t(20)) / (N - 20)``, which leaves out the fixed start-up (CLI, cluster, workers),
   in wall time and in CPU time (driver, scheduler and workers together).
3. **Per-shard overhead under Slurm** — the same manifests with ``executor: {kind: slurm}`` (one array
   task per shard, the default, so every shard is a batch job step running ``curate run-shard`` in a
   fresh process; ``curate run`` submits and waits, polling ``squeue`` every second), each run from an
   empty run directory, at 20 and ``--slurm-shards`` shards. Slurm runs the tasks, so their CPU time is
   not visible here: wall time only. ``slurm_extra_ms_per_shard`` is its slope less the local
   executor's at the same two shard counts (the local executor is measured again at those counts when
   ``--slurm-shards`` differs from ``--shards``). ``--slurm-shards`` defaults to 60, not 200: every
   task starts ``curate run-shard`` in a new Python process (~2.5 s of CPU for a tiny shard on a 2-core
   machine), so a shard costs Slurm seconds, not milliseconds, and 200 would add ~7 minutes; with the
   defaults the whole benchmark stays under ~10 minutes on 2 cores.

   A cluster that answers ``sinfo`` is used as it is (its nodes must see the temporary folder the
   benchmark writes in: point ``TMPDIR`` at a shared filesystem). Otherwise the benchmark starts a
   one-node cluster of its own on this machine with ``tests/slurm_cluster.py`` (needs root and the
   ``slurmctld slurmd slurm-client munge`` packages), for the Slurm runs only, and stops it after them.
   When neither works the report says ``"slurm": "skipped: <reason>"``.

Usage: ``python benchmarks/scaleout.py [--mb 12] [--files 8] [--shards 200] [--slurm-shards 60]
[--repeat 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

EXECUTORS = {
    "dask_1": "{kind: dask, workers: 1, dashboard: false}",
    "dask_2": "{kind: dask, workers: 2, dashboard: false}",
    "local_2": "{kind: local, workers: 2}",
}
#: One array task per shard (the default); poll squeue every second rather than every 5 s, so that the
#: wait after the last job is short next to the per-shard figure.
SLURM = "{kind: slurm, poll_seconds: 1.0}"
ROOT = Path(__file__).resolve().parents[1]


def _split_corpus(folder: Path, mb: float, files: int) -> int:
    """``mb`` of real-paragraph JSONL documents dealt round-robin into ``files`` files; the count."""
    from curate.testing import write_jsonl_corpus

    base = folder / "base.jsonl"
    n = write_jsonl_corpus(base, int(mb * 1_000_000))
    lines = base.read_bytes().splitlines(keepends=True)
    base.unlink()
    data = folder / "data"
    data.mkdir()
    for f in range(files):
        (data / f"part-{f:03d}.jsonl").write_bytes(b"".join(lines[f::files]))
    return n


def _tiny_corpus(folder: Path, shards: int) -> Path:
    """``shards`` files of 4 short documents each (one shard per file)."""
    data = folder / f"tiny-{shards}"
    data.mkdir()
    for f in range(shards):
        rows = [f'{{"id": "t{f}-{i}", "text": "short document {f} {i} with a few words to score"}}\n' for i in range(4)]
        (data / f"t-{f:04d}.jsonl").write_text("".join(rows))
    return data


def _manifest(folder: Path, name: str, data: Path, stage: str, executor: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"""name: scaleout-{name}
source: {{kind: jsonl, paths: ["{data}/*.jsonl"], id_field: id}}
stages:
  - {stage}
sink: {{kind: jsonl}}
executor: {executor}
""")
    return path


def _run(manifest: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``curate run`` from an empty run directory, its process
    start-up included. CPU time sums the driver and every worker (children are reaped before the
    driver exits), which a machine shared with other work disturbs far less than wall time."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "curate", "run", str(manifest), "-o", str(out), "--no-progress"]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True,
                          env={**os.environ, "CURATE_FAULTS": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"curate run {manifest.name} failed ({proc.returncode}): "
                           f"{(proc.stderr.strip() or proc.stdout.strip())[-2000:]}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _median_run(manifest: Path, out: Path, repeat: int) -> tuple[float, float]:
    runs = [_run(manifest, out) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _index_digest(out: Path) -> str:
    return hashlib.sha256((out / "jsonl" / "index.json").read_bytes()).hexdigest()


def cpu_bound(folder: Path, mb: float, files: int, repeat: int) -> dict:
    """Wall and CPU time of the CPU-bound job per executor; the 2-worker Dask speed-up."""
    docs = _split_corpus(folder, mb, files)
    stage = "minhash_dedup: {n_grams: 5, num_buckets: 14, hashes_per_bucket: 8}"
    seconds, cpu, digests = {}, {}, {}
    for name, executor in EXECUTORS.items():
        m = _manifest(folder, f"cpu-{name}", folder / "data", stage, executor)
        out = folder / f"run-cpu-{name}"
        seconds[name], cpu[name] = _median_run(m, out, repeat)
        digests[name] = _index_digest(out)
    return {"documents": docs, "mb": mb, "files": files,
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
            "docs_per_s": {k: round(docs / v) for k, v in seconds.items()},
            "dask_speedup_2_vs_1": round(seconds["dask_1"] / seconds["dask_2"], 3),
            "dask_2_vs_local_2": round(seconds["local_2"] / seconds["dask_2"], 3),
            "same_output": len(set(digests.values())) == 1}


SMALL = 20  # the smaller shard count of every per-shard slope


def _tiny_runs(folder: Path, name: str, executor: str, counts: tuple[int, ...],
               repeat: int) -> tuple[dict[int, float], dict[int, float]]:
    """(wall, CPU) seconds of ``heuristics`` over each count of tiny shards under ``executor``."""
    wall, cpu = {}, {}
    for n in counts:
        data = folder / f"tiny-{n}"
        if not data.exists():
            _tiny_corpus(folder, n)
        m = _manifest(folder, f"tiny-{name}-{n}", data, "heuristics: {}", executor)
        wall[n], cpu[n] = _median_run(m, folder / f"run-tiny-{name}-{n}", repeat)
    return wall, cpu


def _slope_ms(t: dict[int, float], small: int, large: int) -> float:
    return 1000 * (t[large] - t[small]) / (large - small)


def _sinfo() -> tuple[bool, str]:
    """(True, the partitions) when ``sinfo`` reaches a controller, else (False, why not)."""
    if shutil.which("sinfo") is None:
        return False, "sinfo not found"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %D node(s) %T"], check=False, capture_output=True,
                              text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"sinfo: {type(e).__name__}: {e}"
    if proc.returncode != 0 or not proc.stdout.strip():
        return False, "sinfo: " + (proc.stderr.strip().splitlines() or ["no partition"])[-1]
    return True, "; ".join(proc.stdout.strip().splitlines())


@contextlib.contextmanager
def slurm_cluster(folder: Path) -> Iterator[str]:
    """A Slurm cluster for the Slurm runs: yields how it was found (``existing: …`` or ``started …``);
    raises :class:`RuntimeError` with the reason when there is none and none can be started. A cluster
    started here is stopped on leaving (its daemons, by the pids it started)."""
    answers, text = _sinfo()
    if answers:
        yield f"existing: {text}"
        return
    sys.path.insert(0, str(ROOT))
    try:
        from tests import slurm_cluster as fixture
    except ImportError as e:
        raise RuntimeError(f"no Slurm cluster answers, and tests/slurm_cluster.py fails: {e}") from None
    finally:
        sys.path.remove(str(ROOT))
    reason = fixture.missing_reason()
    if reason:
        raise RuntimeError(f"no Slurm cluster answers, and none can start here: {reason}")
    try:
        cluster = fixture.start(folder / "slurm-cluster")
    except (fixture.Unavailable, OSError, subprocess.SubprocessError, LookupError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"no Slurm cluster answers, and a one-node cluster did not start: {first}") \
            from None
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # `curate run` and its jobs find the cluster through it
    try:
        yield f"started for the benchmark: 1 node, {os.cpu_count()} CPUs, on this machine"
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        fixture.stop(cluster)


def per_shard_slurm(folder: Path, shards: int, repeat: int, local: dict[int, float]) -> dict | str:
    """Wall time for 20 and ``shards`` tiny shards under the Slurm executor, against the local executor's
    wall times ``local`` (measured here for counts it lacks); a ``skipped: …``/``failed: …`` string when
    there is no cluster or a run fails."""
    counts = (SMALL, shards)
    missing = tuple(n for n in counts if n not in local)
    if missing:
        local = {**local, **_tiny_runs(folder, "local_2", EXECUTORS["local_2"], missing, repeat)[0]}
    try:
        with slurm_cluster(folder) as how:
            wall, _ = _tiny_runs(folder, "slurm", SLURM, counts, repeat)
    except RuntimeError as e:
        text = str(e)
        return ("skipped: " if text.startswith("no Slurm cluster") else "failed: ") + text
    slurm_ms, local_ms = _slope_ms(wall, *counts), _slope_ms(local, *counts)
    return {"cluster": how, "executor": SLURM, "shards": list(counts),
            "seconds": {str(n): round(wall[n], 2) for n in counts},
            "local_2_seconds": {str(n): round(local[n], 2) for n in counts},
            "ms_per_shard": round(slurm_ms, 1),
            "local_2_ms_per_shard": round(local_ms, 1),
            "slurm_extra_ms_per_shard": round(slurm_ms - local_ms, 1),
            "cpu": "not measured: Slurm's job steps are not children of this process"}


def per_shard(folder: Path, shards: int, repeat: int, slurm_shards: int | None = None) -> dict:
    """Wall and CPU time for 20 and ``shards`` tiny shards per executor; the cost of one more shard. With
    ``slurm_shards``, the Slurm executor's wall time at 20 and that many shards as well."""
    small = SMALL
    wall: dict[str, dict[int, float]] = {}
    cpu: dict[str, dict[int, float]] = {}
    for name in ("local_2", "dask_2"):
        wall[name], cpu[name] = _tiny_runs(folder, name, EXECUTORS[name], (small, shards), repeat)

    def slope(t: dict[str, dict[int, float]]) -> dict[str, float]:
        return {k: _slope_ms(v, small, shards) for k, v in t.items()}

    wall_ms, cpu_ms = slope(wall), slope(cpu)
    slurm = per_shard_slurm(folder, slurm_shards, repeat, wall["local_2"]) if slurm_shards else None
    return {"shards": [small, shards],
            "seconds": {k: {str(n): round(t, 2) for n, t in v.items()} for k, v in wall.items()},
            "cpu_seconds": {k: {str(n): round(t, 2) for n, t in v.items()} for k, v in cpu.items()},
            "ms_per_shard": {k: round(v, 1) for k, v in wall_ms.items()},
            "cpu_ms_per_shard": {k: round(v, 1) for k, v in cpu_ms.items()},
            "dask_extra_ms_per_shard": round(wall_ms["dask_2"] - wall_ms["local_2"], 1),
            "dask_extra_cpu_ms_per_shard": round(cpu_ms["dask_2"] - cpu_ms["local_2"], 1),
            **({"slurm": slurm} if slurm is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=12)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--slurm-shards", type=int, default=60,
                    help="the larger shard count of the Slurm runs (0: leave Slurm out)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)
    if args.shards <= SMALL or (args.slurm_shards and args.slurm_shards <= SMALL):
        ap.error(f"--shards and --slurm-shards must be above {SMALL} (the slope's smaller count)")
    from curate.testing import write_report

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
                  "cpu_bound": cpu_bound(folder, args.mb, args.files, args.repeat),
                  "per_shard": per_shard(folder, args.shards, args.repeat, args.slurm_shards),
                  "load_after": round(os.getloadavg()[0], 2)}
    write_report(report, args.json)


if __name__ == "__main__":
    main()

"""The steps of a run as commands anyone can schedule: shards, combines, finalize, and status.

``curate run`` chains these steps itself. A cluster launcher (the Slurm executor, a Dask driver, your
own scheduler) runs them as separate jobs:

- ``curate run-shard MANIFEST --phase K --shard NAME`` — one shard of one phase;
- ``curate combine MANIFEST --phase K`` — reduce the partials of phase ``K - 1`` for the global stage
  that starts phase ``K`` (once every shard of phase ``K - 1`` is complete);
- ``curate finalize MANIFEST`` — ``stats.json`` and every sink's ``index.json`` (once every shard of
  the last phase is complete);
- ``curate status RUN_DIR`` — per phase, shards done / running / failed / pending, with log paths.

Each step is idempotent (a finished step is a no-op) and resumable, and takes the lock its job needs:
a shard step locks its shard, a combine or finalize step locks the step; both are refused while a local
``curate run`` owns the whole directory (see :mod:`curate.lock`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from curate.errors import ConfigError
from curate.lock import FileLock, describe, shard_lock, stale_reason
from curate.planner import Plan


def claimed(plan: Plan) -> None:
    """Refuse to run a step in a directory not claimed by this manifest (same fingerprint)."""
    rd = plan.run_dir
    if not rd.fingerprint.exists():
        raise ConfigError(f"{rd.root}: not a run directory yet (run `curate run`, `curate prepare` or the launcher first)")
    if orjson.loads(rd.fingerprint.read_bytes())["digest"] != plan.fingerprint()["digest"]:
        raise ConfigError(f"{rd.root}: claimed by a different manifest, package versions or inputs")


def combine_step(plan: Plan, phase: int, notice=None) -> bool:
    """Combine the partials for phase ``phase``'s global stage; False when it was already combined."""
    from curate.driver import _combine, _step, _terminate_as_interrupt

    if not 0 < phase < len(plan.phases):
        raise ConfigError(f"phase {phase} has no global stage to combine (phases 1 to {len(plan.phases) - 1} do)")
    claimed(plan)
    rd = plan.run_dir
    label = plan.stages[plan.phases[phase].start].label
    if (rd.global_dir / label / "state.json").exists():
        return False
    _require_complete(plan, phase - 1, f"combining {label!r}")
    with _terminate_as_interrupt(), shard_lock(rd.root, f"combine-p{phase}", f"curate combine --phase {phase}",
                                               notice=notice):
        _step(f"combine of {label} (before phase {phase + 1})", lambda: _combine(plan, plan.phases[phase]))
    return True


def finalize_step(plan: Plan, notice=None) -> dict[str, Any]:
    """Write ``stats.json`` and the indexes (again: the result is the same bytes); returns the stats."""
    from curate.driver import _finalize, _step, _terminate_as_interrupt

    claimed(plan)
    _require_complete(plan, plan.phases[-1].index, "finalizing")
    with _terminate_as_interrupt(), shard_lock(plan.run_dir.root, "finalize", "curate finalize", notice=notice):
        merged, _ = _step("finalize (stats.json, index.json)", lambda: _finalize(plan))
    return merged


def _require_complete(plan: Plan, phase: int, what: str) -> None:
    rd = plan.run_dir
    pending = [s.name for s in plan.shards if not rd.is_complete(f"p{phase}-{s.name}")]
    if pending:
        more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
        raise ConfigError(f"{what} needs every shard of phase {phase}; not complete: "
                          f"{', '.join(pending[:5])}{more}")


@dataclass
class PhaseStatus:
    index: int
    stages: list[str]
    done: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard → log path
    pending: list[str] = field(default_factory=list)
    combined: bool | None = None  # for a phase that starts with a global stage


def status(plan: Plan) -> list[PhaseStatus]:
    """Where each shard of each phase stands, from the run directory alone.

    done: a completion marker. failed: its log's last word is a failure. running: a live lock on the
    shard, or its log was written to in the last two minutes while the run lock is held. pending:
    everything else (never started, or interrupted without a trace).
    """
    rd = plan.run_dir
    run_holder = FileLock(rd.root / "lock").read()
    run_live = run_holder is not None and stale_reason(run_holder) is None
    out = []
    for phase in plan.phases:
        st = PhaseStatus(phase.index, [s.label for s in plan.stages[phase.start:phase.stop]])
        if phase.global_stage is not None:
            st.combined = (rd.global_dir / plan.stages[phase.start].label / "state.json").exists()
        for shard in plan.shards:
            sid = f"p{phase.index}-{shard.name}"
            log = rd.logs / f"{sid}.log"
            if rd.is_complete(sid):
                st.done.append(shard.name)
            elif _live(rd.root / "locks" / f"{sid}.lock") or (
                    run_live and log.exists() and time.time() - log.stat().st_mtime < 120 and not _failed(log)):
                st.running.append(shard.name)
            elif log.exists() and _failed(log):
                st.failed[shard.name] = str(log)
            else:
                st.pending.append(shard.name)
        out.append(st)
    return out


def holder(plan: Plan) -> str | None:
    """Who holds the run directory now (None when nobody does)."""
    h = FileLock(plan.run_dir.root / "lock").read()
    return describe(h) if h is not None and stale_reason(h) is None else None


def _live(path: Path) -> bool:
    h = FileLock(path).read()
    return h is not None and stale_reason(h) is None


def _failed(log: Path) -> bool:
    """True when the shard log's last entry reports a failure (a rerun that succeeded truncates it)."""
    try:
        tail = log.read_bytes()[-65536:]
    except OSError:
        return False
    last_done = tail.rfind(b": done in ")
    last_fail = tail.rfind(b" failed:")
    return last_fail > last_done


def slurm_jobs(plan: Plan) -> tuple[list[dict[str, Any]], str | None]:
    """The jobs of the run's last Slurm submission (``RUN/slurm/jobs.json``) as ``squeue`` sees them now:
    one dict per job or array task (step, job, task, state, reason), and a note when ``squeue`` could
    not answer. Empty for runs that were never submitted to Slurm, and for jobs Slurm has forgotten."""
    folder = plan.run_dir.root / "slurm"
    if not (folder / "jobs.json").exists():
        return [], None
    from curate.executors.slurm import query, recorded_jobs

    steps = {j["job"]: j["step"] for j in orjson.loads((folder / "jobs.json").read_bytes()).get("jobs", [])}
    try:
        states = query(recorded_jobs(folder))
    except Exception as e:  # noqa: BLE001 - no squeue here, or the controller is down: say so, show the rest
        return [], f"squeue could not answer: {e}"
    return [{"step": steps.get(t.job), "job": t.job, "task": t.task, "state": t.state, "reason": t.reason}
            for t in states], None

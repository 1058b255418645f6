"""The driver: claim the run directory, run each phase through the executor, commit the output.

Order of commits: per shard, output files → completion marker (in ``run_shard``); per phase, the
next global stage's combined state; at the end, ``stats.json`` then each sink's ``index.json``.
A rerun skips shards with a marker, so a killed run resumes where it stopped and writes the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from curate import stats as stats_mod
from curate.errors import CurateError
from curate.manifest import Manifest
from curate.planner import Phase, Plan
from curate.context import RunContext
from curate.plugins import kinds_of
from curate.readers.base import Shard
from curate.rundir import AtomicFile
from curate.sinks.base import write_index


class RunFailed(CurateError):
    """Some shards failed; the others are complete and a rerun retries only the failed ones."""


@dataclass
class RunResult:
    run_dir: str
    stats: dict[str, Any]
    indexes: dict[str, dict[str, Any]]
    resumed: bool
    skipped: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)


def execute(manifest: Manifest, *, restart: bool = False, console: Console | None = None,
            show_progress: bool = True) -> RunResult:
    """Run ``manifest`` to completion (or resume it); raise :class:`RunFailed` if shards fail."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    plan = Plan.build(manifest)
    rd = plan.run_dir
    resumed = rd.check_fingerprint(plan.fingerprint(), restart)
    rd.write_atomic(rd.manifest, manifest.resolved_yaml().encode())
    executor = kinds_of("executor")[manifest.executor.kind](manifest.executor.params)
    if manifest.tokenizer is not None:
        _prepare_tokenizer(plan, console)
    skipped = 0
    for phase in plan.phases:
        if phase.global_stage is not None:
            _combine(plan, phase)
        pending = [s for s in plan.shards if not rd.is_complete(f"p{phase.index}-{s.name}")]
        skipped += len(plan.shards) - len(pending)
        failed = _run_phase(plan, phase, pending, executor, console, show_progress)
        if failed:
            names = ", ".join(f"{s} (logs/p{phase.index}-{s}.log)" for s in failed[:10])
            raise RunFailed(f"{len(failed)} shard(s) failed in phase {phase.index}: {names}; "
                            f"the rest are complete, run again to retry")
    merged, indexes = _finalize(plan)
    return RunResult(str(rd.root), merged, indexes, resumed, skipped, time.perf_counter() - started)


def _run_phase(plan: Plan, phase: Phase, shards: list[Shard], executor, console, show_progress) -> list[str]:
    failed: list[str] = []
    if not shards:
        return failed
    labels = [s.label for s in plan.stages[phase.start:phase.stop]]
    title = f"phase {phase.index}" + (f" [{' → '.join(labels)}]" if labels else " [read]")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
               TextColumn("{task.fields[rows]:,} samples · {task.fields[rate]:,.0f}/s{task.fields[tok]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
        task = progress.add_task(title, total=len(shards), rows=0, rate=0.0, tok="")
        t0 = time.perf_counter()
        totals = {"rows": 0, "tokens": 0}

        def on_progress(rows: int, tokens: int) -> None:
            totals["rows"] += rows
            totals["tokens"] += tokens
            dt = max(time.perf_counter() - t0, 1e-9)
            tok = f" · {totals['tokens'] / dt:,.0f} tok/s" if totals["tokens"] else ""
            progress.update(task, rows=totals["rows"], rate=totals["rows"] / dt, tok=tok)

        def on_done(shard: Shard, stats: dict | None, error: BaseException | None) -> None:
            if error is not None:
                failed.append(shard.name)
                console.print(f"[red]shard {shard.name} failed:[/red] {type(error).__name__}: {error}")
            progress.advance(task)

        executor.map_shards(plan, phase, shards, on_done, on_progress)
    return failed


def _prepare_tokenizer(plan: Plan, console: Console) -> None:
    """Resolve the run tokenizer once into RUN/tokenizer/ (training it on the source if asked)."""
    from curate import tokenizer as tk

    spec = plan.manifest.tokenizer

    def training_texts():
        limit = spec.train.max_docs
        count = 0
        for shard in plan.shards:
            ctx = _SampleContext(plan.manifest.seed, shard, plan.run_dir)
            for batch in plan.reader.read(shard, ctx):
                for text in batch.column("text").to_pylist():
                    yield text
                    count += 1
                    if count >= limit:
                        return

    if spec.train and not (plan.run_dir.root / "tokenizer" / "specials.json").exists():
        console.print(f"training a {spec.train.vocab_size}-token BPE on the source …")
    tk.prepare(spec, plan.run_dir.root / "tokenizer", plan.special_tokens(), training_texts)
    _release_memory()  # the driver holds no tokenizer; give its pages back before workers start


def _release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return
    trim(0)


class _SampleContext(RunContext):
    """A context for reading the source outside a phase: bad records are left to phase 0 to count."""

    def failure(self, reason, detail="", *, file=None, line=None, record=None) -> None:
        return None


def _combine(plan: Plan, phase: Phase) -> None:
    """Reduce the previous phase's partials into the global stage's state (once)."""
    stage = plan.stages[phase.global_stage]
    rd = plan.run_dir
    folder = rd.global_dir / stage.label
    state_path = folder / "state.json"
    if state_path.exists():
        return
    partials = []
    for shard in plan.shards:
        path = folder / f"p{phase.index - 1}-{shard.name}.arrow"
        if path.exists():
            with pa.memory_map(str(path)) as src:
                partials.append(pa.ipc.open_file(src).read_all())
    state = stage.combine(partials, plan.manifest.seed)
    tables = state.pop("_tables", {})
    for name, table in tables.items():  # large results go beside the JSON, as Arrow files
        f = AtomicFile(folder / f"{name}.arrow")
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        f.commit()
    state["tables"] = sorted(tables)
    rd.write_json(state_path, state)


def _finalize(plan: Plan) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    rd = plan.run_dir
    last = plan.phases[-1].index
    shard_stats = [orjson.loads(p.read_bytes()) for p in sorted(rd.stats.glob("*.json"))]
    order = ["read"] + [s.label for s in plan.stages] + [f"sink:{s.directory.name}" for s in plan.sinks]
    merged = {"name": plan.manifest.name, "shards": len(plan.shards),
              "stages": stats_mod.merge(shard_stats, order)}
    specials = rd.root / "tokenizer" / "specials.json"
    if specials.exists():
        meta = orjson.loads(specials.read_bytes())
        merged["tokenizer"] = {"vocab_size": meta["vocab_size"], "vocab_sha256": meta["vocab_sha256"],
                               "special_tokens": meta["ids"]}
    completions = [rd.read_completion(f"p{last}-{s.name}") for s in plan.shards]
    columns = next((c["outputs"].get("columns") for c in completions if c["outputs"].get("columns")), None)
    entries = {s.label: sorted((f for c in completions for f in c["outputs"]["sinks"].get(s.label, [])),
                               key=lambda f: f["name"]) for s in plan.sinks}
    reports = {}
    for stage in plan.stages:  # global stages' reports (dedup clusters, top-fraction cut-offs)
        path = rd.global_dir / stage.label / "state.json"
        if stage.is_global and path.exists():
            reports[stage.label] = orjson.loads(path.read_bytes())
    if reports:
        merged["global"] = reports
    merged["outputs"] = {s.label: {"path": str(s.directory), "files": len(entries[s.label]),
                                   "samples": sum(f["samples"] for f in entries[s.label]),
                                   "bytes": sum(f["bytes"] for f in entries[s.label])} for s in plan.sinks}
    rd.write_json(rd.stats_json, merged)
    indexes = {s.label: write_index(s, entries[s.label], columns or []) for s in plan.sinks}
    if rd.phases.exists():
        shutil.rmtree(rd.phases)
    return merged, indexes

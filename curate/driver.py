"""The driver: claim the run directory, run each phase through the executor, commit the output.

Order of commits: per shard, output files → completion marker (in ``run_shard``); per phase, the
next global stage's combined state; at the end, ``stats.json`` then each sink's ``index.json``.
A rerun skips shards with a marker, so a killed run resumes where it stopped and writes the same
bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
from rich.console import Console
from rich.markup import escape

from curate import faults
from curate import stats as stats_mod
from curate.context import RunContext
from curate.errors import ConfigError, CurateError, Interrupted, RetryableError
from curate.executors.base import Launcher, LaunchOptions, LaunchResult
from curate.lock import refuse_if_steps_running, run_lock
from curate.manifest import Manifest
from curate.planner import Phase, Plan
from curate.plugins import kinds_of
from curate.progress import PhaseProgress
from curate.readers.base import Shard
from curate.rundir import AtomicFile
from curate.secrets import redact, redact_obj
from curate.sinks.base import write_index

log = logging.getLogger("curate")


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
    launch: LaunchResult | None = None  # set when a cluster launcher ran the jobs


def execute(manifest: Manifest, *, restart: bool = False, console: Console | None = None,
            show_progress: bool = True, command: str = "curate run", wait: bool = True,
            dry_run: bool = False) -> RunResult:
    """Run ``manifest`` to completion (or resume it); raise :class:`RunFailed` if shards fail.

    The run directory is locked for the whole run (:mod:`curate.lock`): a second run on it is refused
    with the holder named. SIGTERM stops the run as Ctrl-C does: workers are stopped, finished shards
    are kept, and :class:`Interrupted` says how to resume.
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    plan = Plan.build(manifest)
    rd = plan.run_dir
    rd.check_claimable(restart)
    executor_cls = kinds_of("executor")[manifest.executor.kind]
    launcher = issubclass(executor_cls, Launcher)
    if (dry_run or not wait) and not launcher:
        raise CurateError(f"--dry-run and --detach need a cluster executor (this manifest's is {manifest.executor.kind!r})")
    lock = run_lock(rd.root, command, notice=lambda m: console.print(f"[yellow]note[/yellow]: {escape(m)}"),
                    mode="launcher" if launcher else "exclusive")
    lock.acquire()
    log_handler = None
    executor = None
    interrupted = False
    try:
        refuse_if_steps_running(rd.root)
        with _terminate_as_interrupt():
            resumed = claim(plan, restart, console)
            log_handler = _run_log(rd)
            log.info("%s: %s %s (%d input shard(s), %d phase(s))", command, "resume" if resumed else "start",
                     manifest.name, len(plan.shards), len(plan.phases))
            executor = executor_cls(manifest.executor.params)
            if hasattr(executor, "console"):
                executor.console = console
            if launcher:
                return _launch(plan, executor, LaunchOptions(wait, dry_run, show_progress, command), console,
                               resumed, started)
            skipped = 0
            for phase in plan.phases:
                if phase.global_stage is not None:
                    label = plan.stages[phase.global_stage].label
                    _step(f"combine of {label} (before phase {phase.index + 1})", lambda: _combine(plan, phase))
                pending = [s for s in plan.shards if not rd.is_complete(f"p{phase.index}-{s.name}")]
                skipped += len(plan.shards) - len(pending)
                failed = _run_phase(plan, phase, pending, executor, console, show_progress)
                if failed:
                    raise RunFailed(_failure_message(plan, phase, failed))
            merged, indexes = _step("finalize (stats.json, index.json)", lambda: _finalize(plan))
            _summarize_failures(plan, console)
            log.info("done in %.1fs", time.perf_counter() - started)
            return RunResult(str(rd.root), merged, indexes, resumed, skipped, time.perf_counter() - started)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted")
        raise Interrupted(f"interrupted; finished shards are kept in {rd.root}. Run the same command again "
                          "to resume where it stopped") from None
    finally:
        if executor is not None and hasattr(executor, "close"):
            try:
                executor.close(interrupted)
            except Exception:  # noqa: BLE001 - closing a cluster must not hide the run's own error
                log.warning("closing the %s executor failed", manifest.executor.kind, exc_info=True)
        if log_handler is not None:
            logging.getLogger("curate").removeHandler(log_handler)
            log_handler.close()
        lock.release()


def _launch(plan: Plan, executor, options: LaunchOptions, console: Console, resumed: bool,
            started: float) -> RunResult:
    """Hand the run to a cluster launcher; finalize here when it waited for every job."""
    rd = plan.run_dir
    done = launched = executor.launch(plan, options, console)
    log.info("%s: %d script(s), %d job(s) %s", executor.kind, len(done.scripts), len(done.jobs),
             "written (dry run)" if options.dry_run else "submitted")
    if not (options.wait and launched.complete):
        return RunResult(str(rd.root), {}, {}, resumed, 0, time.perf_counter() - started, launch=launched)
    merged, indexes = _step("finalize (stats.json, index.json)", lambda: _finalize(plan))
    _summarize_failures(plan, console)
    return RunResult(str(rd.root), merged, indexes, resumed, 0, time.perf_counter() - started, launch=launched)


def claim(plan: Plan, restart: bool, console: Console) -> bool:
    """Make the run directory this plan's (fingerprint, resolved manifest, run tokenizer); True when it
    resumes an earlier claim. The caller holds the run lock."""
    rd = plan.run_dir
    resumed = rd.check_fingerprint(plan.fingerprint(), restart)
    rd.write_atomic(rd.manifest, plan.manifest.resolved_yaml().encode())
    if plan.manifest.tokenizer is not None:
        _prepare_tokenizer(plan, console)
    return resumed


def prepare(manifest: Manifest, *, restart: bool = False, console: Console | None = None) -> Plan:
    """Claim the run directory without running anything, for launchers that schedule the steps."""
    console = console or Console(stderr=True)
    plan = Plan.build(manifest)
    plan.run_dir.check_claimable(restart)
    with run_lock(plan.run_dir.root, "curate prepare", notice=lambda m: console.print(f"note: {escape(m)}")):
        refuse_if_steps_running(plan.run_dir.root)
        claim(plan, restart, console)
    return plan


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt in the main thread, so both stop the run the same way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: OSErrors that may not happen again on a rerun: a full disk or quota, a file-size limit, an I/O
#: error, a stale or timed-out network mount, an interrupted call.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
                     errno.EAGAIN, errno.EINTR, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH}


def transient(error: BaseException) -> bool:
    """True when a rerun may succeed without changing anything (see ``_TRANSIENT_ERRNOS``)."""
    if isinstance(error, (MemoryError, RetryableError)):
        return True
    if isinstance(error, OSError):
        return error.errno in _TRANSIENT_ERRNOS or "No space left" in str(error) or "File too large" in str(error)
    cause = error.__cause__ or error.__context__
    return cause is not None and cause is not error and transient(cause)


def _step(what: str, fn):
    """Run a driver step (a combine, the final stats and indexes); a failure becomes :class:`RunFailed`
    naming the step, its log and whether a rerun can help — never a bare traceback."""
    try:
        return fn()
    except CurateError:
        raise
    except Exception as e:  # noqa: BLE001 - reported below with its type, message and log
        log.exception("%s failed", what)
        advice = ("this may be transient: run the same command again to retry (finished shards are kept)"
                  if transient(e) else "this will happen again on a rerun: see logs/run.log")
        raise RunFailed(f"{what} failed: {type(e).__name__}: {redact(str(e))}\n{advice}") from e


def _failure_message(plan: Plan, phase: Phase, failed: list[tuple[Shard, BaseException]]) -> str:
    """One line per failed shard: its input file, the stage that raised, the error and the log path;
    then whether a plain rerun can help."""
    lines = [f"{len(failed)} shard(s) failed in phase {phase.index} (the other shards are complete):"]
    for shard, error in failed[:10]:
        stage = getattr(error, "curate_stage", None) or "?"
        lines.append(f"  shard {shard.name} ({redact(shard.uri)}) in stage {stage}: "
                     f"{type(error).__name__}: {redact(str(error))}  [logs/p{phase.index}-{shard.name}.log]")
    if len(failed) > 10:
        lines.append(f"  … and {len(failed) - 10} more (see logs/)")
    if all(transient(e) for _, e in failed):
        lines.append("these errors may be transient (I/O, memory, a service): run the same command again "
                     "to retry only the failed shards")
    else:
        lines.append("these errors will happen again on a rerun: fix the input or the manifest first "
                     "(a rerun then retries only the failed shards)")
    return "\n".join(lines)


def _run_phase(plan: Plan, phase: Phase, shards: list[Shard], executor, console,
               show_progress) -> list[tuple[Shard, BaseException]]:
    failed: list[tuple[Shard, BaseException]] = []
    if not shards:
        return failed
    labels = [s.label for s in plan.stages[phase.start:phase.stop]]
    title = (f"phase {phase.index + 1}/{len(plan.phases)}"
             + (f" [{' → '.join(labels)}]" if labels else " [read]"))
    with PhaseProgress(console, title, len(shards), show_progress) as progress:

        def on_done(shard: Shard, stats: dict | None, error: BaseException | None) -> None:
            if error is not None:
                failed.append((shard, error))
                stage = getattr(error, "curate_stage", None) or "?"
                console.print(f"[red]shard {escape(shard.name)} failed[/red] ({escape(redact(shard.uri))}, "
                              f"stage {escape(stage)}): {type(error).__name__}: {escape(redact(str(error)))}",
                              highlight=False)
                log.error("shard %s failed in stage %s: %s: %s", shard.name, stage, type(error).__name__, error)
            progress.shard_done()

        executor.map_shards(plan, phase, shards, on_done, progress.rows)
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
                for text in _training_texts(batch):
                    yield text
                    count += 1
                    if count >= limit:
                        return

    if spec.train and not (plan.run_dir.root / "tokenizer" / "specials.json").exists():
        console.print(f"training a {spec.train.vocab_size}-token BPE on the source …")
    tk.prepare(spec, plan.run_dir.root / "tokenizer", plan.special_tokens(), training_texts)
    _release_memory()  # the driver holds no tokenizer; give its pages back before workers start


def _training_texts(batch) -> list[str]:
    """The text of each row a tokenizer can be trained on: ``text``, the texts of an interleaved row,
    or the contents of a chat row's ``messages``."""
    names = batch.schema.names
    if "text" in names:
        return [t for t in batch.column("text").to_pylist() if t]
    if "texts" in names:
        return ["\n".join(t for t in row if t) for row in batch.column("texts").to_pylist() if row]
    if "messages" in names:
        return ["\n".join(m["content"] or "" for m in row if m) for row in batch.column("messages").to_pylist()
                if row]
    raise ConfigError(f"tokenizer.train: the source's rows have no text to train on (columns: {names}); "
                      "give tokenizer.path instead")


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

    def failure(self, reason, detail="", **where) -> None:
        return None


def _combine(plan: Plan, phase: Phase) -> None:
    """Reduce the previous phase's partials into the global stage's state (once)."""
    stage = plan.stages[phase.global_stage]
    rd = plan.run_dir
    folder = rd.global_dir / stage.label
    state_path = folder / "state.json"
    if state_path.exists():
        return
    partials, names = [], []
    for shard in plan.shards:
        path = folder / f"p{phase.index - 1}-{shard.name}.arrow"
        if path.exists():
            with pa.memory_map(str(path)) as src:
                partials.append(pa.ipc.open_file(src).read_all())
            names.append(shard.name)
    if hasattr(stage, "spill_dir"):  # dedup spills its band hashes beside the run, not in /tmp
        shutil.rmtree(folder / "spill", ignore_errors=True)  # what a killed combine left
        stage.spill_dir = str(folder / "spill")
    t0 = time.perf_counter()
    state = stage.combine(partials, plan.manifest.seed)
    faults.check("combine", phase=phase.index, label=stage.label)
    tables = state.pop("_tables", {})
    for name, table in tables.items():  # large results go beside the JSON, as Arrow files
        f = AtomicFile(folder / f"{name}.arrow")
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        f.commit()
    state["tables"] = sorted(tables)
    state["_partials"] = names  # whose partial each one was, in the order ``combine`` saw them
    # the combine time counts as the stage's own (stats/ is merged into stats.json at the end)
    rd.write_json(rd.stats / f"combine-{phase.index}.json", {stage.label: stats_mod.StageStats(seconds=time.perf_counter() - t0).to_dict()})
    rd.write_json(state_path, state)
    log.info("combined %d partial(s) of %s in %.2fs", len(partials), stage.label, time.perf_counter() - t0)


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
            state = orjson.loads(path.read_bytes())  # without the workers' indexes (one entry per shard)
            reports[stage.label] = {k: v for k, v in state.items() if not k.startswith("_")}
    if reports:
        merged["global"] = reports
    from curate.runner import duplicate_ids

    merged["duplicate_ids"] = duplicate_ids(rd)
    merged["outputs"] = {s.label: {"path": str(s.directory), "files": len(entries[s.label]),
                                   "samples": sum(f["samples"] for f in entries[s.label]),
                                   "bytes": sum(f["bytes"] for f in entries[s.label])} for s in plan.sinks}
    faults.check("stats")
    rd.write_json(rd.stats_json, redact_obj(merged))
    indexes = {}
    for s in plan.sinks:
        faults.check("index", label=s.label)
        indexes[s.label] = write_index(s, entries[s.label], columns or [])
    if rd.phases.exists():
        shutil.rmtree(rd.phases)
    return merged, indexes


def _run_log(rd) -> logging.Handler:
    """``logs/run.log``: the driver's own log (phases, combines, failed shards), appended across reruns."""
    from curate.runner import log_handler

    rd.logs.mkdir(parents=True, exist_ok=True)
    return log_handler(rd.logs / "run.log")


def _summarize_failures(plan: Plan, console: Console) -> None:
    """Print the bad input records of the run by reason, and every truncated or unreadable file."""
    from collections import Counter

    reasons: Counter[str] = Counter()
    damaged: list[dict[str, Any]] = []
    for path in sorted(plan.run_dir.failures.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            entry = orjson.loads(line)
            reasons[entry["reason"]] += 1
            if entry["reason"] in ("truncated_input", "unreadable_file"):
                damaged.append(entry)
    dup = orjson.loads(plan.run_dir.stats_json.read_bytes()).get("duplicate_ids", {})
    if dup.get("rows"):
        console.print(f"[yellow]warning[/yellow]: {dup['rows']:,} input row(s) repeat an earlier row's id "
                      f"({dup['ids']:,} id(s) repeat); dedup stages need unique ids — set source.id_field "
                      "to a unique field, or leave it unset for file:line ids", highlight=False)
    if not reasons:
        return
    summary = ", ".join(f"{r}: {n:,}" for r, n in reasons.most_common())
    console.print(f"[yellow]{sum(reasons.values()):,} bad input record(s)[/yellow] ({escape(summary)}) "
                  f"→ {escape(str(plan.run_dir.failures))}/", highlight=False)
    for entry in damaged[:20]:
        where = f" at byte {entry['offset']:,}" if entry.get("offset") is not None else ""
        lost = f", {entry['lost']} record(s) lost" if entry.get("lost") is not None else ""
        console.print(f"  [yellow]{entry['reason']}[/yellow]: {escape(redact(str(entry['file'])))}{where}{lost}"
                      f"{' — ' + escape(redact(entry['detail'])) if entry.get('detail') else ''}", highlight=False)
    if len(damaged) > 20:
        console.print(f"  … and {len(damaged) - 20} more damaged file(s)")

"""The ``curate`` command: validate, plan, run, run-shard, combine, finalize, status, stages, inspect, stats."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curate.errors import ConfigError, CurateError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Synthesize and curate long-context training corpora from one YAML manifest.")
out = Console()
err = Console(stderr=True)

ManifestArg = typer.Argument(..., exists=False, help="path to the manifest YAML")
OutputOpt = typer.Option(None, "--output", "-o", help="run directory (overrides the manifest's `output`)")


def _load(manifest: Path, output: Optional[str] = None, workers: Optional[int] = None):
    from curate.manifest import load

    m = load(manifest, output=output)
    if workers is not None:
        if m.executor.kind != "local":
            raise ConfigError("--workers applies to the local executor only")
        if workers < 1:
            raise ConfigError(f"--workers {workers}: must be at least 1")
        params = m.executor.params.model_copy(update={"workers": workers})
        m.executor = dataclasses.replace(m.executor, params=params)
    return m


@app.command()
def validate(manifest: Path = ManifestArg) -> None:
    """Check a manifest: every key, type and stage, and that the source has input."""
    from curate.planner import Plan

    plan = Plan.build(_load(manifest))
    out.print(f"[green]ok[/green] {escape(str(manifest))}: {len(plan.shards)} input shard(s), "
              f"{len(plan.stages)} stage(s), {len(plan.phases)} phase(s)")


@app.command()
def plan(manifest: Path = ManifestArg, output: Optional[str] = OutputOpt) -> None:
    """Show the resolved manifest, the phases and the column flow."""
    from rich.syntax import Syntax

    from curate.planner import Plan

    p = Plan.build(_load(manifest, output))
    out.print(Syntax(p.manifest.resolved_yaml(), "yaml", theme="ansi_dark"))
    out.print(f"[bold]input[/bold]: {len(p.shards)} shard(s) from source kind {p.manifest.source.kind!r}")
    for phase in p.phases:
        labels = [s.label + (" (global)" if s.is_global else "") for s in p.stages[phase.start:phase.stop]]
        where = "sinks" if phase.last else f"intermediate → phase {phase.index + 1}"
        out.print(f"[bold]phase {phase.index}[/bold]: {escape(' → '.join(labels) or '(read only)')} → {where}")
    table = Table("after", "columns", title="column flow")
    for label, columns in p.column_flow():
        table.add_row(escape(label), escape(", ".join(columns)))
    out.print(table)
    out.print(f"[bold]run directory[/bold]: {escape(str(p.run_dir.root))}  "
              f"fingerprint {p.fingerprint()['digest'][:16]}")


@app.command()
def run(
    manifest: Path = ManifestArg,
    output: Optional[str] = OutputOpt,
    restart: bool = typer.Option(False, "--restart", help="empty the run directory and start over"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="local worker processes"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
    wait: bool = typer.Option(True, "--wait/--detach", help="cluster executors: follow the jobs, or return once submitted"),
    dry_run: bool = typer.Option(False, "--dry-run", help="cluster executors: write the job scripts, submit nothing"),
) -> None:
    """Run a manifest; a rerun resumes, skipping completed shards."""
    from curate.allocator import tune_allocator
    from curate.driver import execute

    tune_allocator()  # this process may run the shards itself (one local worker): see curate.allocator

    command = " ".join(["curate", "run", str(manifest)] + (["-o", output] if output else []))
    result = execute(_load(manifest, output, workers), restart=restart, console=err, show_progress=progress,
                     command=command, wait=wait, dry_run=dry_run)
    if result.launch is not None and not result.stats:
        out.print(escape(result.launch.message or f"submitted {len(result.launch.jobs)} job(s); "
                         f"follow with: curate status {result.run_dir}"))
        return
    _print_stats(result.stats)
    note = (f" (resumed: {result.skipped} shard-phase(s) already done)"
            if result.resumed and result.launch is None else "")
    out.print(f"[green]done[/green] in {result.seconds:.1f}s → {escape(str(result.run_dir))}{note}")


@app.command()
def prepare(
    manifest: Path = ManifestArg,
    output: Optional[str] = OutputOpt,
    restart: bool = typer.Option(False, "--restart", help="empty the run directory and start over"),
) -> None:
    """Claim a run directory (fingerprint, resolved manifest, tokenizer) and list the steps to schedule."""
    from curate.driver import prepare as prepare_run

    p = prepare_run(_load(manifest, output), restart=restart, console=err)
    rd, m = p.run_dir, str(manifest)
    o = f" -o {rd.root}"
    out.print(escape(f"prepared {rd.root}: {len(p.shards)} shard(s), {len(p.phases)} phase(s). Steps, in order:"))
    for phase in p.phases:
        if phase.global_stage is not None:
            out.print(escape(f"  curate combine {m}{o} --phase {phase.index}"))
        out.print(escape(f"  curate run-shard {m}{o} --phase {phase.index} --shard NAME   "
                         f"# NAME in {p.shards[0].name} … {p.shards[-1].name}"))
    out.print(escape(f"  curate finalize {m}{o}"))


@app.command("run-shard")
def run_shard_cmd(
    manifest: Path = ManifestArg,
    phase: int = typer.Option(..., help="phase index"),
    shard: str = typer.Option(..., help="shard name (as in completions/)"),
    output: Optional[str] = OutputOpt,
) -> None:
    """Run one shard of one phase in a run directory that `curate run` (or a launcher) claimed."""
    from curate.allocator import tune_allocator
    from curate.lock import shard_lock
    from curate.planner import Plan
    from curate.runner import run_shard_retrying
    from curate.steps import claimed

    tune_allocator()
    p = Plan.build(_load(manifest, output))
    rd = p.run_dir
    claimed(p)
    target = next((s for s in p.shards if s.name == shard), None)
    if target is None:
        raise ConfigError(f"no shard named {shard!r} (there are {len(p.shards)})")
    if not 0 <= phase < len(p.phases):
        raise ConfigError(f"no phase {phase} (this manifest has {len(p.phases)}: 0 to {len(p.phases) - 1})")
    from curate.driver import _terminate_as_interrupt

    # SIGTERM (scancel, a job's time limit) unwinds like Ctrl-C, so the shard lock is released at once
    with _terminate_as_interrupt(), shard_lock(rd.root, f"p{phase}-{shard}",
                                               f"curate run-shard --phase {phase} --shard {shard}", notice=_notice):
        if rd.is_complete(f"p{phase}-{shard}"):
            out.print(escape(f"shard {shard} of phase {phase} is already complete"))
            return
        if phase > 0 and not rd.global_dir.joinpath(p.stages[p.phases[phase].start].label, "state.json").exists():
            raise ConfigError(f"phase {phase} needs the combined state of "
                              f"{p.stages[p.phases[phase].start].label!r}: run `curate combine --phase {phase}` first")
        executor = p.manifest.executor.params
        try:
            run_shard_retrying(p, p.phases[phase], target, retries=getattr(executor, "retries", 2),
                               backoff=getattr(executor, "retry_backoff", 2.0))
        except CurateError:
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the shard, stage and log, as `curate run` does
            from curate.driver import RunFailed, _failure_message

            raise RunFailed(_failure_message(p, p.phases[phase], [(target, e)])) from e
    out.print(escape(f"shard {shard} of phase {phase}: done"))


@app.command()
def combine(
    manifest: Path = ManifestArg,
    phase: int = typer.Option(..., help="the phase whose global stage to combine (1 … phases-1)"),
    output: Optional[str] = OutputOpt,
) -> None:
    """Combine a global stage's partials once every shard of the phase before it is complete."""
    from curate.planner import Plan
    from curate.steps import combine_step

    p = Plan.build(_load(manifest, output))
    done = combine_step(p, phase, notice=_notice)
    out.print(f"phase {phase}: {'combined' if done else 'already combined'}")


@app.command()
def finalize(manifest: Path = ManifestArg, output: Optional[str] = OutputOpt) -> None:
    """Write stats.json and every sink's index.json once every shard of the last phase is complete."""
    from curate.planner import Plan
    from curate.steps import finalize_step

    merged = finalize_step(Plan.build(_load(manifest, output)), notice=_notice)
    _print_stats(merged)


@app.command()
def status(
    run_dir: Path = typer.Argument(..., help="a run directory"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Per phase: shards done, running, failed (with log paths) and pending, from the run directory."""
    from curate.manifest import load
    from curate.planner import Plan
    from curate.steps import holder, slurm_jobs
    from curate.steps import status as phase_status

    resolved = run_dir / "manifest.resolved.yaml"
    if not resolved.is_file():
        raise ConfigError(f"{run_dir}: not a curate run directory (no manifest.resolved.yaml)")
    m = load(resolved, output=str(run_dir))
    plan = Plan.build(m)
    phases = phase_status(plan)
    finished = (run_dir / "stats.json").exists() and all(
        (plan.sinks[i].directory / "index.json").exists() for i in range(len(plan.sinks)))
    jobs, jobs_note = slurm_jobs(plan)
    if as_json:
        sys.stdout.write(orjson.dumps({"holder": holder(plan), "finished": finished, "phases": [
            dataclasses.asdict(ph) for ph in phases], "slurm_jobs": jobs, "slurm_note": jobs_note},
            option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table("phase", "stages", "done", "running", "failed", "pending", title=escape(f"status of {run_dir}"))
    for ph in phases:
        stages_text = " → ".join(ph.stages) or "(read)"
        if ph.combined is not None:
            stages_text += "" if ph.combined else "  (not combined yet)"
        table.add_row(str(ph.index), escape(stages_text), str(len(ph.done)), str(len(ph.running)),
                      str(len(ph.failed)), str(len(ph.pending)))
    out.print(table)
    for ph in phases:
        for shard, log in list(ph.failed.items())[:20]:
            out.print(f"[red]failed[/red] phase {ph.index} shard {shard}: {escape(log)}")
    if jobs or jobs_note:
        from collections import Counter

        counts = Counter(j["state"].lower() for j in jobs)
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none known to squeue"
        out.print(f"slurm jobs of the last submission: {escape(summary)}"
                  + (f" ({escape(jobs_note)})" if jobs_note else ""))
        for j in jobs:
            if j["state"] == "PENDING" and j["reason"] not in ("None", "Priority", "Resources", "Dependency"):
                out.print(f"  job {j['job']}{'_' + str(j['task']) if j['task'] is not None else ''} "
                          f"({escape(str(j['step']))}): pending, {escape(j['reason'])}")
    who = holder(plan)
    alive = any(j["state"] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for j in jobs)
    out.print(f"held by {escape(who)}" if who else ("finished" if finished else
                                                      "queued on Slurm" if alive else "not running"))


def _notice(message: str) -> None:
    err.print(f"[yellow]note[/yellow]: {escape(message)}", highlight=False, soft_wrap=True)


@app.command()
def stages(markdown: bool = typer.Option(False, "--markdown", help="print the manifest reference as Markdown")) -> None:
    """List every stage, source, sink and executor with its parameters and defaults."""
    from curate.reference import reference_markdown, reference_rows

    if markdown:
        sys.stdout.write(reference_markdown())
        return
    for section, rows in reference_rows().items():
        table = Table("name", "parameters (default)", "about", title=section, show_lines=True)
        for name, params, about in rows:
            table.add_row(name, "\n".join(f"{k} = {v}" for k, v in params), about)
        out.print(table)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="a run directory, a sink folder or one output file"),
    n: int = typer.Option(3, "-n", help="how many samples"),
    offset: int = typer.Option(0, help="skip this many samples first"),
    width: int = typer.Option(1200, help="characters of text to show per sample"),
    html: Optional[Path] = typer.Option(None, "--html", help="write the samples to this HTML page instead, "
                                     "images inline (interleaved, needle and long multimodal samples)"),
) -> None:
    """Print samples from an output, whatever its format (or render them to an HTML page)."""
    from curate.inspect_output import show, write_html

    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    try:
        if html is not None:
            shown = write_html(path, n, offset, html)
            out.print(f"{shown} samples → {escape(str(html))}")
        elif show(path, n, offset, width, out) == 0:
            out.print("[yellow]no samples[/yellow]")
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{path}: a damaged or half-written JSON file (index.json or stats.json): {e}") from None
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="the HTML file to write (default RUN/report.html)"),
    png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="folder for the plots as PNG files "
                                           "(default RUN/report/)"),
    samples: int = typer.Option(3, "--samples", help="how many output samples to render"),
) -> None:
    """Write one self-contained HTML report of a finished run: outputs, token lengths, score
    distributions with thresholds, drops, time per stage and a few samples."""
    from curate.report import write_report

    result = write_report(run_dir, html_path=out_path, png_dir=png_dir, samples=samples)
    out.print(f"report → {escape(str(result['html']))} ({len(result['pngs'])} plot(s) in "
              f"{escape(str(png_dir or run_dir / 'report'))})", highlight=False)


@app.command()
def stats(run_dir: Path = typer.Argument(..., help="a run directory")) -> None:
    """Print a run's merged stats.json."""
    path = run_dir / "stats.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no stats.json (the run has not finished)")
    try:
        merged = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{path}: damaged or half-written ({e}); run the same `curate run` again to "
                          "write it anew") from None
    if not isinstance(merged, dict) or not isinstance(merged.get("stages"), dict):
        raise ConfigError(f"{path}: not a curate stats file (no `stages` mapping)")
    _print_stats(merged)


@app.command()
def compact(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    sink: Optional[str] = typer.Option(None, "--sink", help="only this sink (its folder name or kind)"),
    target_bytes: Optional[str] = typer.Option(None, "--target-bytes",
                                               help="close a file before this size (default 500MB; WebDataset 1GB)"),
    target_samples: Optional[int] = typer.Option(None, "--target-samples", help="at most this many samples per file"),
) -> None:
    """Rewrite a finished output into Hub-sized files under RUN/compacted/ (the original is kept)."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    from curate.compact import compact as compact_run

    size = None
    if target_bytes is not None:
        try:
            size = int(TypeAdapter(ByteSize).validate_python(target_bytes))
        except ValidationError:
            raise ConfigError(f"--target-bytes {target_bytes!r}: not a size (e.g. 500MB, 1GB, 200000000)") from None
    for r in compact_run(run_dir, sink=sink, target_bytes=size, target_samples=target_samples, notice=_notice):
        what = "already compacted" if r.skipped else "compacted"
        out.print(f"{escape(r.label)}: {what}: {r.files_in} file(s) → {r.files_out} file(s), {r.samples:,} samples, "
                  f"{r.bytes:,} bytes → {escape(str(r.directory))}")


@app.command()
def publish(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    repo: str = typer.Option(..., "--repo", help="the Hub dataset to publish to, namespace/name"),
    private: bool = typer.Option(False, "--private", help="create the repository as private"),
    revision: Optional[str] = typer.Option(None, "--revision", help="branch to upload to (created if missing)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="build the repository folder only; upload nothing"),
    folder: Optional[Path] = typer.Option(None, "--folder", help="where to build it (default RUN/publish/<org>__<name>)"),
    compacted: bool = typer.Option(True, "--compacted/--original",
                                   help="use `curate compact`'s files when a compaction of this output is complete"),
    report: bool = typer.Option(True, "--report/--no-report", help="add report.html and the plots to the card"),
    sink: Optional[str] = typer.Option(None, "--sink", help="the sink to publish (folder name or kind; default: "
                                       "the first Parquet sink); one repository holds one file format"),
) -> None:
    """Lay out a finished run as a Hub dataset (card, configs, data files) and upload it."""
    from curate.publish import publish as publish_run

    r = publish_run(run_dir, repo, private=private, revision=revision, dry_run=dry_run, folder=folder,
                    use_compacted=compacted, with_report=report, sink=sink, notice=_notice)
    for name, rows in r.configs.items():
        out.print(f"config {escape(name)}: {rows:,} rows")
    for note in r.notes:
        _notice(note)
    if r.uploaded is None:
        out.print(f"built {escape(str(r.folder))} ({len(r.files)} data file(s)); nothing uploaded (--dry-run)")
    else:
        out.print(f"uploaded {escape(str(r.folder))} → {escape(str(r.uploaded.get('url', repo)))}")


def _print_stats(merged: dict) -> None:
    table = Table("stage", "rows in", "rows out", "dropped (reason: n)", "tokens", "seconds", title="stats")
    table.columns[3].overflow = "fold"
    for label, s in merged["stages"].items():
        drops = "\n".join(f"{k}: {v:,}" for k, v in s["drops"].items())
        table.add_row(escape(label), f"{s['rows_in']:,}", f"{s['rows_out']:,}", escape(drops), f"{s['tokens_out']:,}",
                      f"{s['seconds']:.2f}")
    out.print(table)
    for label, o in merged.get("outputs", {}).items():
        out.print(escape(f"{label}: {o['samples']:,} samples in {o['files']} file(s), {o['bytes']:,} bytes → "
                         f"{o['path']}"))


def main() -> None:
    from curate.errors import Interrupted
    from curate.quick_exit import skip_exit_collection
    from curate.secrets import redact

    skip_exit_collection()
    try:
        app()
    except ConfigError as e:
        err.print(f"[red]configuration error[/red]\n{escape(redact(str(e)))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Interrupted as e:
        err.print(f"[yellow]{escape(redact(str(e)))}[/yellow]", highlight=False, soft_wrap=True)
        sys.exit(130)
    except CurateError as e:
        err.print(f"[red]error[/red]: {escape(redact(str(e)))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except OSError as e:  # the run directory's disk, permissions or mount failed outside a shard
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        err.print(f"[red]error[/red]: {escape(redact(f'{e.strerror or e}{where}'))}; finished work is kept, "
                  "run the same command again once the cause is fixed", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - never a bare traceback (it could carry secrets); CURATE_DEBUG shows it
        if os.environ.get("CURATE_DEBUG"):
            raise
        err.print(f"[red]error[/red]: {type(e).__name__}: {escape(redact(str(e)))}\n"
                  "(this is a bug in curate or a plugin; set CURATE_DEBUG=1 to see the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()

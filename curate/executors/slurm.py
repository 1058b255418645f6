"""``executor: {kind: slurm, ...}``: the whole run as Slurm batch jobs chained by ``afterok``.

``curate run`` claims the run directory, then :meth:`SlurmExecutor.launch` writes into ``RUN/slurm/``

- ``p<k>-<c>.sbatch`` + ``p<k>-<c>.shards``: an array job over phase ``k``'s *incomplete* shards.
  Line ``i + 1`` of the ``.shards`` file lists the shards of array task ``i`` (``shards_per_task``
  consecutive names, sorted), and the task runs ``curate run-shard`` for each. A phase with more tasks
  than ``max_array_size`` is split into several array jobs ``c = 0, 1, …``;
- ``combine-p<k>.sbatch``: ``curate combine --phase k``, before each phase that starts with a global
  stage whose state is not combined yet;
- ``finalize.sbatch``: ``curate finalize`` (``stats.json``, every ``index.json``);
- ``submit.sh``: the same submissions by hand (``--dry-run`` writes everything and submits nothing);
- ``jobs.json``: the job ids of the last submission; a relaunch refuses while any of them is alive.

Each step depends on every job of the step before (``--dependency=afterok:<id>:<id>…``), so a failed
array task means the later jobs never run: :func:`follow` (``--wait``, the default) sees the task's
state, cancels the jobs that can no longer run, waits for the failed step's other tasks, and raises
:class:`~curate.driver.RunFailed` naming each failed shard with its log and Slurm's ``.out`` file. The
run directory is the truth: a step is finished when its completion markers, ``state.json`` or
``index.json`` files exist, whatever ``squeue`` still remembers. A rerun submits only what is missing.

Scripts come from the templates in ``curate/jobs/`` (shipped with the package; ``jobs/`` in a source
checkout links there), or ``template``/``step_template``, rendered with :meth:`str.format`; see
``jobs/README.md`` for the placeholders. Jobs get the submitting environment
through Slurm's default ``--export=ALL``: secrets and ``${VAR}`` values are never written into a script.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from pydantic import Field, field_validator

from curate.errors import ConfigError, CurateError
from curate.executors.base import ExecutorParams, Launcher, LaunchOptions, LaunchResult
from curate.planner import Plan
from curate.plugins import register_executor

log = logging.getLogger("curate")

#: The default templates ship inside the package (``curate/jobs/``; ``jobs/`` at the top of a source
#: checkout is a link to it), so they are found from an installed wheel too.
JOBS_DIR = Path(__file__).resolve().parents[1] / "jobs"
TEMPLATES = {"cpu": "slurm-cpu.sbatch", "gpu": "slurm-gpu.sbatch", "step": "slurm-step.sbatch"}
FALLBACK_MAX_ARRAY_SIZE = 1001

#: Job states after which a job (or array task) runs no more.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
         "OUT_OF_MEMORY", "REVOKED"}
#: States that mean the job did not do its work (and jobs that depend on it never will).
BAD = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "NODE_FAIL"}
NEVER = "DependencyNeverSatisfied"
#: States after which a plain rerun may succeed (Slurm or a person stopped the job; curate did not fail).
RERUN_MAY_HELP = {"CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class SlurmParams(ExecutorParams):
    """Parameters of ``executor: {kind: slurm}``; ``null`` leaves a directive to the cluster's default."""

    partition: str | None = Field(None, description="--partition of every job")
    account: str | None = Field(None, description="--account of every job")
    qos: str | None = Field(None, description="--qos of every job")
    time: str | None = Field(None, description="--time limit of every job, e.g. 04:00:00 or 1-00:00:00")
    cpus_per_task: int | None = Field(None, gt=0, description="--cpus-per-task of every job")
    mem: str | None = Field(None, description="--mem of every job, e.g. 16G")
    gres: str | None = Field(None, description="--gres of the shard jobs, e.g. gpu:1 (uses the GPU template)")
    array_throttle: int | None = Field(None, gt=0, description="most tasks of an array running at once (%N)")
    max_array_size: int | None = Field(None, gt=0, description="most tasks per array job (null: MaxArraySize "
                                       "from `scontrol show config`, else 1001)")
    extra_directives: list[str] = Field([], description="more #SBATCH lines, e.g. '--constraint=a100'")
    setup: list[str] | None = Field(None, description="shell lines run before curate in every job "
                                    "(module loads, venv); null: activate this interpreter's venv, if any")
    template: str | None = Field(None, description="sbatch template of the shard array jobs (null: jobs/)")
    step_template: str | None = Field(None, description="sbatch template of the combine and finalize jobs")
    python: str | None = Field(None, description="interpreter the jobs run curate with (null: this one)")
    shards_per_task: int = Field(1, gt=0, description="shards each array task runs, one after another")
    poll_seconds: float = Field(5.0, gt=0, description="seconds between squeue polls while following")

    @field_validator("partition", "account", "qos", "time", "mem", "gres", "extra_directives", "python")
    @classmethod
    def _one_line(cls, value):
        for item in value if isinstance(value, list) else [value]:
            if item is not None and ("\n" in item or "\r" in item):
                raise ValueError("must be one line")
        return value


@dataclass
class Step:
    """One job to submit: an array over shards of a phase, a combine, or the finalize."""

    name: str  # p<k>-<c>, combine-p<k>, finalize
    kind: str  # shards | combine | finalize
    level: int  # jobs of level L depend on every job of level L - 1
    phase: int | None = None
    tasks: list[list[str]] = field(default_factory=list)  # shard names of each array task
    job: str | None = None  # Slurm job id once submitted

    def script(self, folder: Path) -> Path:
        return folder / f"{self.name}.sbatch"

    def shard_list(self, folder: Path) -> Path:
        return folder / f"{self.name}.shards"

    def output(self, folder: Path) -> str:
        """Slurm's own log as an ``--output`` pattern: Slurm fills in ``%A_%a`` (array) or ``%j``; a
        ``%`` in the folder is doubled."""
        pattern = f"{self.name}-%A_%a.out" if self.kind == "shards" else f"{self.name}-%j.out"
        return str(folder).replace("%", "%%") + "/" + pattern

    def out_file(self, folder: Path, task: int | None) -> Path:
        """The ``.out`` file Slurm wrote for this step's job (and array task)."""
        if self.kind == "shards":
            return folder / f"{self.name}-{self.job}_{task}.out"
        return folder / f"{self.name}-{self.job}.out"


@dataclass
class TaskState:
    """One line of ``squeue``: a job, or one task of an array job."""

    job: str  # the array's job id (%F), or the job's id
    task: int | None  # array task id (%K); None for a plain job
    state: str
    reason: str

    @property
    def bad(self) -> bool:
        return self.state in BAD or (self.state == "PENDING" and self.reason == NEVER)

    @property
    def ended(self) -> bool:
        return self.state in ENDED or self.bad


@register_executor("slurm")
class SlurmExecutor(Launcher):
    """The whole run as Slurm batch jobs: an array job per phase over its incomplete shards, a combine job
    before each global stage, a finalize job, chained by afterok (see docs/cluster.md)."""

    Params = SlurmParams

    def launch(self, plan: Plan, options: LaunchOptions, console) -> LaunchResult:
        """Write the scripts of every incomplete step, submit them chained by ``afterok`` (unless
        ``options.dry_run``), and with ``options.wait`` follow them until the finalize job ends."""
        folder = run_root(plan) / "slurm"
        manifest_file(plan)  # the jobs read it: refuse a manifest that is not a file, before anything
        if not options.dry_run:
            check_no_live_jobs(plan, folder, console)
        steps = build_steps(plan, self.params, self._max_array_size())
        if not steps:  # complete: nothing to submit (a waiting `curate run` still prints the stats)
            return LaunchResult(complete=not options.dry_run, message=f"{run_root(plan)} is already complete")
        scripts = write_scripts(plan, self.params, steps, folder)
        if options.dry_run:
            return LaunchResult(scripts=scripts, message=dry_run_message(folder, scripts))
        submit(steps, folder)
        jobs = [s.job for s in steps]
        say(console, f"slurm: submitted {len(jobs)} job(s) ({', '.join(jobs)}); scripts and .out files "
                     f"in {folder}")
        if not options.wait:
            return LaunchResult(scripts, jobs, message=detached_message(plan, jobs))
        follow(plan, steps, folder, console, self.params.poll_seconds, options.show_progress)
        return LaunchResult(scripts, jobs, complete=True, message="all Slurm jobs finished")

    def _max_array_size(self) -> int:
        if self.params.max_array_size is not None:
            return self.params.max_array_size
        return cluster_max_array_size()


# ---------------------------------------------------------------------------------------- the steps

def run_root(plan: Plan) -> Path:
    """The run directory as an absolute path (what every job is given with ``-o``)."""
    return Path(os.path.abspath(plan.run_dir.root))


def manifest_file(plan: Plan) -> Path:
    """The original manifest file, absolute; the jobs rebuild the plan from it."""
    path = Path(os.path.abspath(plan.manifest.path))
    if not path.is_file():
        raise ConfigError(f"the slurm executor needs the manifest as a file its jobs can read; "
                          f"{plan.manifest.path!r} is not one")
    return path


def finished(plan: Plan) -> bool:
    """True when ``stats.json`` and every sink's ``index.json`` exist (the run is complete)."""
    return plan.run_dir.stats_json.exists() and all((s.directory / "index.json").exists() for s in plan.sinks)


def build_steps(plan: Plan, params: SlurmParams, max_array_size: int) -> list[Step]:
    """The steps still to do, in dependency levels; empty when the run is complete."""
    if finished(plan):
        return []
    rd, steps, level = plan.run_dir, [], 0
    for phase in plan.phases:
        if phase.global_stage is not None:
            label = plan.stages[phase.global_stage].label
            if not (rd.global_dir / label / "state.json").exists():
                steps.append(Step(f"combine-p{phase.index}", "combine", level, phase.index))
                level += 1
        pending = [s.name for s in plan.shards if not rd.is_complete(f"p{phase.index}-{s.name}")]
        tasks = chunks(pending, params.shards_per_task)
        for c, part in enumerate(chunks(tasks, max_array_size)):
            steps.append(Step(f"p{phase.index}-{c}", "shards", level, phase.index, part))
        level += 1 if tasks else 0
    steps.append(Step("finalize", "finalize", level))
    return steps


def chunks(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def dependencies(steps: list[Step], step: Step) -> list[str]:
    """Job ids of every step one level below ``step``."""
    return [s.job for s in steps if s.level == step.level - 1 and s.job]


# ---------------------------------------------------------------------------------------- rendering

def write_scripts(plan: Plan, params: SlurmParams, steps: list[Step], folder: Path) -> list[str]:
    """Render every step's script (and shard list) into ``folder`` plus ``submit.sh``; return the
    script paths. Scripts and lists of an earlier launch are removed first (``.out`` files stay)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.sbatch"), *folder.glob("*.shards"), folder / "submit.sh"]:
        old.unlink(missing_ok=True)
    values = common_values(plan, params)
    scripts = []
    for step in steps:
        if step.kind == "shards":
            step.shard_list(folder).write_text("".join(" ".join(t) + "\n" for t in step.tasks))
        path = step.script(folder)
        path.write_text(render(template_path(params, step), step_values(plan, params, step, folder, values)))
        path.chmod(0o755)
        scripts.append(str(path))
    submit_sh = folder / "submit.sh"
    submit_sh.write_text(submit_script(steps, folder))
    submit_sh.chmod(0o755)
    return scripts


def template_path(params: SlurmParams, step: Step) -> Path:
    """The template of a step: the user's, else the packaged ``jobs/`` one (GPU when ``gres`` is set)."""
    if step.kind == "shards":
        chosen = params.template or JOBS_DIR / TEMPLATES["gpu" if params.gres else "cpu"]
    else:
        chosen = params.step_template or JOBS_DIR / TEMPLATES["step"]
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise ConfigError(f"Slurm template {path} not found (the defaults ship in curate/jobs/; "
                          "set executor.template / step_template to your own)")
    return path


def render(template: Path, values: dict[str, str]) -> str:
    """``template`` filled in with :meth:`str.format`; a bad placeholder is a :class:`ConfigError`."""
    try:
        return template.read_text().format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"Slurm template {template}: {type(e).__name__}: {e} (placeholders: "
                          f"{', '.join('{' + k + '}' for k in sorted(values))}; write literal braces as "
                          "{{ and }})") from None


def common_values(plan: Plan, params: SlurmParams) -> dict[str, str]:
    """Placeholders shared by every job of the run."""
    python = params.python or sys.executable
    return {"python": shlex.quote(python), "manifest": shlex.quote(str(manifest_file(plan))),
            "run_dir": shlex.quote(str(run_root(plan))), "chdir": directive_path(Path.cwd()),
            "name": plan.manifest.name, "setup": "\n".join(setup_lines(params)),
            "directives": "\n".join(directive_lines(params)), "gres": params.gres or ""}


def step_values(plan: Plan, params: SlurmParams, step: Step, folder: Path, common: dict) -> dict[str, str]:
    """Placeholders of one step's script (``run_shard``, ``array`` and ``shard_list``: shard jobs only)."""
    curate = f"{common['python']} -m curate"
    where = f"{common['manifest']} -o {common['run_dir']}"
    values = {**common, "job_name": job_name(plan, step), "output": directive_path(step.output(folder)),
              "phase": "" if step.phase is None else str(step.phase), "step": step.name,
              "stages": stages_text(plan, step.phase), "array": "", "shard_list": "", "run_shard": ""}
    if step.kind == "shards":
        throttle = f"%{params.array_throttle}" if params.array_throttle else ""
        values.update(array=f"0-{len(step.tasks) - 1}{throttle}",
                      shard_list=shlex.quote(str(step.shard_list(folder))),
                      run_shard=f"{curate} run-shard {where} --phase {step.phase}")
    values["command"] = {"shards": values["run_shard"],
                         "combine": f"{curate} combine {where} --phase {step.phase}",
                         "finalize": f"{curate} finalize {where}"}[step.kind]
    return values


def stages_text(plan: Plan, phase: int | None) -> str:
    if phase is None:
        return "stats.json and index.json"
    p = plan.phases[phase]
    return " -> ".join(s.label for s in plan.stages[p.start:p.stop]) or "read"


def job_name(plan: Plan, step: Step) -> str:
    """``curate-<manifest name>-<step>``, without characters a directive line cannot hold."""
    name = f"curate-{plan.manifest.name}-{step.name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def directive_path(path: Path | str) -> str:
    """A path as a ``#SBATCH`` value: double-quoted when it has spaces (sbatch reads the quotes)."""
    text = str(path)
    if any(c in text for c in '"\n\r'):
        raise ConfigError(f"{text!r}: a path for a Slurm directive cannot hold a quote or a line break")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def directive_lines(params: SlurmParams) -> list[str]:
    """``#SBATCH`` lines from the parameters (not ``gres``, which only the GPU template uses)."""
    pairs = [("partition", params.partition), ("account", params.account), ("qos", params.qos),
             ("time", params.time), ("cpus-per-task", params.cpus_per_task), ("mem", params.mem)]
    lines = [f"#SBATCH --{k}={v}" for k, v in pairs if v is not None]
    for extra in params.extra_directives:
        extra = extra.strip()
        lines.append(extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}")
    return lines


def setup_lines(params: SlurmParams) -> list[str]:
    """The user's ``setup``, or the activation of this interpreter's virtual environment (if any)."""
    if params.setup is not None:
        return list(params.setup)
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.exists():
        return [f". {shlex.quote(str(activate))}"]
    return []


def submit_script(steps: list[Step], folder: Path) -> str:
    """``submit.sh``: the ``sbatch`` calls ``curate run`` makes, for submitting by hand."""
    lines = ["#!/bin/bash",
             "# Submits this run's jobs as `curate run` (executor kind slurm) does, and prints their ids.",
             "# Written for the steps incomplete at the time; `curate run --dry-run` writes it afresh.",
             "set -euo pipefail", f"cd {shlex.quote(str(folder))}"]
    var: dict[str, str] = {}
    for i, step in enumerate(steps):
        deps = [var[s.name] for s in steps if s.level == step.level - 1]
        dep = f" --dependency=afterok:{':'.join('$' + d for d in deps)}" if deps else ""
        var[step.name] = f"j{i}"
        script = shlex.quote(step.script(folder).name)
        lines.append(f"j{i}=$(sbatch --parsable{dep} {script}); j{i}=${{j{i}%%;*}}")
    lines.append("echo " + " ".join(f"${var[s.name]}" for s in steps))
    return "\n".join(lines) + "\n"


def dry_run_message(folder: Path, scripts: list[str]) -> str:
    return (f"wrote {len(scripts)} Slurm script(s) to {folder} (dry run: nothing submitted); "
            f"submit them with: bash {folder / 'submit.sh'}")


def detached_message(plan: Plan, jobs: list[str]) -> str:
    return (f"submitted {len(jobs)} Slurm job(s): {' '.join(jobs)}; follow with: curate status "
            f"{run_root(plan)} (or squeue -j {','.join(jobs)}); cancel with: scancel {' '.join(jobs)}")


# ---------------------------------------------------------------------------------------- Slurm calls

class SlurmUnreachable(CurateError):
    """A Slurm command failed for a reason other than unknown job ids (controller down, a timeout)."""


def slurm(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Slurm client command; a missing binary, a timeout or (with ``check``) a failure raises."""
    if shutil.which(argv[0]) is None:
        raise CurateError(f"{argv[0]} not found: the slurm executor needs the Slurm client commands on "
                          "PATH (use --dry-run to only write the scripts)")
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachable(f"{argv[0]} did not answer within 120 s") from None
    if check and proc.returncode != 0:
        raise SlurmUnreachable(f"{' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def cluster_max_array_size() -> int:
    """``MaxArraySize`` from ``scontrol show config``, or 1001 (Slurm's default) when unknown."""
    try:
        text = slurm("scontrol", "show", "config").stdout
    except (CurateError, OSError, subprocess.SubprocessError):
        return FALLBACK_MAX_ARRAY_SIZE
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return max(1, int(value.strip()))
    return FALLBACK_MAX_ARRAY_SIZE


def submit(steps: list[Step], folder: Path) -> None:
    """``sbatch`` every step in order, each ``afterok`` on the level below; record ``jobs.json``.

    A failed submission cancels the jobs this call already submitted, then raises."""
    try:
        for step in steps:
            argv = ["sbatch", "--parsable"]
            deps = dependencies(steps, step)
            if deps:
                argv.append("--dependency=afterok:" + ":".join(deps))
            argv.append(str(step.script(folder)))
            step.job = slurm(*argv).stdout.strip().split(";")[0]
            log.info("slurm: submitted %s as job %s%s", step.name, step.job,
                     f" (afterok:{':'.join(deps)})" if deps else "")
            record_jobs(steps, folder)
    except BaseException:
        cancel([s.job for s in steps if s.job])
        raise


def record_jobs(steps: list[Step], folder: Path) -> None:
    data = {"submitted": time.time(), "jobs": [{"step": s.name, "job": s.job} for s in steps if s.job]}
    tmp = folder / ".tmp-jobs.json"
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    os.replace(tmp, folder / "jobs.json")


def recorded_jobs(folder: Path) -> list[str]:
    """Job ids of the last submission (empty when there was none)."""
    try:
        return [j["job"] for j in orjson.loads((folder / "jobs.json").read_bytes())["jobs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def query(jobs: list[str]) -> list[TaskState]:
    """The state of every task of ``jobs`` that the controller still remembers (``squeue -t all``);
    raises :class:`SlurmUnreachable` when squeue fails for another reason than unknown ids."""
    if not jobs:
        return []
    proc = slurm("squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs), "-o", "%F|%K|%T|%r", check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every id long finished and forgotten
            return []
        raise SlurmUnreachable(f"squeue failed ({proc.returncode}): {proc.stderr.strip()}")
    states = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0] in jobs:
            task = int(parts[1]) if parts[1].isdigit() else None
            states.append(TaskState(parts[0], task, parts[2], parts[3]))
    return states


def cancel(jobs: list[str]) -> None:
    """``scancel`` these jobs (whole arrays); a missing ``scancel`` or unknown id is not an error."""
    jobs = [j for j in jobs if j]
    if jobs and shutil.which("scancel"):
        subprocess.run(["scancel", *jobs], check=False, capture_output=True, timeout=120)
        log.info("slurm: cancelled job(s) %s", " ".join(jobs))


def check_no_live_jobs(plan: Plan, folder: Path, console) -> None:
    """Refuse to submit while jobs of an earlier launch may still run; cancel those that never will."""
    earlier = recorded_jobs(folder)
    if not earlier:
        return
    states = query(earlier)
    never = sorted({t.job for t in states if t.state == "PENDING" and t.reason == NEVER})
    if never:
        cancel(never)
        say(console, f"note: cancelled earlier Slurm job(s) {' '.join(never)} that could never run "
                     "(a job they depended on failed)")
    live = sorted({t.job for t in states if not t.ended})
    if live:
        raise CurateError(f"{run_root(plan)}: Slurm job(s) {' '.join(live)} of an earlier launch are still "
                          f"queued or running; follow them with `curate status {run_root(plan)}`, or cancel "
                          f"them (scancel {' '.join(live)}) and run again")


# ---------------------------------------------------------------------------------------- following

def say(console, text: str) -> None:
    """Print one plain line (no markup, never wrapped, so logs keep whole lines)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def follow(plan: Plan, steps: list[Step], folder: Path, console, poll: float, show_progress: bool) -> None:
    """Poll ``squeue`` and the run directory until every job ended; raise RunFailed if a step failed.

    On the first bad task, jobs of later levels (which can never run) are cancelled at once; the failed
    level's other tasks finish. A failing ``squeue`` (controller restarting) is waited out with a note.
    Ctrl-C or SIGTERM cancels every job of this launch."""
    jobs = [s.job for s in steps]
    reporter = Reporter(plan, console, show_progress)
    cut: int | None = None
    try:
        while True:
            states = reporter.poll(jobs)
            if states is not None:
                reporter.update(states)
                bad = [t for t in states if t.bad]
                if bad and cut is None:
                    cut = min(step_of(steps, t).level for t in bad)
                    cancel([s.job for s in steps if s.level > cut])
                    reporter.failure_seen([t for t in bad if step_of(steps, t).level == cut])
                if all(t.ended for t in states):
                    break
            time.sleep(poll)
    except BaseException:
        cancel(jobs)
        say(console, f"slurm: cancelled job(s) {' '.join(jobs)}; finished shards are kept")
        raise
    failures = settled_failures(plan, steps, states, cut)
    if failures:
        from curate.driver import RunFailed

        raise RunFailed(failure_message(plan, failures, folder))


def settled_failures(plan: Plan, steps: list[Step], states: list[TaskState], cut: int | None,
                     wait: float = 60.0) -> list[Failure]:
    """:func:`failed_steps`, looked at again for up to ``wait`` seconds while Slurm says a job COMPLETED
    that the run directory does not show yet (a shared filesystem's attribute cache lags)."""
    deadline = time.monotonic() + wait
    while True:
        failures = failed_steps(plan, steps, states, cut)
        lagging = any(f.state is not None and f.state.state == "COMPLETED" for f in failures)
        if not lagging or time.monotonic() > deadline:
            return failures
        time.sleep(2.0)
        with contextlib.suppress(OSError):
            os.listdir(plan.run_dir.completions)  # a fresh listing makes NFS revalidate the folder


def step_of(steps: list[Step], state: TaskState) -> Step:
    return next(s for s in steps if s.job == state.job)


def step_done(plan: Plan, step: Step) -> bool:
    """Whether the run directory shows ``step`` finished."""
    rd = plan.run_dir
    if step.kind == "shards":
        return all(rd.is_complete(f"p{step.phase}-{name}") for task in step.tasks for name in task)
    if step.kind == "combine":
        label = plan.stages[plan.phases[step.phase].start].label
        return (rd.global_dir / label / "state.json").exists()
    return finished(plan)


def failed_steps(plan: Plan, steps: list[Step], states: list[TaskState], cut: int | None) -> list[Failure]:
    """Each unfinished task (or combine/finalize job) at or below level ``cut`` (all levels when None)."""
    by_task = {(t.job, t.task): t for t in states}
    out = []
    for step in steps:
        if cut is not None and step.level > cut or step_done(plan, step):
            continue
        if step.kind != "shards":
            out.append(Failure(step, None, by_task.get((step.job, None))))
            continue
        for i, task in enumerate(step.tasks):
            if not all(plan.run_dir.is_complete(f"p{step.phase}-{n}") for n in task):
                out.append(Failure(step, i, by_task.get((step.job, i))))
    return out


@dataclass
class Failure:
    """An array task (``task``) or a combine/finalize job that ended without finishing its work."""

    step: Step
    task: int | None
    state: TaskState | None  # None: squeue no longer lists it

    def job(self) -> str:
        """``<job>_<task>`` and the state Slurm gave it."""
        name = f"job {self.step.job}" + (f"_{self.task}" if self.task is not None else "")
        if self.state is None:
            return f"{name} ended (no longer listed by squeue)"
        reason = f" ({self.state.reason})" if self.state.reason not in ("None", "") else ""
        return f"{name} {self.state.state}{reason}"

    def lines(self, plan: Plan, folder: Path) -> list[str]:
        """One line per incomplete shard of the task (one for a combine/finalize job): what it reported,
        the job's state, and its logs."""
        out = self.step.out_file(folder, self.task)
        if self.step.kind != "shards":
            where = f" of phase {self.step.phase}" if self.step.phase is not None else ""
            return [f"  {self.step.kind}{where}: {last_error(out)}; {self.job()}  [{out}]"]
        lines = []
        for name in self.step.tasks[self.task]:
            if not plan.run_dir.is_complete(f"p{self.step.phase}-{name}"):
                shard_log = run_root(plan) / "logs" / f"p{self.step.phase}-{name}.log"
                said = shard_error(out, name, shard_log)
                lines.append(f"  shard {name} of phase {self.step.phase}{said}; {self.job()}  "
                             f"[{shard_log}, {out}]")
        return lines

    def transient(self, folder: Path) -> bool:
        """True when a plain rerun may succeed: Slurm stopped the job, or curate said the error may be
        transient."""
        if self.state is not None and self.state.state in RERUN_MAY_HELP:
            return True
        out = self.step.out_file(folder, self.task)
        return out.exists() and "may be transient" in out.read_text(errors="replace")


def failure_message(plan: Plan, failures: list[Failure], folder: Path) -> str:
    """What failed (one line per shard, with its log and Slurm's ``.out``), then what to do."""
    lines = [line for f in failures for line in f.lines(plan, folder)]
    shards = sum(1 for line in lines if line.startswith("  shard "))
    head = (f"{shards} shard(s) failed" if shards else "a Slurm job failed") + \
        f" (later jobs were cancelled; finished shards are kept in {run_root(plan)}):"
    if all(f.transient(folder) for f in failures):
        advice = ("this may not happen again (the job was stopped, or the error may be transient): run the "
                  "same command again to submit only the incomplete shards (after a TIMEOUT or "
                  "OUT_OF_MEMORY, raise executor.time or executor.mem)")
    else:
        advice = ("fix the cause shown in the logs first, then run the same command again: only the "
                  "incomplete shards are submitted")
    more = [f"  … and {len(lines) - 30} more"] if len(lines) > 30 else []
    return "\n".join([head, *lines[:30], *more, advice])


def shard_error(out: Path, shard: str, shard_log: Path) -> str:
    """What a shard reported: `` (<input>) in stage <stage>: <error>`` from curate's one-line report in
    the ``.out`` file, else ``: <last line of the shard log's traceback>``, else nothing."""
    from curate.secrets import redact

    text = out.read_text(errors="replace") if out.exists() else ""
    mark = f"shard {shard} ("
    hits = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(mark)]
    if hits:
        return " " + redact(hits[-1][len(mark) - 1:].rsplit("  [", 1)[0])
    tail = shard_log.read_text(errors="replace").strip() if shard_log.exists() else ""
    return ": " + redact(tail.splitlines()[-1].strip()) if " failed:" in tail else ""


def last_error(out: Path) -> str:
    """What a combine or finalize job reported: its last ``error:`` line, else its last line."""
    from curate.secrets import redact

    lines = [ln.strip() for ln in (out.read_text(errors="replace") if out.exists() else "").splitlines()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    lines = errors or [ln for ln in lines if ln]
    return redact(lines[-1]) if lines else "no error was reported"


class Reporter:
    """Progress lines while following: per phase, shards done / running / failed (from
    :func:`curate.steps.status`) and the jobs' states; printed when something changes."""

    def __init__(self, plan: Plan, console, enabled: bool):
        self.plan, self.console, self.enabled = plan, console, enabled
        self.last = ""
        self.started = time.monotonic()
        self.every = 30.0
        self.printed_at = 0.0
        self.unreachable = False

    def poll(self, jobs: list[str]) -> list[TaskState] | None:
        """The jobs' states, or None while squeue fails (said once, and again when it answers)."""
        try:
            states = query(jobs)
        except SlurmUnreachable as e:
            if not self.unreachable:
                say(self.console, f"slurm: {e}; still waiting (Ctrl-C cancels the jobs)")
                self.unreachable = True
            return None
        if self.unreachable:
            say(self.console, "slurm: squeue answers again")
            self.unreachable = False
        return states

    def update(self, states: list[TaskState]) -> None:
        from curate.steps import status

        if not self.enabled:
            return
        phases = status(self.plan)
        total = len(self.plan.shards)
        parts = [f"p{ph.index} {len(ph.done)}/{total} done"
                 + (f", {len(ph.running)} running" if ph.running else "")
                 + (f", {len(ph.failed)} failed" if ph.failed else "") for ph in phases]
        counts: dict[str, int] = {}
        for t in states:
            counts[t.state.lower()] = counts.get(t.state.lower(), 0) + 1
        jobs = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        line = f"slurm: {'; '.join(parts)} | tasks: {jobs or 'none listed'}"
        now = time.monotonic()
        if line != self.last or now - self.printed_at >= self.every:
            elapsed = int(now - self.started)
            say(self.console, f"{line} [{elapsed // 60}:{elapsed % 60:02d}]")
            self.last, self.printed_at = line, now

    def failure_seen(self, bad: list[TaskState]) -> None:
        names = sorted({t.job + (f"_{t.task}" if t.task is not None else "") + f" {t.state}" for t in bad})
        say(self.console, f"slurm: job(s) failed: {', '.join(names)}; cancelled the jobs that depended on "
                          "them, waiting for the other running tasks")
        log.error("slurm: job(s) failed: %s", ", ".join(names))

"""``executor: {kind: dask, ...}``: each shard is one Dask task, on a cluster curate starts or joins.

Where the tasks run:

- nothing set: a ``distributed.LocalCluster`` on this machine (``workers`` processes, one thread each);
- ``address: tcp://host:8786``: an existing scheduler and its workers;
- ``cluster: {class: dask_jobqueue.SLURMCluster, <kwargs>, scale: N | adapt: {...}}``: any cluster class,
  built by dotted name with the kwargs (the scheduler then runs in this process).

Nothing live is pickled: the plan travels as ``Plan.to_dict()`` inside a worker plugin (installed on
every worker, also on workers that join later), and each worker process rebuilds the
:class:`~curate.planner.Plan` once per plan digest. A task is a plain function of (digest, phase, shard
name) that calls :func:`~curate.runner.run_shard_retrying`, so the files a shard writes are the ones
the local executor writes.

Retries: ``RetryableError`` inside a shard is retried in the task (``retries``/``retry_backoff``). A
task lost with its worker (killed, out of memory) is submitted again, up to ``task_retries`` times, and
lands on whichever worker is free. Any other exception fails the shard: it is reported to the driver,
whose message names the shard's log.

Workers never outlive the driver: the workers of a cluster curate started are children of this
process (LocalCluster's nannies run in it) and exit when their parent pipe closes; they also arm the
local executor's parent-death watchdog. The cluster is closed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import Field, field_validator, model_validator

from curate.executors.base import Done, Executor, ExecutorParams, Progress, WorkerLost, say
from curate.planner import FINGERPRINT_PACKAGES, Phase, Plan
from curate.plugins import register_executor
from curate.readers.base import Shard

log = logging.getLogger("curate")

#: Keys of ``cluster:`` that curate reads itself; the others are the class's keyword arguments.
CLUSTER_KEYS = ("class", "scale", "adapt")


class RunAbandoned(RuntimeError):
    """A worker found that the driver which submitted the task no longer holds the run directory."""


@register_executor("dask")
class DaskExecutor(Executor):
    """Each shard is one Dask task: on a LocalCluster (the default), a running scheduler (`address`) or a
    cluster class such as dask_jobqueue.SLURMCluster (`cluster`). Same bytes as `kind: local`."""

    class Params(ExecutorParams):
        address: str | None = Field(
            None, description="scheduler to join, e.g. tcp://host:8786 (null: start a cluster)")
        cluster: dict[str, Any] | None = Field(
            None, description="null: a LocalCluster; or {class: dotted.ClusterClass, <kwargs>, "
                              "scale: N or adapt: {...}}")
        workers: int | None = Field(None, gt=0, description="LocalCluster worker processes (null: one per core)")
        threads_per_worker: int = Field(1, gt=0, description="LocalCluster threads per worker")
        memory_limit: str | int | None = Field(
            "auto", description="LocalCluster memory per worker ('auto': RAM / workers)")
        max_in_flight: int | None = Field(
            None, gt=0, description="most tasks submitted at once (null: 2 × worker threads)")
        task_retries: int = Field(
            3, ge=0, description="times a shard lost with its worker is run again elsewhere")
        dashboard: bool = Field(True, description="serve the dashboard and print its link once")

        @field_validator("cluster")
        @classmethod
        def _cluster_spec(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
            if spec is not None:
                check_cluster_spec(spec)
            return spec

        @model_validator(mode="after")
        def _one_target(self):
            if self.address and self.cluster:
                raise ValueError("give either address (join a scheduler) or cluster (start one), not both")
            if self.workers is not None and (self.address or self.cluster):
                raise ValueError("workers sizes the LocalCluster; with cluster use its scale or adapt, "
                                 "with address the scheduler's workers are used")
            if importlib.util.find_spec("distributed") is None:
                raise ValueError("needs the optional dependency 'distributed': pip install 'curate-longctx[dask]'")
            return self

    def __init__(self, params: ExecutorParams):
        super().__init__(params)
        self.console = None  # a rich Console for the dashboard line; stderr when None
        self._session: _Session | None = None

    def map_shards(self, plan: Plan, phase: Phase, shards: list[Shard], done: Done, progress: Progress) -> None:
        """Run ``shards`` of ``phase`` as tasks, at most ``max_in_flight`` submitted at once.

        Each shard is reported once through ``done``; ``progress`` gets the rows and tokens a shard
        wrote when it finishes. The session is kept for the next phase unless this is the last phase,
        a shard failed, or an exception (Ctrl-C, SIGTERM) escapes — then it is closed here.
        """
        if not shards:
            return
        try:
            session = self._open(plan)
            failed = _Loop(self, session, plan, phase, done, progress).run(shards)
        except BaseException:
            self.close(interrupted=True)
            raise
        if failed or phase.last:
            self.close()

    def close(self, interrupted: bool = False) -> None:
        """End the session kept between phases: stop curate's own cluster (its workers killed at once
        when ``interrupted``), unregister the plan plugins from a joined scheduler, and disconnect.

        ``map_shards`` calls it after the last phase, after a phase with failed shards and on any
        exception; a driver that stops between phases (a failed combine) should call it too."""
        session, self._session = self._session, None
        if session is not None:
            session.close(interrupted)

    # ------------------------------------------------------------------ session
    def _open(self, plan: Plan) -> _Session:
        """The session of this run, started (and its dashboard announced) on first use."""
        if self._session is None:
            self._session = _start_session(self.params, len(plan.shards))
            self._announce(self._session)
        return self._session

    def _announce(self, session: _Session) -> None:
        """Print the dashboard link once per session. A cluster curate started serves the dashboard
        when bokeh is installed; a joined scheduler's link is printed as it reports it."""
        if not self.params.dashboard:
            return
        link = session.dashboard_link()
        if session.ours and importlib.util.find_spec("bokeh") is None:
            self._say("dask dashboard: not served (it needs bokeh: pip install 'curate-longctx[dask]')")
        elif link and session.ours:
            self._say(f"dask dashboard: {link}")
        elif link:
            self._say(f"dask dashboard (if the scheduler serves one): {link}")

    def _say(self, text: str, level: int = logging.INFO) -> None:
        say(self.console, text, level)


# ====================================================================== cluster specification
def check_cluster_spec(spec: dict[str, Any]) -> None:
    """Raise ValueError unless ``spec`` names an importable cluster class and sane scale/adapt keys."""
    name = spec.get("class")
    if not isinstance(name, str) or "." not in name:
        raise ValueError("needs class: a dotted cluster class, e.g. dask_jobqueue.SLURMCluster")
    module = name.rsplit(".", 1)[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        ours = module.split(".")[0] in ("distributed", "dask_jobqueue")
        extra = " (pip install 'curate-longctx[dask]')" if ours else ""
        raise ValueError(f"class {name}: module {module!r} is not installed{extra}")
    if "scale" in spec and "adapt" in spec:
        raise ValueError("give scale (a fixed number of workers) or adapt, not both")
    scale = spec.get("scale")
    if scale is not None and (not isinstance(scale, int) or isinstance(scale, bool) or scale < 0):
        raise ValueError("scale: a number of workers (an integer ≥ 0)")
    adapt = spec.get("adapt")
    if adapt is not None and not isinstance(adapt, (bool, dict)):
        raise ValueError("adapt: true or a mapping of Cluster.adapt keywords (minimum, maximum, …)")


def build_cluster(spec: dict[str, Any]):
    """Instantiate ``spec['class']`` with the other keys as kwargs, then apply ``scale``/``adapt``."""
    module, _, name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {k: v for k, v in spec.items() if k not in CLUSTER_KEYS}
    cluster = cls(**kwargs)
    if spec.get("scale") is not None:
        cluster.scale(spec["scale"])
    adapt = spec.get("adapt")
    if adapt:
        cluster.adapt(**(adapt if isinstance(adapt, dict) else {}))
    return cluster


def _planned_workers(params) -> int:
    """Workers the configuration asks for (a floor for the in-flight bound while workers join)."""
    if params.cluster:
        adapt = params.cluster.get("adapt")
        if isinstance(adapt, dict) and adapt.get("maximum"):
            return int(adapt["maximum"])
        return int(params.cluster.get("scale") or 1)
    if params.address:
        return 1
    return params.workers or os.cpu_count() or 1


# ====================================================================== session (driver side)
@dataclass
class _Session:
    """A client, the cluster curate started (if any) and the plan plugins it installed."""

    client: Any
    cluster: Any = None
    ours: bool = False
    driver_pid: int | None = None
    floor: int = 1
    plugins: set[str] = field(default_factory=set)
    _limit: tuple[float, int] = (0.0, 0)

    def install(self, plan: Plan) -> str:
        """Install the plan on every worker (also those that join later); return its digest."""
        plan_dict = plan.to_dict()
        digest = plan_digest(plan_dict)
        name = f"curate-plan-{digest[:16]}"
        if name not in self.plugins:
            plugin = plan_plugin_class()(digest, plan_dict, package_versions(), self.driver_pid)
            self.client.register_plugin(plugin, name=name)
            self.plugins.add(name)
        return digest

    def threads(self) -> int:
        """Worker threads now in the cluster (refreshed at most every two seconds)."""
        now = time.monotonic()
        if now - self._limit[0] > 2.0:
            workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
            self._limit = (now, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        return self._limit[1]

    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard address, None when it runs no HTTP server."""
        try:
            services = self.client.scheduler_info(n_workers=0).get("services", {})
            return self.client.dashboard_link if "dashboard" in services else None
        except Exception:  # noqa: BLE001 - an older or unusual scheduler: no link then
            return None

    def close(self, interrupted: bool) -> None:
        if interrupted:
            # Stopped by Ctrl-C or SIGTERM: the connections dask is told to drop log their errors (with
            # tracebacks, at INFO) on the way down; the user has been told what happened and what to do.
            _silence_dask_logs()
        if interrupted and self.ours:
            _kill_workers(self.cluster)
        if not self.ours:
            for name in self.plugins:
                try:
                    self.client.unregister_worker_plugin(name)
                except Exception:  # noqa: BLE001 - the scheduler may be gone; nothing to clean then
                    log.debug("could not unregister worker plugin %s", name, exc_info=True)
        for part in (self.client, self.cluster if self.ours else None):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - closing after a lost connection
                    log.debug("closing %r failed", part, exc_info=True)


def _start_session(params, n_shards: int) -> _Session:
    """Join ``address``, or start ``cluster`` / a LocalCluster with lost tasks surfaced to us."""
    import dask
    from distributed import Client

    if params.address:
        return _Session(Client(params.address, set_as_default=False), floor=_planned_workers(params))
    with dask.config.set(cluster_config()):
        if params.cluster:
            cluster = build_cluster(params.cluster)
            driver_pid = None
        else:
            cluster = _local_cluster(params, n_shards)
            driver_pid = os.getpid()
    _quiet_lost_task_errors()
    try:
        client = Client(cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise
    return _Session(client, cluster, ours=True, driver_pid=driver_pid, floor=_planned_workers(params))


#: dask settings that cost CPU the shards need, at rest: (dask's default, curate's). The 20 ms event-loop
#: tick of every server and the 10 ms statistical profiler of every worker take about a fifth of a core
#: on a two-worker LocalCluster doing nothing; a fifth of a two-core machine's shard time.
QUIET = {"distributed.admin.tick.interval": ("20ms", "200ms"),
         "distributed.worker.profile.enabled": (True, False),
         "distributed.admin.system-monitor.interval": ("500ms", "2s")}


def cluster_config() -> dict[str, Any]:
    """dask settings for a cluster curate starts (its scheduler, nannies and workers inherit them).

    ``allowed-failures: 0``: a task lost with its worker comes back to the driver as ``KilledWorker``
    at once, and the driver resubmits it (``task_retries``) and says so. The :data:`QUIET` settings
    apply where the user has left dask's default.
    """
    import dask

    config: dict[str, Any] = {"distributed.scheduler.allowed-failures": 0}
    for key, (default, ours) in QUIET.items():
        if dask.config.get(key, default) == default:
            config[key] = ours
    return config


class _LostTaskFilter(logging.Filter):
    """Drop the scheduler's errors about lost tasks ("marked as failed because N workers died") and
    lost results ("Couldn't gather keys": the task is then run again, and its result waited for):
    curate reports each lost shard itself and reruns it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "workers died while trying to run it" not in text and "Couldn't gather keys" not in text


def _silence_dask_logs() -> None:
    """Nothing below CRITICAL from dask's (and its tornado's) loggers from now on: this process is
    shutting its session down after an interrupt, and dropped connections are expected then."""
    names = ["distributed", "tornado", *(n for n in logging.root.manager.loggerDict
                                         if n.startswith(("distributed.", "tornado.")))]
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _quiet_lost_task_errors() -> None:
    logger = logging.getLogger("distributed.scheduler")
    if not any(isinstance(f, _LostTaskFilter) for f in logger.filters):
        logger.addFilter(_LostTaskFilter())


class _HeartbeatFilter(logging.Filter):
    """Drop a worker's "Failed to communicate with scheduler during heartbeat" (an ERROR with a
    traceback). On curate's LocalCluster the scheduler lives in the driver: a heartbeat that finds it
    gone is the race of a normal shutdown (the scheduler closing while a worker's heartbeat is on the
    wire), and a scheduler that really died took the driver with it, which the workers follow."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to communicate with scheduler during heartbeat" not in record.getMessage()


def quiet_heartbeat_errors() -> None:
    """In a worker of curate's LocalCluster: install :class:`_HeartbeatFilter` (once)."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _HeartbeatFilter) for f in logger.filters):
        logger.addFilter(_HeartbeatFilter())


def _local_cluster(params, n_shards: int):
    """A LocalCluster of worker processes. Called inside ``dask.config.set(cluster_config())``; the
    nannies get a deep copy of that configuration, so a worker they restart has it too."""
    import copy

    import dask
    from distributed import LocalCluster

    workers = max(1, min(params.workers or os.cpu_count() or 1, n_shards))
    # Without a dashboard the scheduler still serves HTTP (health, metrics): on a free port, not 8787.
    return LocalCluster(n_workers=workers, threads_per_worker=params.threads_per_worker,
                        memory_limit=params.memory_limit, processes=True,
                        dashboard_address=":0" if params.dashboard else None,
                        scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.ERROR,
                        config=copy.deepcopy(dask.config.config))


def _kill_workers(cluster) -> None:
    """SIGKILL the worker processes of curate's LocalCluster (Ctrl-C: do not wait for their shards)."""
    import signal

    for nanny in list(getattr(cluster, "workers", {}).values()):
        pid = getattr(getattr(nanny, "process", None), "pid", None)
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone, or not ours
                os.kill(pid, signal.SIGKILL)


def plan_digest(plan_dict: dict[str, Any]) -> str:
    """A stable digest of ``Plan.to_dict()`` (the key of the worker-side plan cache)."""
    return hashlib.sha256(orjson.dumps(plan_dict, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape output bytes, and Python's (as in the fingerprint)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for p in FINGERPRINT_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    out["python"] = ".".join(map(str, sys.version_info[:2]))
    return out


def _lock_token(plan: Plan) -> str | None:
    """The token of the run lock this driver holds (None when the directory has none)."""
    from curate.lock import run_lock

    holder = run_lock(plan.run_dir.root, "").read()
    return holder.get("token") if holder else None


# ====================================================================== the submission loop
class _Loop:
    """One phase: keep at most ``max_in_flight`` tasks submitted, report each shard once."""

    def __init__(self, executor: DaskExecutor, session: _Session, plan: Plan, phase: Phase,
                 done: Done, progress: Progress):
        self.params = executor.params
        self.say = executor._say
        self.session, self.plan, self.phase = session, plan, phase
        self.done, self.progress = done, progress
        self.digest = session.install(plan)
        self.guard = {"lock": _lock_token(plan), "run_dir": str(plan.run_dir.root)}
        self.retry = {"retries": self.params.retries, "backoff": self.params.retry_backoff}
        self.inflight: dict[Any, Shard] = {}
        self.losses: dict[str, int] = {}
        self.failed = 0
        from distributed import as_completed

        # results are gathered on the client's event loop as tasks finish, not one by one from here
        self.ac = as_completed(loop=session.client.loop, with_results=True, raise_errors=False)

    def run(self, shards: list[Shard]) -> int:
        """Run every shard; return how many failed."""
        queue = list(reversed(shards))  # pop() from the end keeps the input order
        try:
            self._top_up(queue)
            self._wait_for_workers()
            for future, result in self.ac:
                shard = self.inflight.pop(future)
                self._finish(future, result, shard, queue)
                self._top_up(queue)
        finally:
            if self.inflight:  # interrupted: cancel what is still queued or running
                try:
                    self.session.client.cancel(list(self.inflight), force=True)
                except Exception:  # noqa: BLE001 - a lost scheduler: nothing left to cancel
                    log.debug("cancelling the remaining tasks failed", exc_info=True)
        return self.failed

    def _limit(self) -> int:
        if self.params.max_in_flight:
            return self.params.max_in_flight
        return 2 * max(self.session.threads(), self.session.floor, 1)

    def _top_up(self, queue: list[Shard]) -> None:
        limit = self._limit() if queue else 0
        while queue and len(self.inflight) < limit:
            self._submit(queue.pop())

    def _submit(self, shard: Shard) -> None:
        attempt = self.losses.get(shard.name, 0)
        key = f"curate_shard-p{self.phase.index}-{shard.name}-a{attempt}-{uuid.uuid4().hex[:8]}"
        future = self.session.client.submit(run_task, self.digest, self.phase.index, shard.name, self.retry,
                                            self.guard, key=key, pure=False, retries=0)
        self.inflight[future] = shard
        self.ac.add(future)

    def _wait_for_workers(self) -> None:
        if not self.session.threads():
            log.info("no worker in the cluster yet: the tasks wait for workers to join")

    def _finish(self, future, result, shard: Shard, queue: list[Shard]) -> None:
        """Report a finished task's shard, or queue it again when its worker was lost."""
        try:
            stats, error = _outcome(future, result)
        finally:
            future.release()
        if error is None:
            self._report_rows(stats)
            self.done(shard, stats, None)
            return
        if _worker_lost(error):
            if self._resubmit(shard, error, queue):
                return
            error = _lost(shard, self.losses[shard.name], error)
        self.failed += 1
        self.done(shard, None, error)

    def _resubmit(self, shard: Shard, error, queue: list[Shard]) -> bool:
        """Queue a shard lost with its worker again (first in line); False once retries are spent."""
        n = self.losses.get(shard.name, 0) + 1
        self.losses[shard.name] = n
        if n > self.params.task_retries:
            return False
        worker = getattr(getattr(error, "last_worker", None), "address", None) or "its worker"
        self.say(f"shard {shard.name} phase {self.phase.index}: worker {worker} died with it (running or queued "
                 f"there); running it again ({n} of {self.params.task_retries})", logging.WARNING)
        queue.append(shard)
        return True

    def _report_rows(self, stats: dict[str, Any]) -> None:
        """Rows (and tokens) that left the phase, from the finished shard's stats."""
        labels = [s.label for s in self.plan.stages[self.phase.start:self.phase.stop]]
        st = stats.get(labels[-1] if labels else "read", {})
        self.progress(int(st.get("rows_out", 0)), int(st.get("tokens_out", 0)))


def _outcome(future, result) -> tuple[dict[str, Any] | None, BaseException | None]:
    """(stats, None) for a shard that finished, (None, error) otherwise: the shard's own error as the
    task returned it, or what dask reports (``KilledWorker``, a cancellation).

    ``result`` is what ``as_completed(with_results=True, raise_errors=False)`` gives: the task's value,
    ``(type, exception, traceback)`` for an erred task, or the exception of a cancelled one.
    """
    if future.status == "error" and isinstance(result, tuple) and len(result) == 3:
        return None, result[1]
    if isinstance(result, BaseException):
        return None, result
    if future.status == "cancelled":
        import concurrent.futures

        return None, concurrent.futures.CancelledError(f"task {future.key} was cancelled")
    if not isinstance(result, dict) or ("stats" not in result and "error" not in result):
        return None, RuntimeError(f"the task returned {type(result).__name__}, not a shard's outcome")
    return result.get("stats"), result.get("error")


def _worker_lost(error: BaseException) -> bool:
    """True for the errors dask raises when a task's worker died (or its key was cancelled)."""
    import asyncio
    import concurrent.futures

    from distributed import KilledWorker

    return isinstance(error, (KilledWorker, asyncio.CancelledError, concurrent.futures.CancelledError))


def _lost(shard: Shard, times: int, cause: BaseException) -> WorkerLost:
    last = getattr(getattr(cause, "last_worker", None), "address", None)
    where = f" (the last one: {last})" if last else ""
    error = WorkerLost(f"its worker died {times} time(s) while the shard ran or waited there{where}; a worker "
                       "killed for using too much memory is the usual cause")
    error.curate_stage = "worker"
    error.curate_input = shard.uri
    return error


# ====================================================================== worker side
_PLAN_DICTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
_PLANS: dict[str, tuple[Plan, dict[str, Shard]]] = {}
_WORKER_LOCK = threading.Lock()


def run_task(digest: str, phase_index: int, shard_name: str, retry: dict[str, Any],
             guard: dict[str, Any]) -> dict[str, Any]:
    """The task: rebuild (or reuse) the plan, check the driver still owns the run, run the shard.

    Returns ``{"stats": ...}``, or ``{"error": exception}`` when the shard failed for its own reason:
    to dask the task succeeded, so it is neither retried nor logged as a worker error (the shard's log
    has the traceback). Only a lost worker reaches dask as a failure.
    """
    try:
        plan, shards = _worker_plan(digest)
        _check_owner(guard)
        return {"stats": _run_shard(plan, plan.phases[phase_index], shards[shard_name], retry)}
    except Exception as e:  # noqa: BLE001 - reported to the driver, which reports failed shards together
        return {"error": portable_error(e)}


def portable_error(error: Exception) -> Exception:
    """``error`` if it pickles (with ``curate_stage``/``curate_input``), else a RuntimeError that keeps
    its type name, message and those attributes."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling problem: send a plain copy
        plain = RuntimeError(f"{type(error).__name__}: {error}")
        for name in ("curate_stage", "curate_input"):
            if hasattr(error, name):
                setattr(plain, name, getattr(error, name))
        return plain


def _run_shard(plan: Plan, phase: Phase, shard: Shard, retry: dict[str, Any]) -> dict[str, Any]:
    from curate.runner import run_shard_retrying

    return run_shard_retrying(plan, phase, shard, None, **retry)


def _worker_plan(digest: str) -> tuple[Plan, dict[str, Shard]]:
    """The plan for ``digest`` in this worker process, built once from the installed dict."""
    with _WORKER_LOCK:
        if digest not in _PLANS:
            if digest not in _PLAN_DICTS:
                raise RuntimeError(f"plan {digest[:16]} is not installed on this worker (its plugin did not run)")
            plan_dict, versions = _PLAN_DICTS[digest]
            _check_versions(versions)
            plan = Plan.from_dict(plan_dict)
            _PLANS[digest] = (plan, {s.name: s for s in plan.shards})
        return _PLANS[digest]


def _check_versions(expected: dict[str, Any]) -> None:
    here = package_versions()
    differ = {k: (v, here.get(k)) for k, v in expected.items() if here.get(k) != v}
    if differ:
        text = ", ".join(f"{k} {a} on the driver, {b} here" for k, (a, b) in sorted(differ.items()))
        raise RuntimeError(f"this worker's packages differ from the driver's, so its output bytes could too: {text}")


def _check_owner(guard: dict[str, Any]) -> None:
    """Refuse a task whose driver no longer holds the run lock (or whose run directory is not here)."""
    from pathlib import Path

    from curate.lock import run_lock

    if guard.get("lock") is None:
        return
    root = Path(guard["run_dir"])
    if not root.is_dir():
        raise RunAbandoned(f"the run directory {root} is not visible on this worker: put it on a filesystem "
                           "every worker mounts at the same path")
    holder = run_lock(root, "").read()
    if not holder or holder.get("token") != guard["lock"]:
        raise RunAbandoned(f"the driver that submitted this task no longer holds {root}/lock")


def install_plan(digest: str, plan_dict: dict[str, Any], versions: dict[str, Any], driver_pid: int | None) -> None:
    """Worker-plugin body: remember the plan dict; on curate's LocalCluster, die with the driver."""
    _PLAN_DICTS[digest] = (plan_dict, versions)
    if driver_pid is not None and os.getppid() == driver_pid:  # a worker of the cluster curate started
        from curate.allocator import tune_allocator
        from curate.executors.local import _watch_driver
        from curate.quick_exit import skip_exit_collection

        tune_allocator()
        skip_exit_collection()
        quiet_heartbeat_errors()
        _watch_driver(driver_pid)


def plan_plugin_class() -> type:
    """``_PlanPlugin``, a ``distributed.WorkerPlugin`` built on first use (importing this module must not
    import distributed). Pickled by reference: a worker unpickling it gets it through ``__getattr__``."""
    cls = globals().get("_PlanPlugin")
    if cls is None:
        from distributed import WorkerPlugin

        def __init__(self, digest, plan_dict, versions, driver_pid):
            self.digest, self.plan_dict, self.versions, self.driver_pid = digest, plan_dict, versions, driver_pid

        def setup(self, worker) -> None:
            install_plan(self.digest, self.plan_dict, self.versions, self.driver_pid)

        def teardown(self, worker) -> None:
            _PLAN_DICTS.pop(self.digest, None)
            _PLANS.pop(self.digest, None)

        cls = type("_PlanPlugin", (WorkerPlugin,), {"__init__": __init__, "setup": setup, "teardown": teardown,
                                                      "__module__": __name__, "__qualname__": "_PlanPlugin",
                                                      "__doc__": "Installs a curate plan on a worker."})
        globals()["_PlanPlugin"] = cls
    return cls


def __getattr__(name: str):
    if name == "_PlanPlugin":
        return plan_plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

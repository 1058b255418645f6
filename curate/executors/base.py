"""Executors run ``run_shard`` over a phase's pending shards; they differ only in where."""

from __future__ import annotations

import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from curate.errors import RetryableError
from curate.planner import Phase, Plan
from curate.readers.base import Shard
from curate.stage import StageParams

Done = Callable[[Shard, dict[str, Any] | None, BaseException | None], None]
Progress = Callable[[int, int], None]
log = logging.getLogger("curate")


class WorkerLost(RetryableError):
    """A shard was lost with its worker process (killed, out of memory, crashed) more often than the
    executor's ``task_retries`` allows."""


def say(console, text: str, level: int = logging.INFO) -> None:
    """Tell the user (``console``, a rich Console, or stderr when None) and ``logs/run.log``."""
    log.log(level, "%s", text)
    if console is not None:
        console.print(text, highlight=False, markup=False)
    else:
        print(text, file=sys.stderr, flush=True)


class ExecutorParams(StageParams):
    """Parameters every executor takes."""

    retries: int = Field(2, ge=0, description="retries of a shard that raised a RetryableError (with backoff)")
    retry_backoff: float = Field(2.0, ge=0,
                                 description="seconds before the first retry; doubles each time, ±50% jitter")


class ExecutorBase(ABC):
    """What every executor kind has: a registered ``kind`` and validated ``Params``. An executor is
    either an :class:`Executor` (a pool the driver hands one phase at a time) or a :class:`Launcher`
    (hands the whole run to a scheduler)."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = ExecutorParams

    def __init__(self, params: StageParams):
        self.params = params


class Executor(ExecutorBase):
    """A pool executor (local processes, Dask). ``map_shards`` calls ``done(shard, stats, error)`` as
    each shard finishes; the driver runs the phases, combines between them and finalizes."""

    @abstractmethod
    def map_shards(self, plan: Plan, phase: Phase, shards: list[Shard], done: Done, progress: Progress) -> None:
        """Run every shard of ``shards`` for ``phase``; report each through ``done``."""


@dataclass
class LaunchOptions:
    """How ``curate run`` drives a :class:`Launcher`."""

    wait: bool = True  # follow the jobs until the run is finished (False: return once submitted)
    dry_run: bool = False  # write the job scripts, submit nothing
    show_progress: bool = True
    command: str = "curate run"


@dataclass
class LaunchResult:
    """What a launcher did: the scripts it wrote, the jobs it submitted, whether the run is complete."""

    scripts: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    complete: bool = False
    message: str = ""


class Launcher(ExecutorBase):
    """An executor that hands the whole run to a scheduler as jobs (one per phase, combines between,
    a finalize at the end), each job calling ``curate run-shard`` / ``combine`` / ``finalize``.

    The driver claims the run directory (fingerprint, resolved manifest, tokenizer) and holds the run
    lock in ``launcher`` mode while :meth:`launch` runs, so the jobs' own step locks are allowed.
    ``launch`` submits only what is incomplete, and with ``options.wait`` follows the jobs until the
    run is finished (or a job failed: raise :class:`curate.driver.RunFailed` naming it and its log).
    """

    @abstractmethod
    def launch(self, plan: Plan, options: LaunchOptions, console) -> LaunchResult:
        """Write and submit the jobs of every incomplete step of ``plan``."""

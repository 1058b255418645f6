"""Executors run ``run_shard`` over a phase's pending shards; they differ only in where."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field

from curate.planner import Phase, Plan
from curate.readers.base import Shard
from curate.stage import StageParams

Done = Callable[[Shard, dict[str, Any] | None, BaseException | None], None]
Progress = Callable[[int, int], None]


class ExecutorParams(StageParams):
    """Parameters every executor takes."""

    retries: int = Field(2, ge=0, description="retries of a shard that raised a RetryableError (with backoff)")
    retry_backoff: float = Field(2.0, ge=0, description="seconds before the first retry; doubles each time, ±50% jitter")


class Executor(ABC):
    """Base executor. ``map_shards`` calls ``done(shard, stats, error)`` as each shard finishes."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = ExecutorParams

    def __init__(self, params: StageParams):
        self.params = params

    @abstractmethod
    def map_shards(self, plan: Plan, phase: Phase, shards: list[Shard], done: Done, progress: Progress) -> None:
        """Run every shard of ``shards`` for ``phase``; report each through ``done``."""

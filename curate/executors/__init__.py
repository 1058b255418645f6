"""Executors, selected by ``executor: {kind: ...}``; importing this package registers them."""

from curate.executors import dask, local  # noqa: F401
from curate.executors import slurm  # noqa: F401
from curate.executors.base import Executor

__all__ = ["Executor"]

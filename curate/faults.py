"""Fault injection for resume tests: make a chosen step fail, then check a plain rerun is exact.

Off unless the environment variable ``CURATE_FAULTS`` holds a JSON list of faults (the variable is
inherited by worker processes, and is not part of the run's fingerprint, so the rerun that follows
uses the same manifest)::

    CURATE_FAULTS='[{"point": "observe", "shard": "00001", "after": 1, "action": "raise"}]'

Each fault has

- ``point``: where it fires — ``stage`` (after ``after`` batches left stage ``label``), ``observe``
  (after the global stage observed ``after`` batches of the shard), ``sink`` (after ``after``
  batches were written to the sinks), ``completion`` (just before a shard's completion marker),
  ``combine`` (after a global stage combined, before its state is saved), ``index`` (before a sink's
  ``index.json``), ``stats`` (before ``stats.json``), ``compact_file`` (after ``curate compact``
  committed its ``after``-th file of a group, before recording it) and ``compact_index`` (before the
  compacted ``index.json``), both filtered by ``label`` (the sink folder);
- optional filters ``shard``, ``phase``, ``label`` (stage label or sink folder);
- ``action``: ``raise`` (an exception, the default), ``oserror`` (an ``OSError`` as from a full
  disk), ``retryable`` (a :class:`~curate.errors.RetryableError`), ``kill`` (SIGKILL of the process
  that reaches the point) or ``sleep`` (wait ``seconds``, to let a test act on a running run);
- optional ``once``: a file path; the fault fires only while that file does not exist, and creates it
  when it fires (so it fires once across processes and retries).
"""

from __future__ import annotations

import os
import signal
import time
from functools import lru_cache
from typing import Any

import orjson


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


@lru_cache(maxsize=4)
def _faults(spec: str) -> tuple[dict[str, Any], ...]:
    faults = orjson.loads(spec)
    return tuple(faults if isinstance(faults, list) else [faults])


def check(point: str, *, shard: str | None = None, phase: int | None = None, label: str | None = None,
          count: int | None = None) -> None:
    """Fire the first configured fault matching this point (no-op without ``CURATE_FAULTS``)."""
    spec = os.environ.get("CURATE_FAULTS")
    if not spec:
        return
    for f in _faults(spec):
        if f.get("point") != point:
            continue
        if "shard" in f and f["shard"] != shard:
            continue
        if "phase" in f and f["phase"] != phase:
            continue
        if "label" in f and f["label"] != label:
            continue
        if count is not None and count != int(f.get("after", 1)):
            continue  # fires once per attempt: when the count reaches `after`
        _fire(f, point, shard, phase, label)


def _fire(fault: dict[str, Any], point: str, shard, phase, label) -> None:
    action = fault.get("action", "raise")
    where = f"{point} (phase {phase}, shard {shard}, {label})"
    once = fault.get("once")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if action == "sleep":
        time.sleep(float(fault.get("seconds", 1.0)))
        return
    if action == "retryable":
        from curate.errors import RetryableError

        raise RetryableError(f"injected transient fault at {where}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oserror":
        raise OSError(28, f"injected fault at {where}: No space left on device")
    raise InjectedFault(f"injected fault at {where}")

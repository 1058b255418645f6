"""The C allocator's settings in processes that run shards (glibc only; elsewhere nothing changes).

A worker's native memory is mostly short-lived buffers of a few megabytes (token arrays, Arrow
batches, the encoder's per-batch results) made by several threads. With glibc's defaults two things
keep that memory after it is freed:

- every thread that allocates gets its own arena (up to 8 per core), and each arena keeps its freed
  pages for reuse: a worker with an encoder pool, a read-ahead and an encode-ahead thread held a
  195 MB main heap plus many 20–60 MB arenas;
- the threshold above which a block gets its own ``mmap`` (and goes back to the system when freed)
  starts at 128 KB but rises to the largest block freed so far, up to 32 MB: after the first few
  batches every multi-megabyte array comes from an arena and fragments it.

:func:`tune_allocator` caps the arenas (at a local worker's thread share, elsewhere at the usable
cores; at least 2) and fixes the ``mmap`` threshold at 1 MB. Measured on a 120 MB shard
(tokenize → utk → pack, one worker): peak PSS 519 → 435 MB, same wall time.

It runs only in processes curate owns: ``curate run`` (which runs shards itself with one local
worker), its spawned workers, ``curate run-shard`` (Slurm tasks) and the workers of a Dask cluster
curate started — never in a Python session that calls the driver, nor on a shared cluster's workers.
A setting the user made is left as it is: ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, or the
matching ``glibc.malloc.*`` entry of ``GLIBC_TUNABLES``. glibc fixes its arena limit once a process
has 8 arenas; called that late, the arena cap does nothing (the threshold still applies).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

#: ``mallopt`` parameters (glibc's ``malloc.h``), with the environment variable that sets each.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
MMAP_THRESHOLD = 1 << 20

_applied: dict[str, int] | None = None


def tune_allocator(threads: int | None = None) -> dict[str, int]:
    """Apply the settings once per process; return what was set (empty where nothing was).

    ``threads`` is the number of threads this process's native pools run (default: usable cores).
    Call it early, before the pools start: arenas that already exist are kept.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return _applied
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = (("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
              ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max", M_ARENA_MAX, max(2, threads)))
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        for variable, tunable, param, value in wanted:
            if variable in os.environ or f"{tunable}=" in tunables:
                continue
            if libc.mallopt(param, value) == 1:
                _applied[variable] = value
    return _applied

"""Skip the garbage collector's passes over live objects while a process curate owns shuts down.

When the interpreter exits it clears every module and runs full garbage collections over whatever is
still alive: in a ``curate run`` process (pydantic, pyarrow, rich, the stages' modules …) those passes
cost 0.10–0.15 s after the run is done, and the driver waits the same again for each local worker
process to exit. :func:`skip_exit_collection` registers :func:`gc.freeze` as an exit hook: at exit, after the
other exit hooks (logging's flush, temporary-directory clean-up, the multiprocessing tracker) have run,
every object still alive is moved out of the collector's reach. Modules are still cleared and objects
freed by their reference counts as usual; only reference cycles still alive at exit are left to the
operating system (Python never promised to finalize those). Measured: 126–146 ms → 16–23 ms from the
end of ``curate run`` to the process's exit.

Registered in processes curate owns only: the ``curate`` command, the local executor's workers and the
workers of a Dask cluster curate started.
"""

from __future__ import annotations

import atexit
import gc

_registered = False


def skip_exit_collection() -> None:
    """Register the exit hook once per process (the first registered runs last among exit hooks)."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(gc.freeze)

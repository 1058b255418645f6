"""``run_shard(plan, phase, shard)``: the one function every executor calls.

It reads the shard (from the source in the first phase, from the previous phase's intermediate
file after that), chains the phase's stage generators, and writes either the sinks (last phase) or
an intermediate Arrow file that the next global stage observes. Outputs are renamed into place
before the completion marker is written, so a marker always means finished output.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate import faults
from curate.context import READ_LABEL, RunContext
from curate.errors import RetryableError
from curate.planner import Phase, Plan
from curate.readers.arrow_ipc import open_ipc
from curate.readers.base import Shard
from curate.rundir import AtomicFile, RunDir
from curate.secrets import redact, redact_obj
from curate.seeds import doc_hashes
from curate.stage import ShardPartial
from curate.stats import StageStats

Progress = Callable[[int, int], None]


def run_shard_retrying(plan: Plan, phase: Phase, shard: Shard, progress: Progress | None = None, *,
                       retries: int = 2, backoff: float = 2.0) -> dict[str, Any]:
    """:func:`run_shard`, retried up to ``retries`` times when it raises :class:`RetryableError`.

    The delay before attempt ``k`` is ``backoff * 2**(k-1)`` seconds with ±50% jitter (from the
    shard name and attempt, so reruns wait alike). Other exceptions are not retried: they would
    fail the same way again.
    """
    import random

    attempt = 0
    while True:
        try:
            return run_shard(plan, phase, shard, progress)
        except RetryableError as e:
            attempt += 1
            if attempt > retries:
                raise
            delay = backoff * 2 ** (attempt - 1) * random.Random(f"{shard.name}/{attempt}").uniform(0.5, 1.5)
            logging.getLogger("curate").warning("shard %s phase %d: %s; retry %d of %d in %.1fs",
                                                shard.name, phase.index, redact(str(e)), attempt, retries, delay)
            time.sleep(delay)


def run_shard(plan: Plan, phase: Phase, shard: Shard, progress: Progress | None = None) -> dict[str, Any]:
    """Process one shard of one phase; return its stats. Raises on anything but bad records.

    An exception leaving this function carries ``curate_stage`` (the label of the stage, ``read`` or
    sink that raised it) and ``curate_input`` (the shard's input file), for the driver's message.
    """
    rd = plan.run_dir
    ctx = RunContext(plan.manifest.seed, shard, rd, phase.index, _progress=progress)
    handler = _shard_log(rd, ctx)
    started = time.perf_counter()
    try:
        ctx.log.info("shard %s (%s) phase %d: start", shard.name, shard.uri, phase.index)
        stages = plan.stages[phase.start:phase.stop]
        for stage in stages:
            stage.setup(ctx)
        # The first phase counts its input under "read"; later phases read the previous phase's
        # output, already counted, so their input counter is not kept.
        upstream = ctx.stats[READ_LABEL] if phase.index == 0 else StageStats()
        clock = _Clock()
        first = READ_LABEL if phase.index == 0 else f"phase {phase.index - 1} output"
        ids: list[np.ndarray] = []
        source = _input(plan, phase, shard, ctx)
        if phase.index == 0:
            source = _hash_ids(source, ids, plan.manifest.seed)
        batches = _instrument(source, upstream, None, clock, label=first)
        for stage in stages:
            st = ctx.stats[stage.label]
            inner = clock
            clock = _Clock()
            batches = _instrument(stage.run(batches, ctx), st, upstream, clock, inner, label=stage.label,
                                  where=(shard.name, phase.index))
            upstream = st
        outputs = _write_sinks(plan, shard, batches, ctx) if phase.last else _write_intermediate(
            plan, phase, shard, batches, ctx)
        ctx.close()
        if phase.index == 0:
            read = ctx.stats[READ_LABEL]
            read.rows_in = read.rows_out + sum(read.drops.values())
        if phase.index == 0:
            _save_ids(rd, ctx.shard_id, ids)
        stats = ctx.stats.to_dict()
        rd.write_json(rd.stats / f"{ctx.shard_id}.json", redact_obj(stats))
        faults.check("completion", shard=shard.name, phase=phase.index)
        rd.write_json(rd.completion_path(ctx.shard_id), redact_obj({
            "shard": shard.name, "key": shard.key, "phase": phase.index, "outputs": outputs,
            "seconds": round(time.perf_counter() - started, 3)}))
        ctx.log.info("shard %s phase %d: done in %.2fs", shard.name, phase.index, time.perf_counter() - started)
        return stats
    except BaseException as e:
        ctx.log.error("shard %s phase %d failed:\n%s", shard.name, phase.index, traceback.format_exc())
        ctx.abort()
        _tag(e, "curate_input", shard.uri)
        _tag(e, "curate_stage", f"writing phase {phase.index} output")
        raise
    finally:
        logging.getLogger("curate").removeHandler(handler)
        handler.close()


def _input(plan: Plan, phase: Phase, shard: Shard, ctx: RunContext) -> Iterator[pa.RecordBatch]:
    if phase.index == 0:
        return plan.reader.read(shard, ctx)
    return open_ipc(str(intermediate_path(plan.run_dir, phase.index - 1, shard)))


def _hash_ids(batches: Iterator[pa.RecordBatch], out: list[np.ndarray], seed: int) -> Iterator[pa.RecordBatch]:
    """Pass batches through, keeping a 64-bit hash of every row id (for the duplicate-id count)."""
    for batch in batches:
        if "id" in batch.schema.names:
            out.append(doc_hashes(seed, "ids", batch.column("id").to_pylist()))
        yield batch


def _save_ids(rd: RunDir, shard_id: str, ids: list[np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.sort(np.concatenate(ids)) if ids else np.empty(0, np.uint64))  # sorted: see duplicate_ids
    f = AtomicFile(rd.stats / f"ids-{shard_id}.npy")
    f.write(buf.getvalue())
    f.commit()


def duplicate_ids(rd: RunDir, budget: int = 1 << 24) -> dict[str, int]:
    """How many input rows share an id with an earlier row, and how many ids repeat (from phase 0's hashes).

    Memory stays bounded at any corpus size: each shard's hashes are saved sorted and memory-mapped
    here; the 64-bit hash space is cut into ranges holding at most ``budget`` hashes of all shards
    together (found by binary search in each file), and each range is counted alone. A range that is
    one repeated value is counted without reading it. No file descriptor stays open (a run may have
    more shards than the open-file limit). Files written unsorted by an older version are sorted in
    memory (a run directory from before this change costs its hashes' size once).
    """
    runs = []
    for path in sorted(rd.stats.glob("ids-p0-*.npy")):
        a = _mapped_npy(path)
        if len(a) and not bool(np.all(a[:-1] <= a[1:])):
            a = np.sort(a)
        if len(a):
            runs.append(a)
    rows = ids = 0
    todo = [(0, 1 << 64)]  # half-open ranges of hash values still to count
    while todo:
        lo, hi = todo.pop()
        bounds = [(_at(a, lo), _at(a, hi)) for a in runs]
        n = sum(b - a for a, b in bounds)
        if n < 2:
            continue
        if hi - lo == 1:  # one value, held n times
            rows, ids = rows + n - 1, ids + 1
        elif n > budget:
            mid = (lo + hi) // 2
            todo += [(mid, hi), (lo, mid)]
        else:
            _, counts = np.unique(np.concatenate([a[i:j] for a, (i, j) in zip(runs, bounds, strict=True)]),
                                  return_counts=True)
            repeated = counts[counts > 1]
            rows, ids = rows + int((repeated - 1).sum()), ids + len(repeated)
    return {"rows": int(rows), "ids": int(ids)}


def _mapped_npy(path) -> np.ndarray:
    """A 1-D ``.npy`` file memory-mapped read-only, its file descriptor closed (the mapping stays)."""
    with open(path, "rb") as fh:
        fmt = np.lib.format
        version = fmt.read_magic(fh)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        offset = fh.tell()
    if len(shape) != 1:
        raise ValueError(f"{path}: expected a 1-D array, found shape {shape}")
    with pa.memory_map(str(path)) as source:
        buf = source.read_buffer()
    return np.frombuffer(buf, dtype=dtype, count=shape[0], offset=offset)


def _at(sorted_hashes: np.ndarray, value: int) -> int:
    """Index of the first hash ≥ ``value`` (``value`` may be 2**64: the end)."""
    if value >= 1 << 64:
        return len(sorted_hashes)
    return int(np.searchsorted(sorted_hashes, np.uint64(value), side="left"))


def intermediate_path(rd: RunDir, phase: int, shard: Shard | str):
    name = shard if isinstance(shard, str) else shard.name
    return rd.phases / f"p{phase}" / f"{name}.arrow"


def intermediate_table(ctx: RunContext, shard: str) -> pa.Table:
    """Another shard's input to this phase, memory-mapped (for global stages that gather rows)."""
    path = intermediate_path(ctx.run_dir, ctx.phase - 1, shard)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


class _Clock:
    """Inclusive seconds spent pulling from one instrumented generator (it and all upstream)."""

    seconds = 0.0


def _tag(error: BaseException, name: str, value: str) -> None:
    """Attach ``value`` to ``error`` unless an inner frame already did (the first tag wins)."""
    if getattr(error, name, None) is None:
        with contextlib.suppress(AttributeError):  # a built-in exception type that takes no attributes
            setattr(error, name, value)


def _instrument(batches: Iterator[pa.RecordBatch], st: StageStats, upstream: StageStats | None,
                clock: _Clock, inner: _Clock | None = None, *, label: str = "", where=None):
    """Count rows in/out, tokens and Arrow bytes, and the seconds spent in this stage alone.

    An exception raised by this generator's source (and not by an earlier stage) is tagged with
    ``label`` as ``curate_stage``.
    """
    it = iter(batches)
    n_batches = 0

    def spent(t0: float, up0: float) -> float:
        total = time.perf_counter() - t0
        clock.seconds += total
        return total - ((inner.seconds - up0) if inner is not None else 0.0)

    while True:
        t0, up0 = time.perf_counter(), (inner.seconds if inner is not None else 0.0)
        try:
            batch = next(it)
        except StopIteration:
            st.seconds += spent(t0, up0)
            break
        except BaseException as e:
            _tag(e, "curate_stage", label)
            raise
        st.seconds += spent(t0, up0)
        n_batches += 1
        if where is not None:
            try:
                faults.check("stage", shard=where[0], phase=where[1], label=label, count=n_batches)
            except BaseException as e:
                _tag(e, "curate_stage", label)
                raise
        st.rows_out += batch.num_rows
        st.bytes_out += batch.nbytes
        st.tokens_out += _tokens(batch)
        if upstream is not None:
            st.rows_in = upstream.rows_out
        yield batch
    if upstream is not None:
        st.rows_in = upstream.rows_out


def _write_sinks(plan: Plan, shard: Shard, batches, ctx: RunContext) -> dict[str, Any]:
    writers = [sink.writer(shard.name) for sink in plan.sinks]
    labels = [sink.label for sink in plan.sinks]
    schema = None
    n_batches = 0
    try:
        for batch in batches:
            schema = schema or batch.schema
            for w, label in zip(writers, labels):
                t0 = time.perf_counter()
                try:
                    w.write(batch)
                except BaseException as e:
                    _tag(e, "curate_stage", label)
                    raise
                st = ctx.stats[label]
                st.seconds += time.perf_counter() - t0
                st.rows_in += batch.num_rows
            ctx.report(batch.num_rows, _tokens(batch))
            n_batches += 1
            faults.check("sink", shard=shard.name, phase=ctx.phase, count=n_batches)
        outputs = {}
        for w, label in zip(writers, labels):
            t0 = time.perf_counter()
            try:
                files = w.close()
            except BaseException as e:
                _tag(e, "curate_stage", label)
                raise
            st = ctx.stats[label]
            st.seconds += time.perf_counter() - t0
            st.rows_out = sum(f["samples"] for f in files)
            st.bytes_out = sum(f["bytes"] for f in files)
            outputs[label] = files
        return {"sinks": outputs, "columns": schema.names if schema is not None else None}
    except BaseException:
        for w in writers:
            w.abort()
        raise


def _write_intermediate(plan: Plan, phase: Phase, shard: Shard, batches, ctx: RunContext) -> dict[str, Any]:
    """Write the phase's output for the next phase, letting the next global stage observe it."""
    nxt = plan.phases[phase.index + 1]
    observer = plan.stages[nxt.global_stage]
    observer.setup(ctx)
    partial = ShardPartial()  # this shard's alone: dropped with it if anything below fails
    observed = ctx.stats[observer.label]
    fh = AtomicFile(intermediate_path(plan.run_dir, phase.index, shard))
    writer = None
    rows = n_observed = 0
    try:
        for batch in batches:
            if writer is None:
                writer = pa.ipc.new_file(fh.stream(), batch.schema)
            writer.write_batch(batch)
            t0 = time.perf_counter()
            try:
                observer.observe(batch, ctx, partial)
            except BaseException as e:
                _tag(e, "curate_stage", f"{observer.label} (observe)")
                raise
            observed.seconds += time.perf_counter() - t0
            n_observed += 1
            faults.check("observe", shard=shard.name, phase=phase.index, label=observer.label,
                         count=n_observed)
            rows += batch.num_rows
            ctx.report(batch.num_rows, _tokens(batch))
        if writer is None:  # an empty shard still needs a readable (empty) file
            writer = pa.ipc.new_file(fh.stream(), pa.schema([]))
        writer.close()
        fh.commit()
    except BaseException:
        fh.abort()
        raise
    table = partial.table()
    path = plan.run_dir.global_dir / observer.label / f"{ctx.shard_id}.arrow"
    if table is None:
        path.unlink(missing_ok=True)
    else:
        pf = AtomicFile(path)
        try:
            with pa.ipc.new_file(pf, table.schema) as w:
                w.write_table(table)
            pf.commit()
        except BaseException:
            pf.abort()
            raise
    return {"intermediate": fh.path.name, "rows": rows}


def _tokens(batch: pa.RecordBatch) -> int:
    if "n_tokens" in batch.schema.names:
        return int(pc.sum(batch.column("n_tokens")).as_py() or 0)
    return 0


class RedactingFormatter(logging.Formatter):
    """Formats a record (tracebacks included), then masks secrets and URL credentials in the text."""

    def format(self, record: logging.LogRecord) -> str:
        from curate.secrets import redact

        return redact(super().format(record))


def log_handler(path) -> logging.Handler:
    """A file handler on the ``curate`` logger whose every line goes through :func:`curate.secrets.redact`."""
    handler = logging.FileHandler(path, mode="a" if path.name == "run.log" else "w", encoding="utf-8")
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("curate")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def _shard_log(rd: RunDir, ctx: RunContext) -> logging.Handler:
    rd.logs.mkdir(parents=True, exist_ok=True)
    return log_handler(rd.logs / f"{ctx.shard_id}.log")

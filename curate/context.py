"""The per-shard run context a stage receives: seeds, stats, failures, quarantine, global state."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa

from curate import seeds
from curate.secrets import redact_obj
from curate.stats import ShardStats

if TYPE_CHECKING:
    from curate.readers.base import Shard
    from curate.rundir import RunDir

#: Stats label under which readers count their bad records.
READ_LABEL = "read"
_TOKENIZERS: dict = {}
#: Combined global tables (or row ranges of them) as contiguous columns, per process, keyed by file
#: path, size, mtime and range; the most recently read last.
_GLOBAL_COLUMNS: dict = {}
_GLOBAL_KEEP = 8
_GLOBAL_LOCK = threading.Lock()


@dataclass
class RunContext:
    """Everything a stage may touch while it processes one shard of one phase.

    ``failure`` and ``quarantine`` write under temporary names; :meth:`close` renames them into place,
    so a killed shard leaves nothing that a rerun would mistake for finished output.
    """

    seed: int
    shard: Shard
    run_dir: RunDir
    phase: int = 0
    stats: ShardStats = field(default_factory=ShardStats)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("curate"))
    _failures: Any = None
    _quarantine: dict[str, Any] = field(default_factory=dict)
    _global: dict[str, Any] = field(default_factory=dict)
    _progress: Any = None

    @property
    def shard_id(self) -> str:
        return f"p{self.phase}-{self.shard.name}"

    def rng(self, stage: str, shard_key: str | None = None) -> np.random.Generator:
        """A generator seeded by a stable digest of (manifest seed, stage, shard content key)."""
        return seeds.rng(self.seed, stage, shard_key if shard_key is not None else self.shard.key)

    def failure(self, reason: str, detail: str = "", *, file: str | None = None, line: int | None = None,
                record: str | bytes | None = None, stage: str | None = None, offset: int | None = None,
                lost: int | None = None, dropped: bool = False) -> None:
        """Record one bad input record in ``failures/`` and count it under ``read`` drops.

        With ``stage``, the record is part of a row that stage keeps (an undecodable image in a
        document): it is counted as that stage's metric ``reason`` instead of as a dropped row. With
        ``stage`` and ``dropped``, the stage dropped the row: it counts as that stage's drop ``reason``.

        A damaged file (``truncated_input``, ``corrupt_input``, ``unreadable_file``) also gives
        ``offset`` (the byte where reading stopped; None when unknown) and ``lost`` (records known lost,
        at least; None when unknown): both then appear in the entry, and the drop counts ``lost``
        records (at least 1).
        """
        if stage is None:
            self.stats[READ_LABEL].drop(reason, max(lost or 1, 1))
        elif dropped:
            self.stats[stage].drop(reason)
        else:
            self.stats[stage].metric(reason).add_many(1, 1, 1, 1)
        if self._failures is None:
            self._failures = self.run_dir.open_temp(self.run_dir.failures / f"{self.shard_id}.jsonl")
        if isinstance(record, bytes):
            record = record[:2000].decode("utf-8", errors="backslashreplace")
        entry = {"file": file, "line": line, "reason": reason, "detail": detail,
                 "record": record[:2000] if record else None}
        damaged_file = reason in ("truncated_input", "corrupt_input", "unreadable_file")
        if damaged_file or offset is not None or lost is not None:
            entry.update(offset=offset, lost=lost)
        self._failures.write(orjson.dumps(redact_obj(entry)) + b"\n")

    def quarantine(self, label: str, rows: pa.RecordBatch) -> None:
        """Append rejected rows (with their ``drop_reason``) to ``quarantine/<label>/<shard>.parquet``."""
        import pyarrow.parquet as pq

        writer = self._quarantine.get(label)
        if writer is None:
            path = self.run_dir.quarantine / label / f"{self.shard_id}.parquet"
            fh = self.run_dir.open_temp(path)
            writer = self._quarantine[label] = (pq.ParquetWriter(fh.stream(), rows.schema), fh)
        writer[0].write_batch(rows)

    def global_state(self, label: str) -> dict[str, Any]:
        """The combined state of global stage ``label`` (loaded once per process)."""
        if label not in self._global:
            self._global[label] = self.run_dir.read_global_state(label)
        return self._global[label]

    @property
    def tokenizer(self):
        """The run tokenizer (prepared by the driver in ``RUN/tokenizer/``), loaded once per process."""
        from curate.tokenizer import CurateTokenizer

        folder = self.run_dir.root / "tokenizer"
        key = (str(folder), (folder / "tokenizer.json").stat().st_mtime_ns)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = CurateTokenizer.load_run(folder)
        return _TOKENIZERS[key]

    def global_table(self, label: str, name: str) -> pa.Table:
        """A table a global stage's ``combine`` returned under ``_tables`` (memory-mapped)."""
        path = self.run_dir.global_dir / label / f"{name}.arrow"
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()

    def global_columns(self, label: str, name: str, rows: tuple[int, int] | None = None) -> dict[str, pa.Array]:
        """:meth:`global_table` (or its rows ``[start, stop)``) as one contiguous array per column.

        Read once per process and range: the table is memory-mapped and only the rows asked for are
        copied. The cache is keyed by the file's path, size and modification time, never by the stage
        object, so a worker that serves many shards (or a new run in the same process) reads what is on
        disk; it holds the last few ranges read (shards running side by side in threads), not every
        shard a worker ever ran.
        """
        path = self.run_dir.global_dir / label / f"{name}.arrow"
        st = path.stat()
        file_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        key = (*file_key, rows)
        columns = _GLOBAL_COLUMNS.get(key)
        if columns is None:
            table = self.global_table(label, name)
            if rows is not None:
                table = table.slice(rows[0], rows[1] - rows[0])
            table = table.combine_chunks()
            columns = {c: (table.column(c).chunk(0) if table.column(c).num_chunks else
                           pa.array([], table.schema.field(c).type)) for c in table.column_names}
            with _GLOBAL_LOCK:  # shards may run side by side in threads (Dask workers)
                for old in [k for k in _GLOBAL_COLUMNS if k[0] == file_key[0] and k[:3] != file_key]:
                    del _GLOBAL_COLUMNS[old]  # the file was written again (a new run in this process)
                while len(_GLOBAL_COLUMNS) >= _GLOBAL_KEEP:  # the least recently read goes first
                    del _GLOBAL_COLUMNS[next(iter(_GLOBAL_COLUMNS))]
                _GLOBAL_COLUMNS[key] = columns
        else:
            with _GLOBAL_LOCK:
                _GLOBAL_COLUMNS.pop(key, None)
                _GLOBAL_COLUMNS[key] = columns
        return columns

    def report(self, rows: int, tokens: int = 0) -> None:
        """Tell the progress display about rows (and tokens) written."""
        if self._progress is not None:
            self._progress(rows, tokens)

    def abort(self) -> None:
        """Drop the failure and quarantine files of a shard that failed (a rerun writes them again)."""
        if self._failures is not None:
            self._failures.abort()
            self._failures = None
        for writer, fh in self._quarantine.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away; its writer may be broken
                self.log.debug("closing a quarantine writer of a failed shard", exc_info=True)
            fh.abort()
        self._quarantine.clear()

    def close(self) -> None:
        """Rename the failure and quarantine files into place."""
        if self._failures is not None:
            self._failures.commit()
            self._failures = None
        for writer, fh in self._quarantine.values():
            writer.close()
            fh.commit()
        self._quarantine.clear()

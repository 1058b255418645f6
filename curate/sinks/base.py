"""The shard writer owns sizing, temporary names, hashing and renaming; a format only encodes.

Output files are named ``<shard>-<part>.<ext>`` after the input shard that produced them, so a shard
rerun after a kill rewrites exactly its own files, and the same manifest gives the same names and
bytes whatever the number of workers. A file is closed when it reaches ``shard_bytes`` or
``shard_samples``; it is written as ``.tmp-<name>`` and renamed when complete. ``index.json`` (names,
sample counts, bytes, sha256) is written last, by :func:`write_index`, when every shard is done.

A sink's folder is ``<run directory>/<path>`` (default ``<kind>``); ``path`` is checked when the manifest
is validated and never leaves the run directory (:func:`curate.sinks.paths.check_sink_path`). With
``partition_by``, each value's rows go to their own folder ``<column>_<encoded value>/`` directly inside
the sink folder (:func:`curate.sinks.paths.partition_folder`); ``index.json`` keeps each folder's
original value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pyarrow as pa
from pydantic import ByteSize, Field, field_validator

from curate.rundir import TMP_PREFIX, AtomicFile
from curate.schema import json_default
from curate.secrets import redact_obj
from curate.sinks.paths import check_sink_path, encode_component, json_value, partition_folder
from curate.stage import StageParams


class SinkParams(StageParams):
    path: str | None = Field(None, description="output folder, relative to the run directory; default <kind>")
    shard_bytes: ByteSize = Field(ByteSize(256_000_000), description="close a file at about this size")
    shard_samples: int | None = Field(None, gt=0, description="close a file at this many samples")
    partition_by: str | None = Field(None, description="write one folder per value of this column (`<column>_<value>/`)")

    @field_validator("path")
    @classmethod
    def _inside_run_directory(cls, value: str | None) -> str | None:
        """A relative folder inside the run directory, normalized; see ``check_sink_path``."""
        return None if value is None else check_sink_path(value)

    @field_validator("partition_by")
    @classmethod
    def _a_column_name(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("must name a column")
        return value


def dumps_rows(rows: list[dict], kind: str, schema: pa.Schema | None = None, option: int = 0) -> list[bytes]:
    """Each row as JSON bytes (see :func:`json_default`); a value JSON cannot hold (a decimal, a
    duration) is a TypeError naming the sink, the column and its type."""
    try:
        return [orjson.dumps(row, default=json_default, option=option) for row in rows]
    except TypeError as e:
        for row in rows:
            for column, value in row.items():
                try:
                    orjson.dumps(value, default=json_default)
                except TypeError:
                    arrow = f" ({schema.field(column).type})" if schema is not None and column in schema.names else ""
                    raise TypeError(f"{kind} sink: column {column!r}{arrow} holds a {type(value).__name__} value, "
                                    f"which has no JSON form ({e}); cast the column (to a string or a float) "
                                    "before the sink, or write Parquet or Arrow") from None
        raise


def pyarrow_sink(fh):
    """What a pyarrow writer should write into: an :class:`AtomicFile`'s native stream (no GIL taken
    per page), or ``fh`` itself (an in-memory pyarrow buffer, a plain file object)."""
    stream = getattr(fh, "stream", None)
    return stream() if stream is not None else fh


class Encoder(ABC):
    """Encodes batches into one open file. Subclasses implement ``write`` and ``close``."""

    def __init__(self, fh: AtomicFile, schema: pa.Schema, params: SinkParams):
        self.fh, self.schema, self.params = fh, schema, params

    @abstractmethod
    def write(self, batch: pa.RecordBatch) -> None:
        """Encode one batch into the open file."""

    def write_many(self, batches: list[pa.RecordBatch]) -> None:
        """Encode one flush of buffered batches (Parquet makes them one row group)."""
        for batch in batches:
            self.write(batch)

    def close(self) -> None:
        """Finish the file (footer, end-of-archive); the writer then renames it."""


class Sink:
    """A registered output format: an extension, an :class:`Encoder`, and how much to buffer."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[SinkParams]] = SinkParams
    extension: ClassVar[str] = ""
    encoder: ClassVar[type[Encoder]] = Encoder
    #: Batches are gathered up to this many bytes before they are encoded (row-group size).
    buffer_bytes: ClassVar[int] = 8 << 20

    def __init__(self, params: SinkParams, output_root: str | Path):
        self.params = params
        # default <output>/<kind>; a relative path is taken inside the run directory
        self.directory = Path(output_root) / (params.path or self.kind)

    @property
    def label(self) -> str:
        """The stats label of this sink, ``sink:<folder name>``."""
        return f"sink:{self.directory.name}"

    def writer(self, shard_name: str) -> ShardWriter | PartitionedWriter:
        if self.params.partition_by:
            return PartitionedWriter(self, shard_name)
        return ShardWriter(self, shard_name)


class ShardWriter:
    """Writes one input shard's output as one or more sized files; :meth:`close` returns their entries."""

    def __init__(self, sink: Sink, shard_name: str, directory: Path | None = None):
        self.sink, self.prefix = sink, shard_name
        self.directory = directory or sink.directory
        self.directory.mkdir(parents=True, exist_ok=True)
        _remove_previous(self.directory, shard_name, sink.extension)
        self.files: list[dict[str, Any]] = []
        self.buffer: list[pa.RecordBatch] = []
        self.buffered_bytes = 0
        self.current: tuple[AtomicFile, Encoder] | None = None
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        limit = self.sink.params.shard_samples
        while limit and self.rows + self._buffered_rows() + batch.num_rows > limit:
            room = limit - self.rows - self._buffered_rows()
            if room > 0:
                self._buffer(batch.slice(0, room))
                batch = batch.slice(room)
            self._flush()
            self._roll()
        if batch.num_rows:
            self._buffer(batch)
        if self.buffered_bytes >= min(self.sink.buffer_bytes, max(1, self.sink.params.shard_bytes // 8)):
            self._flush()
            if self.current and self.current[0].size >= self.sink.params.shard_bytes:
                self._roll()

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self._roll()
        return self.files

    def abort(self) -> None:
        if self.current:
            self.current[0].abort()
            self.current = None

    # ------------------------------------------------------------------ internals
    def _buffered_rows(self) -> int:
        return sum(b.num_rows for b in self.buffer)

    def _buffer(self, batch: pa.RecordBatch) -> None:
        self.buffer.append(batch)
        self.buffered_bytes += batch.nbytes

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.current is None:
            name = f"{self.prefix}-{len(self.files):04d}.{self.sink.extension}"
            fh = AtomicFile(self.directory / name)
            try:
                encoder = self.sink.encoder(fh, self.buffer[0].schema, self.sink.params)
            except BaseException:
                fh.abort()  # not yet ours to abort later: self.current is not set
                raise
            self.current = (fh, encoder)
        encoder = self.current[1]
        encoder.write_many(_unify(self.buffer, encoder.schema))
        self.rows += self._buffered_rows()
        self.buffer, self.buffered_bytes = [], 0

    def _roll(self) -> None:
        if self.current is None:
            return
        fh, encoder = self.current
        encoder.close()
        fh.commit()
        self.files.append({"name": fh.path.name, "samples": self.rows, "bytes": fh.size, "sha256": fh.sha256})
        self.current, self.rows = None, 0


class PartitionedWriter:
    """One :class:`ShardWriter` per value of ``partition_by``, in folders ``<column>_<value>/`` named by
    :func:`~curate.sinks.paths.partition_folder` (every value encoded: nothing is written outside the
    sink folder). Rows are grouped by folder name, so NaN values share one folder and keep their rows.
    :meth:`close` returns entries named ``<folder>/<file>`` with a ``partition`` key (column, original
    value as :func:`~curate.sinks.paths.json_value` gives it, Arrow type) for :func:`write_index`."""

    def __init__(self, sink: Sink, shard_name: str):
        import glob

        self.sink, self.prefix, self.column = sink, shard_name, sink.params.partition_by
        self.writers: dict[str, ShardWriter] = {}
        self.values: dict[str, Any] = {}
        self.type: str | None = None
        if sink.directory.is_dir():
            column = glob.escape(encode_component(self.column, fold_case=False))
            for folder in sink.directory.glob(column + "_*"):
                if folder.is_dir():
                    _remove_previous(folder, shard_name, sink.extension)

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self.column not in batch.schema.names:
            raise KeyError(f"partition_by: no column {self.column!r} in {batch.schema.names}")
        col = batch.column(self.column)
        if pa.types.is_nested(col.type):
            raise TypeError(f"partition_by: column {self.column!r} is a {col.type}; "
                            "a partition column holds strings, numbers, booleans or dates")
        self.type = str(col.type)
        folders: dict[Any, str] = {}
        rows: dict[str, list[int]] = {}
        for i, value in enumerate(col.to_pylist()):
            # cache only where equal values have equal text (0.0 == -0.0, Decimal("1") == Decimal("1.0"))
            key = (type(value), value) if value is None or isinstance(value, (str, bytes, int)) else None
            folder = folders.get(key) if key is not None else None
            if folder is None:
                folder = partition_folder(self.column, value)
                if key is not None:
                    folders[key] = folder
                self.values.setdefault(folder, json_value(value))
            rows.setdefault(folder, []).append(i)
        for folder in sorted(rows):
            part = batch if len(rows) == 1 else batch.take(pa.array(rows[folder], pa.int64()))
            writer = self.writers.get(folder)
            if writer is None:
                writer = ShardWriter(self.sink, self.prefix, self.sink.directory / folder)
                self.writers[folder] = writer
            writer.write(part)

    def close(self) -> list[dict[str, Any]]:
        files = []
        for folder in sorted(self.writers):
            partition = {"column": self.column, "value": self.values[folder], "type": self.type}
            for f in self.writers[folder].close():
                files.append({**f, "name": f"{folder}/{f['name']}", "partition": partition})
        return files

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def _unify(batches: list[pa.RecordBatch], schema: pa.Schema) -> list[pa.RecordBatch]:
    """Cast batches to the file's schema (a scores struct may gain fields batch to batch)."""
    out = []
    for b in batches:
        if not b.schema.equals(schema):
            b = pa.RecordBatch.from_arrays([b.column(n).cast(f.type) for n, f in zip(schema.names, schema)],
                                           schema=schema)
        out.append(b)
    return out


def _remove_previous(directory: Path, prefix: str, extension: str) -> None:
    """Delete what an interrupted attempt at this shard left (finished parts and temporaries)."""
    for p in directory.glob(f"{prefix}-*.{extension}"):
        p.unlink()
    for p in directory.glob(f"{TMP_PREFIX}{prefix}-*.{extension}"):
        p.unlink()


def write_index(sink: Sink, entries: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """Write ``index.json`` for ``sink`` (the commit point of the output) and return it.

    ``entries`` are the writers' file entries (``name``, ``samples``, ``bytes``, ``sha256``; a
    partitioned sink's also carry ``partition``). With ``partition_by``, each folder also gets its own
    ``index.json``, and the top-level one maps folder → ``{"value": original value, "type": Arrow type,
    "samples", "bytes"}`` (``value`` absent for entries written before values were recorded). Column
    names pass through :func:`curate.secrets.redact_obj`; file names and partition values do not: they
    are row data, written as they are (like the rows), and must match the folders.
    """
    entries = sorted(entries, key=lambda e: e["name"])
    partitions: dict[str, dict[str, Any]] = {}
    for e in entries:
        if "partition" in e:
            partitions.setdefault(e["name"].partition("/")[0], e["partition"])
    entries = [{k: v for k, v in e.items() if k != "partition"} for e in entries]
    columns = redact_obj(list(columns))
    index = {
        "format": sink.kind,
        "shards": entries,
        "total_samples": sum(e["samples"] for e in entries),
        "total_bytes": sum(e["bytes"] for e in entries),
        "columns": columns,
    }
    if sink.params.partition_by:  # each partition folder is a self-contained output too
        groups: dict[str, list[dict[str, Any]]] = {}
        for e in entries:
            folder, _, name = e["name"].partition("/")
            groups.setdefault(folder, []).append({**e, "name": name})
        index["partitions"] = {}
        for folder, part in sorted(groups.items()):
            sub = {"format": sink.kind, "shards": part, "total_samples": sum(e["samples"] for e in part),
                   "total_bytes": sum(e["bytes"] for e in part), "columns": columns}
            info: dict[str, Any] = {}
            if folder in partitions:
                info = {"value": partitions[folder].get("value"), "type": partitions[folder].get("type")}
            index["partitions"][folder] = {**info, "samples": sub["total_samples"],
                                           "bytes": sub["total_bytes"]}
            _write_json(sink.directory / folder / "index.json", sub)
    _write_json(sink.directory / "index.json", index)
    return index


def _write_json(path: Path, obj: Any) -> None:
    f = AtomicFile(path)
    f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    f.commit()

"""``curate compact RUN_DIR``: a finished output rewritten into files of a target size.

A run names its output files after the input shards that produced them, so many small inputs give many
small files. Compaction reads a finished sink (its ``index.json``) and writes the same rows, in the
same order, into ``RUN/compacted/<sink folder>/``: per partition folder (``partition_by``, e.g. one per
length bucket) a run of files ``part-00000.<ext>``, ``part-00001.<ext>`` … each closed before it would
pass the target size (Parquet, Arrow and JSONL: ``500MB`` by default; WebDataset: ``1GB``) or the
target sample count. The original output is only read, never changed.

**Same bytes every time.** Rows are taken in ``index.json`` order and written in units of a fixed
number of rows counted from the start of each output file (the unit size comes from the index's
average row size), so where a file ends depends only on the rows, never on how the inputs were
batched or where an earlier attempt stopped. Files are written as ``.tmp-<name>`` and renamed when
complete; WebDataset samples are copied member by member with their original (fixed) tar headers, JSONL
lines byte for byte, Parquet and Arrow batches through the sink's own encoder with its settings.

**Resumable.** After each completed file, ``.compact-state.json`` records the files written and how
many rows of the group they hold. A rerun after a kill keeps those files, removes anything else in the
group's folder, and goes on from that row; it refuses nothing and writes the same bytes an uninterrupted
compaction writes. ``index.json`` is written last (per folder and at the top, in the sink's own index
format, plus a ``compacted_from`` record); when it exists and the state matches, a rerun does nothing.
A change of target, or a changed source ``index.json``, starts that sink's compaction over, and so does
a compacted file gone missing or changed in size. One compaction works on a run directory at a time
(``RUN/compacted/.lock``; a lock left by a killed process is taken over).

**Damaged sources are refused**, never compacted into a shorter output. Every file the index lists
must exist with the size it records (checked before anything is written) and decode to its end: a
JSONL file ends with a newline and its gzip/zstd stream is complete, a tar has its end-of-archive
blocks after the last member, Parquet and Arrow files open and read. Each group must hold exactly the
rows its index entries count. Otherwise a :class:`~curate.errors.ConfigError` names the file (or the
group) and no ``index.json`` is written. Compressed JSONL is flushed after each unit of rows, so its
size is known while the file is written (the lines decompress to the same bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from curate import faults
from curate.errors import ConfigError
from curate.run_outputs import SinkOutput, finished_outputs
from curate.rundir import TMP_PREFIX, AtomicFile

#: Default target size per output kind, in bytes.
DEFAULT_TARGET = {"webdataset": 1_000_000_000}
DEFAULT_TARGET_OTHER = 500_000_000
STATE = ".compact-state.json"
FOLDER = "compacted"
_TAR_BLOCK, _TAR_RECORD = 512, 10240


@dataclass(frozen=True)
class CompactResult:
    """What :func:`compact` did for one sink."""

    label: str
    directory: Path
    files_in: int
    files_out: int
    samples: int
    bytes: int
    skipped: bool  # already compacted with the same settings


def compact(run_dir: str | Path, *, sink: str | None = None, target_bytes: int | None = None,
            target_samples: int | None = None, notice: Callable[[str], None] | None = None) -> list[CompactResult]:
    """Compact every sink of the finished run at ``run_dir`` (or the one whose folder name or label is
    ``sink``) into ``RUN/compacted/<folder>/``; see the module docstring for the contract."""
    outputs = finished_outputs(run_dir)
    if sink is not None:
        chosen = [o for o in outputs if sink in (o.label, o.directory.name)] or [o for o in outputs if o.kind == sink]
        if not chosen:
            raise ConfigError(f"no sink {sink!r} in {run_dir} (sinks: "
                              f"{', '.join(o.directory.name for o in outputs)})")
        if len(chosen) > 1:
            raise ConfigError(f"{run_dir} has {len(chosen)} {sink} sinks ({', '.join(o.directory.name for o in chosen)}); "
                              "name one by its folder")
        outputs = chosen
    if target_bytes is not None and target_bytes <= 0:
        raise ConfigError("--target-bytes must be positive")
    if target_samples is not None and target_samples <= 0:
        raise ConfigError("--target-samples must be positive")
    from curate.lock import FileLock

    command = "curate compact " + str(run_dir)
    # one compaction per run directory at a time (a second one would remove the first one's files)
    try:
        with FileLock(Path(run_dir) / FOLDER / ".lock", command=command, mode="compact", notice=notice):
            return [_compact_sink(Path(run_dir), o, target_bytes, target_samples, notice or (lambda m: None))
                    for o in outputs]
    finally:
        with contextlib.suppress(OSError):  # the lock's folder, when nothing was compacted into it
            (Path(run_dir) / FOLDER).rmdir()


def _state_files_present(dest: Path, state: dict[str, Any]) -> bool:
    """Every file the progress record lists is there with the size it records."""
    return all(_has_size((dest / group / f["name"]) if group else (dest / f["name"]), f["bytes"])
               for group, done in state.get("groups", {}).items() for f in done.get("files", []))


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def compacted_directory(run_dir: str | Path, output: SinkOutput) -> Path:
    """Where :func:`compact` writes ``output``: ``RUN/compacted/<sink folder path>``."""
    return Path(run_dir) / FOLDER / output.directory.relative_to(Path(run_dir))


def _compact_sink(run_dir: Path, output: SinkOutput, target_bytes: int | None, target_samples: int | None,
                  notice: Callable[[str], None]) -> CompactResult:
    target = int(target_bytes or DEFAULT_TARGET.get(output.kind, DEFAULT_TARGET_OTHER))
    dest = compacted_directory(run_dir, output)
    source_digest = hashlib.sha256((output.directory / "index.json").read_bytes()).hexdigest()
    settings = {"source_index_sha256": source_digest, "target_bytes": target, "target_samples": target_samples,
                "kind": output.kind}
    state = _read_state(dest)
    if state is not None and state.get("settings") != settings:
        notice(f"{dest}: settings or source changed since the last compaction; starting it over")
        shutil.rmtree(dest)
        state = None
    if state is not None and state.get("complete") and (dest / "index.json").is_file():
        index = orjson.loads((dest / "index.json").read_bytes())
        missing = [e["name"] for e in index["shards"] if not _has_size(dest / e["name"], e["bytes"])]
        if not missing:
            return CompactResult(output.label, dest, len(output.index["shards"]), len(index["shards"]),
                                 index["total_samples"], index["total_bytes"], True)
        notice(f"{dest}: {len(missing)} compacted file(s) missing or changed ({missing[0]} …); compacting again")
        shutil.rmtree(dest)
        state = None
    if state is not None and not _state_files_present(dest, state):
        notice(f"{dest}: a compacted file recorded as finished is missing or changed; compacting again")
        shutil.rmtree(dest)
        state = None
    if state is None:
        if dest.exists():  # not ours, or from before a state was written: nothing in it is trusted
            shutil.rmtree(dest)
        state = {"settings": settings, "groups": {}, "complete": False}
    groups = output.groups()
    check_sources(output, groups)
    dest.mkdir(parents=True, exist_ok=True)
    from curate.plugins import kinds_of

    sink_class = kinds_of("sink")[output.kind]  # once: each lookup scans the installed entry points
    codec = _codec(output, sink_class)
    for group, entries in groups.items():
        done = state["groups"].setdefault(group, {"files": [], "rows": 0, "complete": False})
        folder = dest / group if group else dest
        _clean_group(folder, {f["name"] for f in done["files"]}, codec.extension)
        if done["complete"]:
            continue
        rows_in = sum(e["samples"] for e in entries)
        group_bytes = sum(e["bytes"] for e in entries)
        files = [(output.directory / group / e["name"]) if group else (output.directory / e["name"]) for e in entries]
        stream = _skip(_read_ahead(codec.read(files)), done["rows"])
        unit = codec.unit_rows(group_bytes, rows_in, target)
        while done["rows"] < rows_in:
            name = f"part-{len(done['files']):05d}.{codec.extension}"
            entry = _write_file(codec, stream, folder / name, unit, target, target_samples,
                                rows_in - done["rows"])
            if entry["samples"] == 0:  # the index promised more rows than the files hold
                raise ConfigError(f"{output.directory}: index.json lists {rows_in} rows in {group or 'the sink'}, "
                                  f"the files hold {done['rows']}; the output is damaged")
            faults.check("compact_file", label=output.directory.name, count=len(done["files"]) + 1)
            done["files"].append(entry)
            done["rows"] += entry["samples"]
            _write_state(dest, state)
        if done["rows"] != rows_in:
            raise ConfigError(f"{output.directory}: {group or 'the sink'} holds {done['rows']} rows, "
                              f"index.json says {rows_in}; the output is damaged")
        leftover = next(stream, None)
        if leftover is not None and codec.rows(leftover):
            raise ConfigError(f"{output.directory}: {group or 'the sink'} holds more rows than index.json's {rows_in}")
        done["complete"] = True
        _write_state(dest, state)
    index = _write_indexes(output, dest, state, sink_class)
    state["complete"] = True
    _write_state(dest, state)
    return CompactResult(output.label, dest, len(output.index["shards"]), len(index["shards"]),
                         index["total_samples"], index["total_bytes"], False)


# ------------------------------------------------------------------------------------ writing
def _write_file(codec: _Codec, stream: Iterator[Any], path: Path, unit: int, target: int,
                target_samples: int | None, remaining: int) -> dict[str, Any]:
    """Fill one output file from ``stream`` in units of ``unit`` rows; close it before it would pass
    ``target`` bytes or ``target_samples`` rows (a first unit always goes in), and after ``remaining``
    rows (what the index says is left: rows past it stay in the stream, to be reported). A file that
    would hold no row is not written."""
    fh = AtomicFile(path)
    writer = codec.writer(fh)
    rows, last_unit_bytes = 0, 0
    try:
        while True:
            want = min(unit, remaining - rows) if target_samples is None else min(unit, target_samples - rows,
                                                                                  remaining - rows)
            if want <= 0:
                break
            chunk = _take(stream, want, codec)
            if chunk is None:
                break
            n = codec.rows(chunk)
            if rows and codec.would_pass(writer, chunk, last_unit_bytes, target):
                stream.send_back(chunk)  # type: ignore[attr-defined]
                break
            before = fh.size
            writer.write(chunk)
            last_unit_bytes = max(fh.size - before, codec.estimate(chunk))
            rows += n
            if codec.full(writer, target):
                break
        writer.close()
        if rows == 0:
            fh.abort()
            return {"name": path.name, "samples": 0, "bytes": 0, "sha256": ""}
        fh.commit()
    except BaseException:
        if not fh.closed:  # finish the encoder first: a tar or Parquet writer left open writes on collection
            with suppress(Exception):
                writer.close()
        fh.abort()
        raise
    return {"name": path.name, "samples": rows, "bytes": fh.size, "sha256": fh.sha256}


class _Pushback:
    """An iterator of chunks with room to put one back."""

    def __init__(self, it: Iterator[Any]):
        self.it, self.back = it, []

    def __iter__(self):
        return self

    def __next__(self):
        return self.back.pop() if self.back else next(self.it)

    def send_back(self, chunk: Any) -> None:
        self.back.append(chunk)


def _read_ahead(chunks: Iterator[Any], depth: int = 4) -> Iterator[Any]:
    """``chunks`` read by a thread of its own, up to ``depth`` ahead, in order: reading and decoding the
    next chunks (pyarrow, zstd and tarfile reads release the GIL) overlaps with encoding this one. An
    error in the reader is raised here, where the chunk would have come; closing this generator stops
    the reader."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Raised(e))

    thread = threading.Thread(target=work, name="compact-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def _skip(chunks: Iterator[Any], rows: int) -> _Pushback:
    """``chunks`` without their first ``rows`` rows."""
    stream = _Pushback(chunks)
    while rows > 0:
        chunk = next(stream, None)
        if chunk is None:
            break
        if len(chunk) <= rows:  # a record batch's len() is its row count, a list's its items
            rows -= len(chunk)
            continue
        stream.send_back(chunk.slice(rows) if isinstance(chunk, pa.RecordBatch) else chunk[rows:])
        rows = 0
    return stream


def _take(stream: _Pushback, want: int, codec: _Codec) -> Any | None:
    """Exactly ``want`` rows from the stream (fewer at its end), as one chunk; None when it is empty."""
    parts, have = [], 0
    while have < want:
        chunk = next(stream, None)
        if chunk is None:
            break
        n = codec.rows(chunk)
        if have + n > want:
            cut = want - have
            head = chunk.slice(0, cut) if isinstance(chunk, pa.RecordBatch) else chunk[:cut]
            tail = chunk.slice(cut) if isinstance(chunk, pa.RecordBatch) else chunk[cut:]
            stream.send_back(tail)
            chunk, n = head, cut
        parts.append(chunk)
        have += n
    if not parts:
        return None
    return codec.join(parts)


def check_sources(output: SinkOutput, groups: dict[str, list[dict[str, Any]]]) -> None:
    """Every file the index lists is there, with the size it records; else nothing is written (a cut
    file would give a silently shorter output)."""
    for group, entries in groups.items():
        for e in entries:
            path = output.directory / group / e["name"] if group else output.directory / e["name"]
            try:
                size = path.stat().st_size
            except OSError as err:
                raise ConfigError(f"{path}: listed in {output.directory}/index.json but cannot be read "
                                  f"({err.strerror or err}); the output is damaged") from None
            if size != e["bytes"]:
                raise ConfigError(f"{path}: {size:,} bytes, index.json says {e['bytes']:,}: the file was cut "
                                  "or changed after the run; the output is damaged")


def _clean_group(folder: Path, keep: set[str], extension: str) -> None:
    """Remove what an interrupted attempt left in a group's folder: temporaries and unlisted parts."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_file() and (p.name.startswith(TMP_PREFIX) or (p.name.startswith("part-") and p.name not in keep)
                            or p.name == "index.json"):
            p.unlink()


def _read_state(dest: Path) -> dict[str, Any] | None:
    path = dest / STATE
    if not path.is_file():
        return None
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError:
        return None


def _write_state(dest: Path, state: dict[str, Any]) -> None:
    f = AtomicFile(dest / STATE)
    f.write(orjson.dumps(state, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    f.commit()


def _write_indexes(output: SinkOutput, dest: Path, state: dict[str, Any], sink_class: type) -> dict[str, Any]:
    """``index.json`` for the compacted folder, in the sink's own format (see ``write_index``)."""
    from curate.sinks.base import write_index

    sink = sink_class(output.params, dest.parent)
    sink.directory = dest
    partitions = output.index.get("partitions", {})
    column = output.params.partition_by
    entries = []
    for group, done in sorted(state["groups"].items()):
        for f in done["files"]:
            # keys in the writers' order: entries read back from the state file have theirs sorted, and
            # index.json must not depend on whether a file was written in this process or an earlier one
            entry = {"name": f"{group}/{f['name']}" if group else f["name"], "samples": f["samples"],
                     "bytes": f["bytes"], "sha256": f["sha256"]}
            if group:
                info = partitions.get(group, {})
                entry["partition"] = {"column": column, "value": info.get("value"), "type": info.get("type")}
            entries.append(entry)
    faults.check("compact_index", label=output.directory.name)
    index = write_index(sink, entries, output.index.get("columns", []))
    index["compacted_from"] = {"path": str(output.directory.name), "files": len(output.index["shards"]),
                               "index_sha256": state["settings"]["source_index_sha256"]}
    f = AtomicFile(dest / "index.json")
    f.write(orjson.dumps(index, option=orjson.OPT_INDENT_2) + b"\n")
    f.commit()
    return index


# ------------------------------------------------------------------------------------ formats
@contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """A file of the source that cannot be decoded is a ConfigError naming it (not a bare traceback)."""
    try:
        yield
    except (pa.ArrowException, OSError, EOFError, tarfile.TarError) as e:
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {e}); the output is damaged") from None


class _Codec(ABC):
    """How one output kind is read as row chunks and written back."""

    extension = ""

    @abstractmethod
    def read(self, files: list[Path]) -> Iterator[Any]:
        """The rows of ``files``, in order, as chunks (record batches, lists of lines or samples)."""

    @abstractmethod
    def writer(self, fh: AtomicFile) -> Any:
        """An object with ``write(chunk)``, ``size()`` and ``close()`` writing into ``fh``."""

    def rows(self, chunk: Any) -> int:
        return len(chunk)

    def join(self, parts: list[Any]) -> Any:
        return [x for p in parts for x in p]

    def estimate(self, chunk: Any) -> int:
        """Bytes ``chunk`` adds to a file, as well as it is known before writing."""
        return 0

    def unit_rows(self, group_bytes: int, rows: int, target: int) -> int:
        """Rows per write: about 1/32 of the target (at least 1 MB or 1/8 of the target, at most 64 MB),
        from the source's mean row size."""
        mean = max(1, group_bytes // max(1, rows))
        unit_bytes = min(64 << 20, max(target // 32, min(1 << 20, target // 8)))
        return max(1, min(1 << 20, unit_bytes // mean))

    def would_pass(self, writer: Any, chunk: Any, last_unit_bytes: int, target: int) -> bool:
        return writer.size() + max(last_unit_bytes, self.estimate(chunk)) > target

    def full(self, writer: Any, target: int) -> bool:
        return writer.size() >= target


class _ArrowCodec(_Codec):
    """Parquet and Arrow IPC: record batches, written by the sink's own encoder and settings."""

    def __init__(self, output: SinkOutput, extension: str, sink_class: type):
        self.output, self.extension = output, extension
        params = output.params
        if "images" in type(params).model_fields:  # the files already hold the feature layout: write as is
            params = params.model_copy(update={"images": "struct"})
        self.params = params
        self.encoder = sink_class.encoder
        self.schema: pa.Schema | None = None

    def read(self, files: list[Path]) -> Iterator[pa.RecordBatch]:
        self.schema = self._schema(files)  # now: the writer needs it before the first batch is read
        self.footer_base, self.footer_per_write = self._footer_sizes(files)
        return self._read(files)

    def _footer_sizes(self, files: list[Path]) -> tuple[int, int]:
        """Parquet writes its footer (schema, and per row group each column's offsets and min/max
        statistics) only when the file is closed, so it is not in the size seen while writing. It is
        estimated from the group's source files: an empty file's size with this schema and these
        settings, plus the largest footer bytes per row group a source file has. Both depend only on
        the source, so file ends stay deterministic (and the same after a resume)."""
        if self.output.kind != "parquet":
            return 0, 0  # Arrow IPC: per-batch metadata is written with the batch; the footer is tiny
        import pyarrow.parquet as pq

        empty = pa.BufferOutputStream()  # an empty file in memory: its size is the footer's base
        self.encoder(empty, self.schema, self.params).close()
        base = empty.getvalue().size
        per_group = 0
        for f in files:
            with _damaged(f):
                md = pq.read_metadata(f)
            if md.num_row_groups:
                per_group = max(per_group, -(-max(0, md.serialized_size + 12 - base) // md.num_row_groups))
        return base, per_group

    def _read(self, files: list[Path]) -> Iterator[pa.RecordBatch]:
        for f in files:
            with _damaged(f):
                for batch in self._batches(f):
                    if not batch.schema.equals(self.schema, check_metadata=False):
                        batch = pa.Table.from_batches([batch]).cast(self.schema).combine_chunks().to_batches()[0] \
                            if batch.num_rows else batch
                    if batch.num_rows:
                        yield batch

    def _batches(self, path: Path) -> Iterator[pa.RecordBatch]:
        if self.output.kind == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(path).iter_batches(batch_size=4096)
        else:
            from curate.readers.arrow_ipc import open_ipc

            yield from open_ipc(str(path))

    def _schema(self, files: list[Path]) -> pa.Schema:
        schemas = []
        for f in files:
            with _damaged(f):
                if self.output.kind == "parquet":
                    import pyarrow.parquet as pq

                    schemas.append(pq.read_schema(f))
                else:
                    with pa.memory_map(str(f), "r") as src:
                        schemas.append(pa.ipc.open_file(src).schema)
        first = schemas[0]
        if all(s.equals(first) for s in schemas):
            return first
        try:
            return pa.unify_schemas(schemas, promote_options="permissive").with_metadata(first.metadata)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ConfigError(f"{files[0].parent}: the files of this output have schemas that do not "
                              f"combine: {e}") from None

    def writer(self, fh: AtomicFile) -> Any:
        return _EncoderWriter(fh, self.encoder(fh, self.schema, self.params), self.footer_base,
                              self.footer_per_write)

    def rows(self, chunk: pa.RecordBatch) -> int:
        return chunk.num_rows

    def join(self, parts: list[pa.RecordBatch]) -> pa.RecordBatch:
        # always a fresh batch, never a slice: Arrow IPC encodes a slice differently from the same rows
        # in a batch of their own, and a resumed run slices where an uninterrupted one does not
        return pa.concat_batches(parts)

    def estimate(self, chunk: pa.RecordBatch) -> int:
        return 0  # compressed size unknown before writing: the last unit's size is the estimate

    def would_pass(self, writer: Any, chunk: Any, last_unit_bytes: int, target: int) -> bool:
        return writer.size() + writer.footer_per_write + max(last_unit_bytes, self.estimate(chunk)) > target


class _EncoderWriter:
    def __init__(self, fh: AtomicFile, encoder: Any, footer_base: int = 0, footer_per_write: int = 0):
        self.fh, self.encoder = fh, encoder
        self.footer_base, self.footer_per_write, self.writes = footer_base, footer_per_write, 0

    def write(self, chunk: Any) -> None:
        self.encoder.write_many([chunk])
        self.writes += 1

    def size(self) -> int:
        """Bytes written so far, plus (Parquet) the estimated footer that closing the file adds."""
        if not self.footer_per_write:
            return self.fh.size
        return self.fh.size + self.footer_base + self.writes * self.footer_per_write

    def close(self) -> None:
        self.encoder.close()


class _JsonlCodec(_Codec):
    """JSON Lines: lines copied byte for byte, re-compressed with the sink's codec."""

    def __init__(self, output: SinkOutput, extension: str):
        self.compression, self.extension = output.params.compression, extension

    def read(self, files: list[Path]) -> Iterator[list[bytes]]:
        from curate.readers.base import DamagedInput
        from curate.readers.jsonl import _decoded

        for f in files:
            with open(f, "rb") as raw:
                blocks = (iter(lambda: raw.read(1 << 20), b"") if self.compression == "none"
                          else _decoded(raw, self.compression))
                lines: list[bytes] = []
                rest = b""
                try:
                    for block in blocks:
                        data = rest + block
                        end = data.rfind(b"\n") + 1
                        rest = data[end:]
                        if end:
                            lines += [line + b"\n" for line in data[:end - 1].split(b"\n")]
                        while len(lines) >= 4096:
                            yield lines[:4096]
                            lines = lines[4096:]
                except DamagedInput as e:
                    raise ConfigError(f"{f}: cannot be read ({e.reason}: {e.detail}); the output is damaged") \
                        from None
                if rest:
                    raise ConfigError(f"{f}: the last line has no newline: the file is cut; the output is damaged")
                if lines:
                    yield lines

    def writer(self, fh: AtomicFile) -> Any:
        return _LineWriter(fh, self.compression)

    def estimate(self, chunk: list[bytes]) -> int:
        return sum(map(len, chunk)) if self.compression == "none" else 0


class _LineWriter:
    def __init__(self, fh: AtomicFile, compression: str):
        import gzip

        self.fh = fh
        self.flush_mode: tuple = ()
        if compression == "gzip":
            self.out = gzip.GzipFile(fileobj=fh, mode="wb", mtime=0)
        elif compression == "zstd":
            import zstandard

            self.out = zstandard.ZstdCompressor().stream_writer(fh, closefd=False)
            self.flush_mode = (zstandard.FLUSH_BLOCK,)
        else:
            self.out = fh

    def write(self, chunk: list[bytes]) -> None:
        self.out.write(b"".join(chunk))
        if self.out is not self.fh:
            # gzip and zstd hold up to a block of compressed data until they are flushed: without this
            # the size seen lags the bytes written, and a small target is passed by a block or more
            self.out.flush(*self.flush_mode)

    def size(self) -> int:
        return self.fh.size

    def close(self) -> None:
        if self.out is not self.fh:
            self.out.close()


class _TarCodec(_Codec):
    """WebDataset: samples (consecutive members sharing a key) copied with their original headers, so
    keys, member names and bytes are unchanged; a file never passes the target (tar sizes are exact)."""

    extension = "tar"

    def read(self, files: list[Path]) -> Iterator[list[list[tuple[tarfile.TarInfo, bytes]]]]:
        from curate.readers.webdataset import _KEY

        for f in files:
            with _damaged(f), open(f, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
                samples: list[list[tuple[tarfile.TarInfo, bytes]]] = []
                current: list[tuple[tarfile.TarInfo, bytes]] = []
                key = None
                for member in tf:
                    if not member.isfile():
                        continue
                    m = _KEY.match(member.name)
                    k = m.group(1) if m else member.name
                    data = tf.extractfile(member).read()
                    if current and k != key:
                        samples.append(current)
                        current = []
                        if len(samples) >= 256:
                            yield samples
                            samples = []
                    key = k
                    current.append((member, data))
                # a tar cut at a member's header reads as a shorter archive (tarfile stops there without
                # an error): its end-of-archive blocks must follow the last member
                end = tf.offset
                fh.seek(end)
                if fh.read(2 * _TAR_BLOCK) != bytes(2 * _TAR_BLOCK):
                    raise ConfigError(f"{f}: no end-of-archive after byte {end}: the tar is cut; "
                                      "the output is damaged")
                if current:
                    samples.append(current)
                if samples:
                    yield samples

    def writer(self, fh: AtomicFile) -> Any:
        return _TarWriter(fh)

    def estimate(self, chunk: list) -> int:
        return sum(_member_bytes(info) for sample in chunk for info, _ in sample)

    def unit_rows(self, group_bytes: int, rows: int, target: int) -> int:
        return 1  # exact sizes: decide sample by sample

    def would_pass(self, writer: Any, chunk: list, last_unit_bytes: int, target: int) -> bool:
        body = writer.body + self.estimate(chunk)
        return -(-(body + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD > target

    def full(self, writer: Any, target: int) -> bool:
        return False


def _member_bytes(info: tarfile.TarInfo) -> int:
    return _TAR_BLOCK + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK


class _TarWriter:
    def __init__(self, fh: AtomicFile):
        import io

        self.fh, self._io = fh, io
        # closed by close(), which _write_file calls whether the file is committed or aborted
        self.tar = tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.body = 0

    def write(self, chunk: list) -> None:
        for sample in chunk:
            for info, data in sample:
                self.tar.addfile(info, self._io.BytesIO(data))
                self.body += _member_bytes(info)

    def size(self) -> int:
        return self.fh.size

    def close(self) -> None:
        self.tar.close()


def _codec(output: SinkOutput, sink_class: type) -> _Codec:
    ext = sink_class(output.params, output.directory.parent).extension
    if output.kind in ("parquet", "arrow"):
        return _ArrowCodec(output, ext, sink_class)
    if output.kind == "jsonl":
        return _JsonlCodec(output, ext)
    if output.kind == "webdataset":
        return _TarCodec()
    raise ConfigError(f"{output.label}: compaction does not know the {output.kind!r} format")

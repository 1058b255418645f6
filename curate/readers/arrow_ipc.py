"""Arrow IPC files (random-access ``.arrow``/``.feather``) and streams (as ``datasets`` writes them).

``shards()`` reads each file's schema: an empty file, another format or an unreadable header is a
ConfigError naming the file. Data that cannot be read later (a cut stream) ends that shard with one
counted ``unreadable_file`` failure; the rows before it are kept.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import Reader, Shard, content_key, list_files
from curate.readers.columnar import check_columns, rebatch, to_documents


def open_ipc(path: str) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of an Arrow IPC file or stream at ``path``.

    Local files are memory-mapped; fsspec URLs (``s3://``, ``memory://`` …) are opened through fsspec.
    """
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rb") as fh:
            yield from _batches(pa.PythonFile(fh, mode="r"))
    else:
        with pa.memory_map(path.removeprefix("file://"), "r") as source:
            yield from _batches(source)


def _batches(source) -> Iterator[pa.RecordBatch]:
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        yield from pa.ipc.open_stream(source)
        return
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i)


def ipc_schema(uri: str) -> pa.Schema:
    """The schema of the Arrow IPC file or stream at ``uri``; ConfigError naming it when it is empty,
    another format ("looks like Parquet; use kind: parquet") or unreadable."""
    sniff.expect(uri, ("arrow",), "an Arrow IPC file or stream")
    try:
        return _open(uri, _schema)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{uri}: unreadable Arrow IPC file: {e}") from None


def _schema(source) -> pa.Schema:
    try:
        return pa.ipc.open_file(source).schema
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).schema


def _open(path: str, use):
    """``use(source)`` on the file at ``path``: memory-mapped when local, through fsspec otherwise."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rb") as fh:
            return use(pa.PythonFile(fh, mode="r"))
    with pa.memory_map(path.removeprefix("file://"), "r") as source:
        return use(source)


def read_ipc_shard(shard: Shard, p, ctx) -> Iterator[pa.RecordBatch]:
    """Documents from one IPC file; a batch that cannot be read ends the shard as a counted
    ``unreadable_file`` (file, last whole row), keeping what came before."""
    row = 0
    try:
        for offset, batch in rebatch(open_ipc(shard.uri), p.batch_rows):
            docs = to_documents(batch, offset, shard, p, ctx)
            row = offset + batch.num_rows  # after: rows of a batch that fails to convert are not kept
            if docs is not None:
                yield docs
    except (pa.ArrowInvalid, OSError) as e:
        ctx.failure("unreadable_file", f"Arrow IPC data cannot be read after row {row - 1}: {e}",
                    file=shard.uri,
                    line=row - 1 if row else None, offset=None, lost=None)


@register_source("arrow")
class ArrowReader(Reader):
    def shards(self) -> list[Shard]:
        """One shard per file; ConfigError naming a file that is not readable Arrow IPC or lacks the text
        column."""
        listed = list_files(self.params.paths, (".arrow", ".feather", ".ipc"))
        for uri, _, _ in listed:
            check_columns(uri, ipc_schema(uri), self.params)
        return [Shard(f"{i:05d}", content_key(uri, info), uri, rel)
                for i, (uri, info, rel) in enumerate(listed)]

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        yield from read_ipc_shard(shard, self.params, ctx)

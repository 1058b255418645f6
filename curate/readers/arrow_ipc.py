"""Arrow IPC files (random-access ``.arrow``/``.feather``) and streams (as ``datasets`` writes them)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from curate.plugins import register_source
from curate.readers.base import Reader, Shard, content_key, list_files
from curate.readers.columnar import rebatch, to_documents


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


def read_ipc_shard(shard: Shard, p, ctx) -> Iterator[pa.RecordBatch]:
    for offset, batch in rebatch(open_ipc(shard.uri), p.batch_rows):
        docs = to_documents(batch, offset, shard, p, ctx)
        if docs is not None:
            yield docs


@register_source("arrow")
class ArrowReader(Reader):
    def shards(self) -> list[Shard]:
        return [Shard(f"{i:05d}", content_key(uri, info), uri, rel)
                for i, (uri, info, rel) in enumerate(list_files(self.params.paths, (".arrow", ".feather", ".ipc")))]

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        yield from read_ipc_shard(shard, self.params, ctx)

"""Parquet files; a large file is split into shards of whole row groups (``shard_rows``)."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from curate.plugins import register_source
from curate.readers.base import Reader, ReaderParams, Shard, content_key, list_files
from curate.readers.columnar import needed_columns, to_documents


@register_source("parquet")
class ParquetReader(Reader):
    class Params(ReaderParams):
        shard_rows: int = Field(1_000_000, gt=0, description="row groups are grouped into shards of about this many rows")

    def shards(self) -> list[Shard]:
        out: list[Shard] = []
        for uri, info, rel in list_files(self.params.paths, (".parquet", ".pq")):
            with fsspec.open(uri, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
            for start, stop, first_row in _groups(md, self.params.shard_rows):
                out.append(Shard(f"{len(out):05d}", content_key(uri, info, start, stop), uri, rel, start, stop,
                                 {"first_row": first_row}))
        return out

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        with fsspec.open(shard.uri, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = needed_columns(pf.schema_arrow.names, p)
            row = shard.extra.get("first_row", 0)
            groups = list(range(shard.start, shard.stop if shard.stop is not None else pf.num_row_groups))
            for batch in pf.iter_batches(batch_size=p.batch_rows, row_groups=groups, columns=cols):
                docs = to_documents(batch, row, shard, p, ctx)
                row += batch.num_rows
                if docs is not None:
                    yield docs


def _groups(md: pq.FileMetaData, shard_rows: int):
    start, rows, first_row, total = 0, 0, 0, 0
    for i in range(md.num_row_groups):
        rows += md.row_group(i).num_rows
        if rows >= shard_rows or i == md.num_row_groups - 1:
            yield start, i + 1, first_row
            total += rows
            start, first_row, rows = i + 1, total, 0
    if md.num_row_groups == 0:
        yield 0, 0, 0

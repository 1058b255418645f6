"""Parquet files; a large file is split into shards of whole row groups (``shard_rows``).

``shards()`` reads each file's footer: an empty file, another format ("looks like a tar archive; use
kind: webdataset"), an unreadable footer or a missing text/id column is a ConfigError naming the file.
A row group that cannot be decoded at read time is counted once as ``unreadable_file`` (file, first
row before the failure as ``line``, the group's byte ``offset``, ``lost`` = its rows not read) and the
shard goes on with the next group.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import Reader, ReaderParams, Shard, content_key, list_files
from curate.readers.columnar import check_columns, needed_columns, to_documents


@register_source("parquet")
class ParquetReader(Reader):
    class Params(ReaderParams):
        shard_rows: int = Field(1_000_000, gt=0, description="row groups are grouped into shards of about this many rows")

    def shards(self) -> list[Shard]:
        out: list[Shard] = []
        for uri, info, rel in list_files(self.params.paths, (".parquet", ".pq")):
            md = footer(uri)
            check_columns(uri, md.schema.to_arrow_schema(), self.params)
            for start, stop, first_row in _groups(md, self.params.shard_rows):
                out.append(Shard(f"{len(out):05d}", content_key(uri, info, start, stop), uri, rel, start, stop,
                                 {"first_row": first_row}))
        return out

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        with fsspec.open(shard.uri, "rb") as fh:
            try:
                pf = pq.ParquetFile(fh)
            except (pa.ArrowInvalid, OSError) as e:
                ctx.failure("unreadable_file", f"cannot open the Parquet file: {e}", file=shard.uri, offset=0)
                return
            cols = needed_columns(pf.schema_arrow.names, p)
            row = shard.extra.get("first_row", 0)
            stop = shard.stop if shard.stop is not None else pf.num_row_groups
            for group in range(shard.start, stop):
                yield from _read_group(pf, group, row, cols, shard, p, ctx)
                row += pf.metadata.row_group(group).num_rows


def footer(uri: str) -> pq.FileMetaData:
    """The file's Parquet metadata; ConfigError naming ``uri`` when it is empty, not Parquet or unreadable."""
    sniff.expect(uri, ("parquet",), "a Parquet file")
    try:
        with fsspec.open(uri, "rb") as fh:
            return pq.ParquetFile(fh).metadata
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{uri}: unreadable Parquet file: {e}") from None


def _read_group(pf: pq.ParquetFile, group: int, first_row: int, cols, shard: Shard, p, ctx):
    """The documents of one row group; a group that fails to decode is counted, not raised."""
    rows = pf.metadata.row_group(group).num_rows
    row = first_row
    try:
        for batch in pf.iter_batches(batch_size=p.batch_rows, row_groups=[group], columns=cols):
            docs = to_documents(batch, row, shard, p, ctx)
            row += batch.num_rows
            if docs is not None:
                yield docs
    except (pa.ArrowInvalid, OSError) as e:
        ctx.failure("unreadable_file", f"row group {group} (rows {first_row}..{first_row + rows - 1}) "
                    f"cannot be decoded from row {row}: {e}", file=shard.uri, line=row - 1 if row else None,
                    offset=_group_offset(pf.metadata.row_group(group)), lost=first_row + rows - row)


def _group_offset(group: pq.RowGroupMetaData) -> int | None:
    """The byte where a row group's first column chunk starts."""
    if group.num_columns == 0:
        return None
    col = group.column(0)
    return col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset


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

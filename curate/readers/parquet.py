"""Parquet files; a large file is split into shards of whole row groups (``shard_rows``).

``shards()`` reads each file's footer: an empty file, another format ("looks like a tar archive; use
kind: webdataset"), an unreadable footer or a missing text/id column is a ConfigError naming the file.
A row group that cannot be decoded at read time is counted once as ``unreadable_file`` (file, first
row before the failure as ``line``, the group's byte ``offset``, ``lost`` = its rows not read) and the
shard goes on with the next group.

``schema: table`` reads every column as it is instead of mapping onto the documents schema: chat rows
(``messages``) a teacher wrote, token rows, any earlier output. Rows get an ``id`` string column (from
``id_field``, else ``<file>:<row>``); rows whose ``id_field`` is null go to ``failures/``
(``missing_id_field``). Every file must have the same columns as the first (checked at validation).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ByteSize, Field, model_validator

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import Reader, ReaderParams, Shard, content_key, list_files, range_bytes
from curate.readers.columnar import check_columns, check_id_column, needed_columns, to_documents


@register_source("parquet")
class ParquetReader(Reader):
    class Params(ReaderParams):
        shard_rows: int | None = Field(None, gt=0, description="row groups are grouped into shards of about this many "
                                       "rows; unset: by size (shard_bytes)")
        shard_bytes: ByteSize | None = Field(
            None, gt=0, description="without shard_rows, row groups are grouped into shards of about this many bytes "
            "of data (uncompressed); unset: the files' total / 16, at least 8 MB and at most 256 MB")
        schema_: Literal["documents", "table"] = Field(
            "documents", alias="schema", description="documents: map text/id/meta onto the documents schema; "
            "table: keep every column as it is (chat rows, earlier outputs)")

        @model_validator(mode="after")
        def _one_way_to_size(self):
            if self.shard_rows is not None and self.shard_bytes is not None:
                raise ValueError("set shard_rows or shard_bytes, not both (each sizes the shards its own way)")
            return self

    def output_kind(self) -> str:
        return "table" if self.params.schema_ == "table" else "documents"

    def table_columns(self) -> list[str]:
        """The columns of a ``schema: table`` source (those of its first file, with ``id``)."""
        for uri, _, _ in list_files(self.params.paths, (".parquet", ".pq")):
            names = footer(uri).schema.to_arrow_schema().names
            return ["id", *[n for n in names if n != "id"]]
        return ["id"]

    def shards(self) -> list[Shard]:
        """Runs of whole row groups: about ``shard_rows`` rows each when set, else about ``shard_bytes`` of
        data (:func:`curate.readers.base.range_bytes`; a row group is never split, so a file written as
        one row group is one shard)."""
        out: list[Shard] = []
        first_names = None
        files = [(uri, info, rel, footer(uri)) for uri, info, rel in list_files(self.params.paths, (".parquet", ".pq"))]
        step = None if self.params.shard_rows else range_bytes(
            self.params.shard_bytes, sum(md.row_group(i).total_byte_size for *_, md in files
                                         for i in range(md.num_row_groups)))
        for uri, info, rel, md in files:
            schema = md.schema.to_arrow_schema()
            if self.params.schema_ == "table":
                _check_table(uri, schema, self.params, first_names)
                first_names = first_names or schema.names
            else:
                check_columns(uri, schema, self.params)
            for start, stop, first_row in _groups(md, self.params.shard_rows, step):
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
            cols = needed_columns(pf.schema_arrow.names, p) if p.schema_ == "documents" else None
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
            docs = to_documents(batch, row, shard, p, ctx) if p.schema_ == "documents" else \
                _as_table(batch, row, shard, p, ctx)
            row += batch.num_rows
            if docs is not None:
                yield docs
    except (pa.ArrowInvalid, OSError) as e:
        ctx.failure("unreadable_file", f"row group {group} (rows {first_row}..{first_row + rows - 1}) "
                    f"cannot be decoded from row {row}: {e}", file=shard.uri, line=row - 1 if row else None,
                    offset=_group_offset(pf.metadata.row_group(group)), lost=first_row + rows - row)


def _check_table(uri: str, schema: pa.Schema, p, first: list[str] | None) -> None:
    check_id_column(uri, schema, p)
    if first is not None and sorted(schema.names) != sorted(first):
        raise ConfigError(f"{uri}: columns {schema.names} differ from the first file's {first} "
                          "(schema: table reads files with the same columns)")


def _as_table(batch: pa.RecordBatch, first_row: int, shard: Shard, p, ctx) -> pa.RecordBatch | None:
    """One batch as it is, with a string ``id`` first."""
    import pyarrow.compute as pc

    rows = pa.array(range(first_row, first_row + batch.num_rows), pa.int64())
    if p.id_field:
        ids = batch.column(p.id_field)
        if ids.null_count:
            for r in rows.filter(ids.is_null()).to_pylist():
                ctx.failure("missing_id_field", f"column {p.id_field!r} is null", file=shard.uri, line=r)
            keep = ids.is_valid()
            batch, ids = batch.filter(keep), ids.filter(keep)
        ids = ids.cast(pa.string())
    else:
        ids = pc.binary_join_element_wise(pa.scalar(shard.rel), rows.cast(pa.string()), ":")
    if batch.num_rows == 0:
        return None
    if "id" in batch.schema.names:
        batch = batch.drop_columns(["id"])
    return pa.RecordBatch.from_arrays([ids, *batch.columns], names=["id", *batch.schema.names])


def _group_offset(group: pq.RowGroupMetaData) -> int | None:
    """The byte where a row group's first column chunk starts."""
    if group.num_columns == 0:
        return None
    col = group.column(0)
    return col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset


def _groups(md: pq.FileMetaData, shard_rows: int | None, shard_bytes: int | None):
    """``(first group, stop group, first row)`` of each run of row groups holding about ``shard_rows``
    rows (when set) or ``shard_bytes`` bytes of data."""
    start, rows, size, first_row, total = 0, 0, 0, 0, 0
    for i in range(md.num_row_groups):
        group = md.row_group(i)
        rows += group.num_rows
        size += group.total_byte_size
        full = rows >= shard_rows if shard_rows else size >= shard_bytes
        if full or i == md.num_row_groups - 1:
            yield start, i + 1, first_row
            total += rows
            start, first_row, rows, size = i + 1, total, 0, 0
    if md.num_row_groups == 0:
        yield 0, 0, 0

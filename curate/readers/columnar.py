"""Shared by the column-oriented readers (Parquet, Arrow IPC, Hugging Face datasets).

Maps ``text_field``/``id_field`` onto the documents schema with vectorized Arrow/Polars work; the
remaining (or the listed ``meta_fields``) columns become the JSON ``meta``. Columns curate itself
writes pass through unchanged, so an output reads back as it was written: a struct ``scores``, a
string ``source``, and a string ``meta`` (other columns are merged into its object). Rows whose
text is null or blank (``missing_text_field``, ``empty_text``), or whose ``id_field`` is null
(``missing_id_field``), are sent to ``failures/`` with the file and row number (0-based) as ``line``.
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import ConfigError
from curate.readers.base import Shard
from curate.schema import DOCUMENTS


def needed_columns(names: list[str], p) -> list[str] | None:
    """Columns to read from a file with ``names`` (None reads all of them)."""
    if p.meta_fields is None:
        return None
    wanted = [p.text_field] + ([p.id_field] if p.id_field else []) + list(p.meta_fields)
    return [c for c in dict.fromkeys(wanted) if c in names]


def to_documents(batch: pa.RecordBatch, first_row: int, shard: Shard, p, ctx) -> pa.RecordBatch | None:
    """Convert one columnar batch; ``first_row`` is the file row number of its first row."""
    check_columns(shard.uri, batch.schema, p)
    text = batch.column(p.text_field).cast(pa.string())
    good = pc.and_(pc.is_valid(text), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))
    good = good.fill_null(False)
    if p.id_field:
        good = pc.and_(good, pc.is_valid(batch.column(p.id_field)))
    rows = pa.array(range(first_row, first_row + batch.num_rows), pa.int64())
    if not pc.all(good).as_py():
        _report_bad_rows(pc.invert(good), rows, text, shard, p, ctx)
        batch, text, rows = batch.filter(good), text.filter(good), rows.filter(good)
    if batch.num_rows == 0:
        return None
    if p.id_field:
        ids = batch.column(p.id_field).cast(pa.string())
    else:
        ids = pc.binary_join_element_wise(pa.scalar(shard.rel), rows.cast(pa.string()), ":")
    meta = _meta(batch, p)
    names = batch.schema.names
    if "source" in names and pa.types.is_string(batch.schema.field("source").type):
        source = batch.column("source")
    else:
        source = pa.array([shard.rel] * batch.num_rows, pa.string())
    out = pa.RecordBatch.from_arrays([ids, text, source, meta], schema=DOCUMENTS)
    if "scores" in names and pa.types.is_struct(batch.schema.field("scores").type):
        out = out.append_column("scores", batch.column("scores"))
    return out


def _report_bad_rows(bad: pa.Array, rows: pa.Array, text: pa.Array, shard: Shard, p, ctx) -> None:
    """Send each ``bad`` row to ``failures/`` (file, 0-based row): a null or blank text first, else a
    null id."""
    for row, value in zip(rows.filter(bad).to_pylist(), text.filter(bad).to_pylist()):
        if value is None:
            ctx.failure("missing_text_field", f"column {p.text_field!r} is null", file=shard.uri, line=row)
        elif not value.strip():
            ctx.failure("empty_text", f"column {p.text_field!r}", file=shard.uri, line=row)
        else:
            ctx.failure("missing_id_field", f"column {p.id_field!r} is null", file=shard.uri, line=row)


def check_columns(uri: str, schema: pa.Schema, p) -> None:
    """ConfigError naming ``uri`` when ``schema`` lacks a text ``text_field`` (or a set ``id_field``)."""
    names = schema.names
    if p.text_field not in names:
        raise ConfigError(f"{uri}: source.text_field: no column {p.text_field!r} (has {names})")
    if p.id_field and p.id_field not in names:
        raise ConfigError(f"{uri}: source.id_field: no column {p.id_field!r} (has {names})")
    kind = schema.field(p.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{uri}: source.text_field: column {p.text_field!r} is {kind}, not text")


_OWN = ("source", "meta", "scores")


def _meta(batch: pa.RecordBatch, p) -> pa.Array:
    names = batch.schema.names
    exclude = {p.text_field, p.id_field, *_OWN}
    cols = list(p.meta_fields) if p.meta_fields is not None else [c for c in names if c not in exclude]
    cols = [c for c in cols if c in names]
    own_meta = "meta" in names and pa.types.is_string(batch.schema.field("meta").type) and p.meta_fields is None
    encoded = _encode(batch, cols) if cols else None
    if not own_meta:
        return encoded if encoded is not None else pa.nulls(batch.num_rows, pa.string())
    if encoded is None:
        return batch.column("meta")
    merged = []
    for own, extra in zip(batch.column("meta").to_pylist(), encoded.to_pylist()):
        obj = {**(orjson.loads(own) if own else {}), **orjson.loads(extra)}
        merged.append(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode())
    return pa.array(merged, pa.string())


def _encode(batch: pa.RecordBatch, cols: list[str]) -> pa.Array:
    import polars as pl  # lazily: ~30 MB a process, only when there are meta columns to encode

    df = pl.from_arrow(pa.Table.from_batches([batch.select(cols)]))
    encoded = df.select(pl.struct(sorted(cols)).struct.json_encode().alias("m")).to_arrow().column("m")
    return encoded.combine_chunks().cast(pa.string())


def rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(offset, batch)`` with at most ``rows`` rows each, counting rows from 0."""
    offset = 0
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            part = batch.slice(start, rows)
            yield offset, part
            offset += part.num_rows

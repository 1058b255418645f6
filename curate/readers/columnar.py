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
from curate.schema import DOCUMENTS, json_default


def needed_columns(names: list[str], p) -> list[str] | None:
    """Columns to read from a file with ``names`` (None reads all of them)."""
    if p.meta_fields is None:
        return None
    wanted = [p.text_field] + ([p.id_field] if p.id_field else []) + list(p.meta_fields)
    return [c for c in dict.fromkeys(wanted) if c in names]


def to_documents(batch: pa.RecordBatch, first_row: int, shard: Shard, p, ctx) -> pa.RecordBatch | None:
    """Convert one columnar batch; ``first_row`` is the file row number of its first row."""
    check_columns(shard.uri, batch.schema, p)
    batch = _without_views(batch)
    text = batch.column(p.text_field).cast(pa.string())
    good = pc.and_(pc.is_valid(text), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0))
    good = good.fill_null(False)
    id_text = None
    if p.id_field:
        good = pc.and_(good, pc.is_valid(batch.column(p.id_field)))
        id_text = _utf8_rows(batch.column(p.id_field))
        if id_text is not None:
            good = pc.and_(good, id_text)
    rows = pa.array(range(first_row, first_row + batch.num_rows), pa.int64())
    if not pc.all(good).as_py():
        _report_bad_rows(pc.invert(good), rows, text, shard, p, ctx, id_text)
        batch, text, rows = batch.filter(good), text.filter(good), rows.filter(good)
    if batch.num_rows == 0:
        return None
    if p.id_field:
        ids = batch.column(p.id_field)
        if pa.types.is_dictionary(ids.type):  # its dictionary may still hold a value no kept row uses
            ids = ids.dictionary_decode()
        ids = ids.cast(pa.string())
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


def _without_views(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with its string_view/binary_view columns as large_string/large_binary: pyarrow's filter
    and take have no kernel for view types in some versions, and dropping a bad row filters the batch."""
    views = {"string_view": pa.large_string(), "binary_view": pa.large_binary()}
    kinds = [views.get(str(f.type)) for f in batch.schema]
    if not any(kinds):
        return batch
    columns = [c.cast(k) if k is not None else c for c, k in zip(batch.columns, kinds, strict=True)]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _utf8_rows(ids: pa.Array) -> pa.Array | None:
    """For a binary id column holding bytes that are not UTF-8: which rows are (null counts as UTF-8 here,
    it is refused as a null id). None when the whole column reads as text (the usual case, one cast)."""
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()  # Parquet reads a dictionary-encoded column back as one
    if not (pa.types.is_binary(ids.type) or pa.types.is_large_binary(ids.type)
            or pa.types.is_fixed_size_binary(ids.type)
            or getattr(pa.types, "is_binary_view", lambda _: False)(ids.type)):  # pyarrow >= 16
        return None
    if _casts_to_text(ids):
        return None

    def text(value: bytes | None) -> bool:
        try:
            value is None or value.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    return pa.array([text(v) for v in ids.to_pylist()], pa.bool_())


def _casts_to_text(ids: pa.Array) -> bool:
    """Whether every value of the binary column ``ids`` is UTF-8 (Arrow's cast checks them all at once)."""
    try:
        ids.cast(pa.string())
    except pa.ArrowInvalid:
        return False
    return True


def _report_bad_rows(bad: pa.Array, rows: pa.Array, text: pa.Array, shard: Shard, p, ctx,
                     id_text: pa.Array | None = None) -> None:
    """Send each ``bad`` row to ``failures/`` (file, 0-based row): a null or blank text first, else an id
    that is not UTF-8, else a null id."""
    utf8 = id_text.filter(bad).to_pylist() if id_text is not None else [True] * len(rows.filter(bad))
    for row, value, id_ok in zip(rows.filter(bad).to_pylist(), text.filter(bad).to_pylist(), utf8, strict=True):
        if value is None:
            ctx.failure("missing_text_field", f"column {p.text_field!r} is null", file=shard.uri, line=row)
        elif not value.strip():
            ctx.failure("empty_text", f"column {p.text_field!r}", file=shard.uri, line=row)
        elif not id_ok:
            ctx.failure("invalid_utf8", f"column {p.id_field!r} holds bytes that are not UTF-8", file=shard.uri,
                        line=row)
        else:
            ctx.failure("missing_id_field", f"column {p.id_field!r} is null", file=shard.uri, line=row)


def check_columns(uri: str, schema: pa.Schema, p) -> None:
    """ConfigError naming ``uri`` when ``schema`` lacks a text ``text_field`` (or a set ``id_field`` with
    a text form), or has two columns of a name it reads."""
    names = schema.names
    read = names if p.meta_fields is None else [p.text_field, p.id_field, *p.meta_fields]
    twice = sorted({n for n in read if n and names.count(n) > 1})
    if twice:
        raise ConfigError(f"{uri}: column(s) {twice} appear more than once (has {names})")
    if p.text_field not in names:
        raise ConfigError(f"{uri}: source.text_field: no column {p.text_field!r} (has {names})")
    check_id_column(uri, schema, p)
    kind = schema.field(p.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{uri}: source.text_field: column {p.text_field!r} is {kind}, not text")


def check_id_column(uri: str, schema: pa.Schema, p) -> None:
    """ConfigError naming ``uri`` when ``schema`` lacks a set ``id_field``, or its type has no text form
    (a list or struct column cannot be an id)."""
    if not p.id_field:
        return
    if p.id_field not in schema.names:
        raise ConfigError(f"{uri}: source.id_field: no column {p.id_field!r} (has {schema.names})")
    kind = schema.field(p.id_field).type
    try:
        pa.array([], kind).cast(pa.string())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        raise ConfigError(f"{uri}: source.id_field: column {p.id_field!r} is {kind}, which has no text "
                          "form to use as an id") from None


#: The columns curate itself writes, and the type it writes each with: such a column passes through.
_OWN = {"source": pa.types.is_string, "meta": pa.types.is_string, "scores": pa.types.is_struct}


def _meta(batch: pa.RecordBatch, p) -> pa.Array:
    names = batch.schema.names
    own = {c for c, is_own in _OWN.items() if c in names and is_own(batch.schema.field(c).type)}
    exclude = {p.text_field, p.id_field, *own}  # a source, meta or scores column of another type is meta
    cols = list(p.meta_fields) if p.meta_fields is not None else [c for c in names if c not in exclude]
    cols = [c for c in cols if c in names]
    own_meta = "meta" in own and p.meta_fields is None
    encoded = _encode(batch, cols) if cols else None
    if not own_meta:
        return encoded if encoded is not None else pa.nulls(batch.num_rows, pa.string())
    if encoded is None:
        return batch.column("meta")
    merged = []
    for own_value, extra in zip(batch.column("meta").to_pylist(), encoded.to_pylist()):
        obj = {**_as_object(own_value), **orjson.loads(extra)}
        merged.append(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode())
    return pa.array(merged, pa.string())


def _as_object(meta: str | None) -> dict:
    """A ``meta`` value to merge other columns into: its JSON object, or ``{"meta": value}`` when it is
    not one (a ``meta`` column curate did not write)."""
    if not meta:
        return {}
    try:
        obj = orjson.loads(meta)
    except orjson.JSONDecodeError:
        return {"meta": meta}
    return obj if isinstance(obj, dict) else {"meta": meta}


def _encode(batch: pa.RecordBatch, cols: list[str]) -> pa.Array:
    """The columns ``cols`` of each row as a JSON object (sorted keys); bytes as base64 text."""
    import polars as pl  # lazily: ~30 MB a process, only when there are meta columns to encode

    part = batch.select(sorted(cols))
    if any(_has_binary(f.type) for f in part.schema):  # polars cannot write bytes as JSON (it panics)
        rows = part.to_pylist()
        return pa.array([orjson.dumps(row, default=_jsonable).decode() for row in rows], pa.string())
    df = pl.from_arrow(pa.Table.from_batches([batch.select(cols)]))
    encoded = df.select(pl.struct(sorted(cols)).struct.json_encode().alias("m")).to_arrow().column("m")
    return encoded.combine_chunks().cast(pa.string())


def _has_binary(kind: pa.DataType) -> bool:
    """Whether values of ``kind`` hold bytes, at any depth."""
    if pa.types.is_dictionary(kind):
        return _has_binary(kind.value_type)
    if (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
            or getattr(pa.types, "is_binary_view", lambda _: False)(kind)):  # pyarrow >= 16
        return True
    return any(_has_binary(kind.field(i).type) for i in range(kind.num_fields))


def _jsonable(value):
    """What orjson writes for a value it has no JSON form for: bytes as base64 (as the JSON sinks write
    them), anything else as text."""
    try:
        return json_default(value)
    except TypeError:
        return str(value)


def rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(offset, batch)`` with at most ``rows`` rows each, counting rows from 0."""
    offset = 0
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            part = batch.slice(start, rows)
            yield offset, part
            offset += part.num_rows

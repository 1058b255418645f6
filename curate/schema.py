"""The data model: three Arrow schemas, each defined once here.

- **documents**: one text per row (``id``, ``text``, ``source``, ``meta``, optional ``scores``).
- **interleaved**: ``texts`` and ``images`` lists aligned position by position (OBELICS convention:
  at each position exactly one of the two is non-null).
- **sequences**: packed token rows for training, with ``doc_offsets`` (cu_seqlens) for
  document-masked attention and ``lineage`` naming everything that went in.

``scores`` is a struct of structs, ``scores.<stage>.<metric>``, that grows as filters run; it is absent
until the first scoring stage adds it. ``meta`` is a JSON object serialized as a string so that
heterogeneous sources share one schema.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Literal

import orjson
import pyarrow as pa

IMAGE = pa.struct(
    [
        ("bytes", pa.binary()),
        ("mime", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

DOCUMENTS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("meta", pa.string()),
    ]
)

INTERLEAVED = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("images", pa.list_(IMAGE), nullable=False),
        pa.field("source", pa.string()),
        pa.field("meta", pa.string()),
    ]
)

SEQUENCES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.uint8()), nullable=False),
        pa.field("doc_offsets", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("n_image_tokens", pa.int32(), nullable=False),
        pa.field("lineage", pa.list_(pa.string()), nullable=False),
    ]
)

Kind = Literal["documents", "interleaved", "sequences"]
SCHEMAS: dict[str, pa.Schema] = {"documents": DOCUMENTS, "interleaved": INTERLEAVED, "sequences": SEQUENCES}
#: Columns a schema may carry beyond its required ones.
OPTIONAL_COLUMNS = {"scores", "text"}


def string_array(values: Sequence[str | None]) -> pa.StringArray:
    """A string array from Python strings, without ``pa.array`` (see :mod:`curate.arrays`)."""
    from curate.arrays import strings

    return strings(values)


def documents_batch(
    ids: Sequence[str],
    texts: Sequence[str],
    sources: Sequence[str | None] | None = None,
    metas: Sequence[dict | str | None] | None = None,
) -> pa.RecordBatch:
    """Build a documents batch; ``metas`` entries may be dicts (serialized with sorted keys)."""
    n = len(ids)
    sources = list(sources) if sources is not None else [None] * n
    metas = [_meta_json(m) for m in metas] if metas is not None else [None] * n
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(texts, pa.string()), pa.array(sources, pa.string()),
         pa.array(metas, pa.string())],
        schema=DOCUMENTS,
    )


def json_default(obj):
    """orjson's ``default`` for Arrow values: bytes become base64 text (JSON has no bytes); anything
    else is a TypeError."""
    if isinstance(obj, (bytes, bytearray)):
        return base64.b64encode(obj).decode()
    raise TypeError(f"{type(obj).__name__} has no JSON form")


def meta_value(meta: str):
    """A ``meta`` string as the JSON value it holds, or the string itself when it is not JSON (a
    ``schema: table`` source's own ``meta`` column, which curate did not write)."""
    try:
        return orjson.loads(meta)
    except orjson.JSONDecodeError:
        return meta


def _meta_json(meta: dict | str | None) -> str | None:
    if meta is None or isinstance(meta, str):
        return meta
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode()


def kind_of(schema: pa.Schema) -> Kind | None:
    """Which of the three schemas ``schema`` carries (by its required columns), or None."""
    names = set(schema.names)
    for kind in ("sequences", "interleaved", "documents"):
        if set(SCHEMAS[kind].names) <= names:
            return kind  # type: ignore[return-value]
    return None


def validate(batch: pa.RecordBatch | pa.Table, kind: Kind) -> None:
    """Raise ``ValueError`` naming the first column that is missing, mistyped or null where required."""
    expected = SCHEMAS[kind]
    for field in expected:
        if field.name not in batch.schema.names:
            raise ValueError(f"{kind} batch lacks column {field.name!r}")
        got = batch.schema.field(field.name).type
        if not got.equals(field.type):
            raise ValueError(f"{kind} column {field.name!r} has type {got}, expected {field.type}")
        if not field.nullable and batch.column(field.name).null_count:
            raise ValueError(f"{kind} column {field.name!r} has nulls")
    if "scores" in batch.schema.names and not pa.types.is_struct(batch.schema.field("scores").type):
        raise ValueError("column 'scores' must be a struct of <stage>: struct<metric: value>")
    if kind == "interleaved":
        _validate_alignment(batch)


def _validate_alignment(batch: pa.RecordBatch | pa.Table) -> None:
    texts = batch.column("texts").to_pylist()
    images = batch.column("images").to_pylist()
    for row, (t, i) in enumerate(zip(texts, images)):
        if len(t) != len(i):
            raise ValueError(f"interleaved row {row}: texts and images differ in length")
        if any((a is None) == (b is None) for a, b in zip(t, i)):
            raise ValueError(f"interleaved row {row}: each position needs exactly one of text or image")


def with_scores(batch: pa.RecordBatch, stage: str, metrics: dict[str, pa.Array]) -> pa.RecordBatch:
    """Return ``batch`` with ``scores.<stage>`` set to a struct of ``metrics`` (replacing an old one)."""
    new = pa.StructArray.from_arrays(list(metrics.values()), names=list(metrics))
    if "scores" in batch.schema.names:
        idx = batch.schema.get_field_index("scores")
        old: pa.StructArray = batch.column(idx)
        names = [f.name for f in old.type if f.name != stage]
        arrays = [old.field(n) for n in names]
        scores = pa.StructArray.from_arrays(arrays + [new], names=names + [stage])
        return batch.set_column(idx, "scores", scores)
    return batch.append_column("scores", pa.StructArray.from_arrays([new], names=[stage]))


def score_column(batch: pa.RecordBatch | pa.Table, path: str) -> pa.Array:
    """Fetch a dotted column path such as ``scores.heuristics.word_count`` or ``n_tokens``."""
    parts = path.split(".")
    missing = KeyError(f"no column {path!r}; the batch has {column_paths(batch.schema)}")
    if parts[0] not in batch.schema.names:
        raise missing
    col = batch.column(parts[0])
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    for part in parts[1:]:
        if not pa.types.is_struct(col.type) or col.type.get_field_index(part) < 0:
            raise missing
        col = col.field(part)
    return col


def column_paths(schema: pa.Schema) -> list[str]:
    """All leaf column paths of a schema, with struct fields dotted (``scores.select.rank``)."""
    out: list[str] = []

    def walk(prefix: str, typ: pa.DataType) -> None:
        if pa.types.is_struct(typ):
            for f in typ:
                walk(f"{prefix}.{f.name}", f.type)
        else:
            out.append(prefix)

    for f in schema:
        walk(f.name, f.type)
    return out

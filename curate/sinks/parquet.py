"""Parquet shards, readable by ``datasets.load_dataset("parquet", data_files=...)`` unchanged.

Each flush of the writer's buffer (about 32 MB of Arrow data) becomes one row group.

``images: feature`` writes an ``images`` column (interleaved rows) the way ``datasets`` stores its
``Image`` feature — ``list<struct<bytes, path>>`` with the features recorded in the file's schema
metadata — so ``load_dataset`` hands back PIL images (``None`` at text positions); each image's mime,
sha256, width and height move to a parallel ``image_info`` column. The default (``struct``) keeps the
interleaved schema as it is, which curate's own readers and ``datasets`` (as plain structs) both read.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from curate.plugins import register_sink
from curate.sinks.base import Encoder, Sink, SinkParams, pyarrow_sink


class ParquetParams(SinkParams):
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = Field("zstd", description="page codec")
    compression_level: int | None = Field(None, description="codec level (zstd: 1-22)")
    images: Literal["struct", "feature"] = Field(
        "struct", description="struct: images as the interleaved schema's structs; feature: as the `datasets` "
                              "Image feature (PIL images on load), details in an `image_info` column")


#: What ``images: feature`` writes: the storage of ``datasets.Image`` and the details beside it.
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
IMAGE_INFO = pa.struct([("mime", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32())])


def _has_image_list(schema: pa.Schema) -> bool:
    if "images" not in schema.names:
        return False
    t = schema.field("images").type
    return pa.types.is_list(t) and pa.types.is_struct(t.value_type) and t.value_type.get_field_index("bytes") >= 0


def feature_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with ``images`` as the Image feature's storage, ``image_info`` after it, and the
    ``datasets`` features in the metadata."""
    import json

    import datasets

    fields = []
    for f in schema:
        if f.name == "images":
            # nullable: `datasets` takes a feature from the metadata only for a field equal to its own
            fields += [pa.field("images", pa.list_(HF_IMAGE)), pa.field("image_info", pa.list_(IMAGE_INFO))]
        elif f.name != "image_info":
            fields.append(f)
    plain = pa.schema(fields)
    features = datasets.Features.from_arrow_schema(plain)
    features["images"] = datasets.List(datasets.Image())
    meta = dict(plain.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": features.to_dict()}}).encode()
    return plain.with_metadata(meta)


def to_feature_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` in :func:`feature_schema`'s layout (list offsets and nulls kept as they are)."""
    images = batch.column("images")
    values = images.values
    n = len(values)
    struct_nulls = values.is_null()
    stored = pa.StructArray.from_arrays([values.field("bytes"), pa.nulls(n, pa.string())], fields=list(HF_IMAGE),
                                        mask=struct_nulls)
    info = pa.StructArray.from_arrays([values.field(k).cast(IMAGE_INFO.field(k).type) for k in
                                       ("mime", "sha256", "width", "height")], fields=list(IMAGE_INFO),
                                      mask=struct_nulls)
    offsets = images.offsets
    validity = images.is_null()
    new_images = pa.ListArray.from_arrays(offsets, stored, mask=validity)
    new_info = pa.ListArray.from_arrays(offsets, info, mask=validity)
    columns = []
    for f in schema:
        if f.name == "images":
            columns.append(new_images)
        elif f.name == "image_info":
            columns.append(new_info)
        else:
            columns.append(batch.column(f.name))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class ParquetEncoder(Encoder):
    def __init__(self, fh, schema: pa.Schema, params: ParquetParams):
        super().__init__(fh, schema, params)
        self.features = params.images == "feature" and _has_image_list(schema)
        if self.features:  # batches keep their schema until written
            schema = self.file_schema = feature_schema(schema)
        codec = None if params.compression == "none" else params.compression
        # Dictionary-encoding integer lists (token ids, masks, offsets) costs 7× the CPU and 2× the
        # memory of plain encoding for little gain once zstd runs; keep it for the other columns.
        plain = {f.name for f in schema if pa.types.is_list(f.type) and pa.types.is_integer(f.type.value_type)}
        dictionary = [f.name for f in schema if f.name not in plain]
        self.writer = pq.ParquetWriter(pyarrow_sink(fh), schema, compression=codec,
                                       compression_level=params.compression_level, use_dictionary=dictionary)

    def write(self, batch: pa.RecordBatch) -> None:
        if self.features:
            batch = to_feature_batch(batch, self.file_schema)
        self.writer.write_batch(batch, row_group_size=1 << 30)

    def write_many(self, batches: list[pa.RecordBatch]) -> None:
        if self.features:
            batches = [to_feature_batch(b, self.file_schema) for b in batches]
        self.writer.write_table(pa.Table.from_batches(batches), row_group_size=1 << 30)

    def close(self) -> None:
        self.writer.close()


@register_sink("parquet")
class ParquetSink(Sink):
    Params = ParquetParams
    extension = "parquet"
    encoder = ParquetEncoder
    buffer_bytes = 32 << 20


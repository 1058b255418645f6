"""JSON Lines shards (optionally compressed); binary columns are written as base64 strings."""

from __future__ import annotations

import gzip
from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.plugins import register_sink
from curate.sinks.base import Encoder, Sink, SinkParams, dumps_rows


class JsonlParams(SinkParams):
    compression: Literal["none", "gzip", "zstd"] = Field("none", description="whole-file codec")


class JsonlEncoder(Encoder):
    def __init__(self, fh, schema: pa.Schema, params: JsonlParams):
        super().__init__(fh, schema, params)
        if params.compression == "gzip":
            self.out = gzip.GzipFile(fileobj=fh, mode="wb", mtime=0)
        elif params.compression == "zstd":
            import zstandard

            self.out = zstandard.ZstdCompressor().stream_writer(fh, closefd=False)
        else:
            self.out = fh

    def write(self, batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, 256):  # Python rows in small slices: bounded memory
            rows = batch.slice(start, 256).to_pylist()
            self.out.write(b"".join(line + b"\n" for line in dumps_rows(rows, "jsonl", self.schema)))

    def close(self) -> None:
        if self.out is not self.fh:
            self.out.close()


@register_sink("jsonl")
class JsonlSink(Sink):
    Params = JsonlParams
    encoder = JsonlEncoder

    @property
    def extension(self) -> str:  # type: ignore[override]
        return {"none": "jsonl", "gzip": "jsonl.gz", "zstd": "jsonl.zst"}[self.params.compression]

"""Arrow IPC (random-access file format) shards, memory-mappable by training loaders."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.plugins import register_sink
from curate.sinks.base import Encoder, Sink, SinkParams, pyarrow_sink


class ArrowParams(SinkParams):
    compression: Literal["none", "lz4", "zstd"] = Field("none", description="IPC buffer codec (none keeps files memory-mappable)")


class ArrowEncoder(Encoder):
    def __init__(self, fh, schema: pa.Schema, params: ArrowParams):
        super().__init__(fh, schema, params)
        codec = None if params.compression == "none" else params.compression
        self.writer = pa.ipc.new_file(pyarrow_sink(fh), schema, options=pa.ipc.IpcWriteOptions(compression=codec))

    def write(self, batch: pa.RecordBatch) -> None:
        self.writer.write_batch(batch)

    def close(self) -> None:
        self.writer.close()


@register_sink("arrow")
class ArrowSink(Sink):
    Params = ArrowParams
    extension = "arrow"
    encoder = ArrowEncoder
    buffer_bytes = 16 << 20

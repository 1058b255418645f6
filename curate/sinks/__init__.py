"""Writers, selected by ``sink: {kind: ...}``; importing this package registers them all."""

from curate.sinks import arrow_ipc, jsonl, parquet, webdataset  # noqa: F401
from curate.sinks.base import ShardWriter, Sink, write_index

__all__ = ["Sink", "ShardWriter", "write_index"]

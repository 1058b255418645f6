"""Readers, selected by ``source: {kind: ...}``; importing this package registers them all."""

from curate.readers import arrow_ipc, huggingface, jsonl, parquet, stdlib_docs, webdataset  # noqa: F401
from curate.readers.base import Reader, Shard

__all__ = ["Reader", "Shard"]

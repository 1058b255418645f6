"""Readers, selected by ``source: {kind: ...}``; importing this package registers them all."""

from curate.readers import (  # noqa: F401
    arrow_ipc,
    hf_images,
    huggingface,
    image_folder,
    img2dataset,
    jsonl,
    parquet,
    stdlib_docs,
    webdataset,
)
from curate.readers.base import Reader, Shard

__all__ = ["Reader", "Shard"]

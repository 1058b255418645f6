"""Hugging Face ``datasets``: a directory from ``save_to_disk``, or anything ``load_dataset`` takes.

- ``kind: hf_disk``: each Arrow file of the saved dataset is a shard, read directly (no cache copy).
- ``kind: hf``: ``datasets.load_dataset(path, name, split, data_files, streaming=True)``; a local folder
  or data files work offline, a Hub id where a network exists. The streaming dataset's own shards
  (``n_shards``) are the shards here. Without an ``id_field``, ids are ``<path>:<row>`` for one shard
  and ``<path>[<shard>]:<row>`` for several (rows counted within each shard).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pyarrow as pa
from pydantic import Field

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers.arrow_ipc import ipc_schema, read_ipc_shard
from curate.readers.base import FieldParams, Reader, ReaderParams, Shard, content_key, list_files
from curate.readers.columnar import check_columns, to_documents
from curate.seeds import digest


@register_source("hf_disk")
class HfDiskReader(Reader):
    """A folder written by `Dataset.save_to_disk`; each of its Arrow files is a shard."""

    class Params(ReaderParams):
        paths: list[str] = Field(description="directories written by Dataset.save_to_disk")
        split: str | None = Field(None, description="split to read when the directory is a DatasetDict")

    def shards(self) -> list[Shard]:
        files: list[str] = []
        for root in self.params.paths:
            root = os.path.expanduser(root)
            if os.path.exists(os.path.join(root, "dataset_dict.json")):
                if not self.params.split:
                    splits = json.load(open(os.path.join(root, "dataset_dict.json")))["splits"]
                    raise ConfigError(f"{root}: source.split: a DatasetDict; choose one of {splits}")
                root = os.path.join(root, self.params.split)
            state = os.path.join(root, "state.json")
            if not os.path.exists(state):
                raise ConfigError(f"{root}: source.paths: not a dataset saved with save_to_disk (no state.json)")
            files += [os.path.join(root, f["filename"]) for f in json.load(open(state))["_data_files"]]
        listed = list_files(files)
        for uri, _, _ in listed:
            check_columns(uri, ipc_schema(uri), self.params)
        return [Shard(f"{i:05d}", content_key(uri, info), uri, rel) for i, (uri, info, rel) in enumerate(listed)]

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        yield from read_ipc_shard(shard, self.params, ctx)


@register_source("hf")
class HfLoadReader(Reader):
    """Anything `datasets.load_dataset(..., streaming=True)` opens; its own shards are the shards."""

    class Params(FieldParams):
        path: str = Field(description="a Hub dataset id, a builder name (json, parquet…) or a local folder")
        name: str | None = Field(None, description="dataset configuration name")
        split: str = Field("train", description="split to read")
        data_files: list[str] | None = Field(None, description="data files for builder names like json/parquet")
        revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")

    def _dataset(self):
        import datasets

        p = self.params
        return datasets.load_dataset(p.path, p.name, split=p.split, data_files=p.data_files,
                                     revision=p.revision, streaming=True)

    def shards(self) -> list[Shard]:
        ds = self._dataset()
        p = self.params
        base = digest(p.path, p.name, p.split, p.data_files, p.revision, size=12).hex()
        # ids are `<rel>:<row>` with rows counted per shard: a dataset of several shards names each
        # one (`path[i]`) so that ids stay unique across them
        n = ds.num_shards
        return [Shard(f"{i:05d}", f"{base}-{i}", p.path, p.path if n == 1 else f"{p.path}[{i}]", i, i + 1,
                      {"n_shards": n}) for i in range(n)]

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        ds = self._dataset().shard(num_shards=shard.extra["n_shards"], index=shard.start)
        row = 0
        for table in ds.with_format("arrow").iter(batch_size=self.params.batch_rows):
            for batch in table.to_batches():
                docs = to_documents(batch, row, shard, self.params, ctx)
                row += batch.num_rows
                if docs is not None:
                    yield docs

"""WebDataset tar shards, readable by ``webdataset.WebDataset(...)`` unchanged.

One sample per row, key ``<file stem>_<row>``. Members: ``txt`` for a ``text`` column; images of an
interleaved row as their own files (``000.jpg``, ``001.png`` … by position); integer lists (token
ids, masks, offsets) as ``<column>.npy``; every other column in one ``json`` member (``meta`` parsed
back into an object, interleaved ``texts`` with ``images`` as file names). Tar headers carry a fixed
mtime, user and group, so the same rows give the same bytes.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import orjson
import pyarrow as pa

from curate.plugins import register_sink
from curate.readers.webdataset import IMAGE_EXTENSIONS
from curate.sinks.base import Encoder, Sink, SinkParams

_EXT_OF_MIME = {mime: ext for ext, mime in reversed(list(IMAGE_EXTENSIONS.items()))}


class WebDatasetEncoder(Encoder):
    """Writes samples as ``webdataset.TarWriter`` does (sorted members, fixed headers) with ``tarfile``:
    importing ``webdataset`` would import torch (~250 MB) in every worker process."""

    def __init__(self, fh, schema: pa.Schema, params: SinkParams):
        super().__init__(fh, schema, params)
        self.tar = tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT)
        self.stem = fh.path.name.split(".")[0]
        self.count = 0
        self.npy = [f.name for f in schema if pa.types.is_list(f.type) and pa.types.is_integer(f.type.value_type)]

    def write(self, batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, 128):  # Python rows in small slices: bounded memory
            self._write_rows(batch.slice(start, 128).to_pylist())

    def _write_rows(self, rows: list[dict]) -> None:
        for row in rows:
            sample = self._sample(row)
            key = sample.pop("__key__")
            for field in sorted(sample):
                data = sample[field]
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "curate"
                self.tar.addfile(info, io.BytesIO(data))
            self.count += 1

    def _sample(self, row: dict) -> dict:
        sample: dict = {"__key__": f"{self.stem}_{self.count:07d}"}
        if "text" in row and isinstance(row["text"], str):
            sample["txt"] = row.pop("text").encode()
        if "images" in row and "texts" in row:
            names = []
            for i, image in enumerate(row.pop("images")):
                if image is None:
                    names.append(None)
                    continue
                name = f"{i:03d}.{_EXT_OF_MIME.get(image['mime'], 'bin')}"
                sample[name] = image["bytes"]
                names.append({"file": name, **{k: v for k, v in image.items() if k != "bytes"}})
            row["images"] = names
        for col in self.npy:
            if col in row:
                buf = io.BytesIO()
                np.save(buf, np.asarray(row.pop(col)), allow_pickle=False)
                sample[f"{col}.npy"] = buf.getvalue()
        if isinstance(row.get("meta"), str):
            row["meta"] = orjson.loads(row["meta"])
        sample["json"] = orjson.dumps(row, option=orjson.OPT_SORT_KEYS)
        return sample

    def close(self) -> None:
        self.tar.close()


@register_sink("webdataset")
class WebDatasetSink(Sink):
    extension = "tar"
    encoder = WebDatasetEncoder

"""WebDataset tar shards, readable by ``webdataset.WebDataset(...)`` unchanged.

One sample per row, key ``<file stem>_<row>``. Members: ``txt`` for a ``text`` column; the images of
an ``images`` column (interleaved rows, captioned images) as their own files (``000.jpg``, ``001.png``
… by position; an image struct whose ``bytes`` are null has no file, its ``json`` entry says ``file:
null``); integer lists (token ids, masks, offsets) as ``<column>.npy`` in the column's own Arrow width
(``input_ids`` int32 → ``<i4``, ``loss_mask`` uint8 → ``|u1``; ``np.load`` gives back the same dtype
and values); every other column in one ``json`` member (``meta`` parsed back into an object,
interleaved ``texts`` with ``images`` as file names). An integer list that is null, or holds nulls, has
no ``.npy`` form and goes into ``json`` as it is, and so does an integer-list column whose name cannot
name a member that ``webdataset`` reads back as that column (see :func:`member_name_ok`: no ``/``, no
control character, no upper case, no leading ``__``, at most 64 bytes). Only a list of image structs is
taken for images; an ``images`` column of any other type goes into ``json``. A ``meta`` string that is
not JSON is kept as the string; binary values are base64 text in ``json`` (as in JSONL), and a value JSON cannot hold (a
decimal, a duration) is an error naming its column. The sample key never derives from the row's ``id``
(which ``json`` keeps as it is), so any id round-trips. Tar headers carry a fixed mtime, user and group,
so the same rows give the same bytes.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import orjson
import pyarrow as pa

from curate.plugins import register_sink
from curate.readers.webdataset import IMAGE_EXTENSIONS
from curate.schema import meta_value
from curate.sinks.base import Encoder, Sink, SinkParams, dumps_rows

_EXT_OF_MIME = {mime: ext for ext, mime in reversed(list(IMAGE_EXTENSIONS.items()))}


class WebDatasetEncoder(Encoder):
    """Writes samples as ``webdataset.TarWriter`` does (sorted members, fixed headers) with ``tarfile``:
    importing ``webdataset`` would import torch (~250 MB) in every worker process."""

    def __init__(self, fh, schema: pa.Schema, params: SinkParams):
        super().__init__(fh, schema, params)
        self.tar = tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT)
        self.stem = fh.path.name.split(".")[0]
        self.count = 0
        self.npy = [f.name for f in schema if _is_int_list(f.type) and member_name_ok(f.name)]
        self.images = _is_image_list(schema.field("images").type) if "images" in schema.names else False

    def write(self, batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, 128):  # Python rows in small slices: bounded memory
            part = batch.slice(start, 128)
            # integer lists go to numpy straight from Arrow buffers, in their own dtype
            arrays = {c: _row_arrays(part.column(c)) for c in self.npy if c in part.schema.names}
            rest = part.select([n for n in part.schema.names if n not in arrays])
            self._write_rows(rest.to_pylist(), arrays, part)

    def _write_rows(self, rows: list[dict], arrays: dict[str, list], part: pa.RecordBatch) -> None:
        for i, row in enumerate(rows):
            npy = {}
            for col, per_row in arrays.items():
                if per_row[i] is None:  # null list or null elements: keep it in json
                    row[col] = part.column(col)[i].as_py()
                else:
                    npy[col] = per_row[i]
            sample = self._sample(row, npy)
            key = sample.pop("__key__")
            for field in sorted(sample):
                data = sample[field]
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uname = info.gname = "curate"
                self.tar.addfile(info, io.BytesIO(data))
            self.count += 1

    def _sample(self, row: dict, npy: dict[str, np.ndarray]) -> dict:
        sample: dict = {"__key__": f"{self.stem}_{self.count:07d}"}
        if "text" in row and isinstance(row["text"], str):
            sample["txt"] = row.pop("text").encode()
        if self.images and isinstance(row.get("images"), list):  # interleaved rows, and image rows (captions)
            names = []
            for i, image in enumerate(row.pop("images")):
                if image is None:
                    names.append(None)
                    continue
                if image.get("bytes") is None:  # a struct without data: its entry, but no file to write
                    names.append({"file": None, **{k: v for k, v in image.items() if k != "bytes"}})
                    continue
                name = f"{i:03d}.{_EXT_OF_MIME.get(image.get('mime'), 'bin')}"  # no mime (datasets' Image): .bin
                sample[name] = image["bytes"]
                names.append({"file": name, **{k: v for k, v in image.items() if k != "bytes"}})
            row["images"] = names
        for col, array in npy.items():
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            sample[f"{col}.npy"] = buf.getvalue()
        if isinstance(row.get("meta"), str):
            row["meta"] = meta_value(row["meta"])
        sample["json"] = dumps_rows([row], "webdataset", self.schema, orjson.OPT_SORT_KEYS)[0]
        return sample

    def close(self) -> None:
        self.tar.close()


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def _is_image_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type) \
        and t.value_type.get_field_index("bytes") >= 0


def member_name_ok(column: str) -> bool:
    """Whether ``<key>.<column>.npy`` reads back as ``<column>.npy`` of the same sample: webdataset
    splits a member name at the last ``/``, lower-cases extensions and leaves ``__…`` fields undecoded,
    tar truncates at NUL, and a USTAR name holds 100 bytes."""
    return (0 < len(column.encode("utf-8")) <= 64 and "/" not in column and column.isprintable()
            and column == column.lower() and not column.startswith("__"))


def _row_arrays(column: pa.Array) -> list[np.ndarray | None]:
    """Each row of an integer-list column as a numpy array of the column's value type (a view into
    one buffer per slice), or None for a null row or a row holding nulls."""
    offsets = column.offsets.to_numpy()  # honours the slice; ``values`` does not, offsets index it
    values = column.values
    dtype = np.dtype(values.type.to_pandas_dtype())
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    lo, hi = int(offsets[0]), int(offsets[-1])
    window = values.slice(lo, hi - lo)
    flat = None if window.null_count else window.to_numpy()
    out: list[np.ndarray | None] = []
    for i in range(len(column)):
        a, b = int(offsets[i]) - lo, int(offsets[i + 1]) - lo
        if nulls[i]:
            out.append(None)
        elif flat is not None:
            out.append(np.ascontiguousarray(flat[a:b], dtype=dtype))
        else:  # nulls somewhere in this slice: check the row itself
            row = window.slice(a, b - a)
            out.append(None if row.null_count else np.ascontiguousarray(row.to_numpy(), dtype=dtype))
    return out


@register_sink("webdataset")
class WebDatasetSink(Sink):
    extension = "tar"
    encoder = WebDatasetEncoder

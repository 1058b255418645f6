"""Image datasets of Hugging Face ``datasets`` (``kind: hf_images``), as interleaved rows.

``path`` is either a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (then
each of its Arrow files is a shard, read directly; ``split`` picks a split of a DatasetDict), or
anything ``datasets.load_dataset(path, name, split=…, data_dir=…, data_files=…, streaming=True)``
opens — ``imagefolder`` with ``data_dir``, a local folder, Parquet files with an ``Image`` feature
(then the streaming dataset's own shards are the shards; a local folder's files, sizes and
modification times are in the content key).

``image_column`` holds an ``Image`` feature (Arrow ``struct<bytes, path>``), a list of them
(``Sequence(Image())``: every image of the row, in order), raw image bytes or a file path. An image
given only by ``path`` is read from that file (a relative path from the dataset folder, else from the
working directory). A row is ``[image, …, text]``, or only its images when it has no text:
``text_column: auto`` (the default) takes ``text``, else ``caption``, else none; ``null`` takes no
text; a name takes that column (it must exist). ``id`` is ``id_column`` when given, else
``<file or dataset>:<row>`` (row 0-based within the shard, which the id names). The other columns
(or ``meta_columns``) become ``meta``, ClassLabel integers as their names, with the image's original
``image_path`` (``image_paths`` for lists) when there is one.

Counted under ``read`` and written to ``failures/``, the row skipped: ``missing_image`` (null or empty),
``missing_image_file`` (a path that does not exist), ``unreadable_file`` (a path that cannot be read,
or Arrow data that cannot be read, which ends the file), ``undecodable_image`` (Pillow cannot read the
header), ``missing_id_field`` (a null ``id_column``). ``shards()`` raises ConfigError naming the file
or dataset when the image column (or a named text/id column) is missing or of another type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from pydantic import Field, field_validator

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers.arrow_ipc import ipc_schema, open_ipc
from curate.readers.base import Reader, Shard, content_key, list_files
from curate.readers.columnar import rebatch
from curate.readers.image_folder import ImageBatchParams, InterleavedBuilder, image_record, meta_string
from curate.readers.webdataset import IMAGE_EXTENSIONS
from curate.seeds import digest


@register_source("hf_images")
class HfImagesReader(Reader):
    """A saved (``save_to_disk``) or loadable (``load_dataset``) dataset with an image column."""

    class Params(ImageBatchParams):
        path: str = Field(description="a save_to_disk folder, or what datasets.load_dataset takes "
                          "(imagefolder, parquet, a local folder, a Hub id where a network exists)")
        split: str | None = Field(None, description="split (a DatasetDict folder needs one; load_dataset: train)")
        name: str | None = Field(None, description="load_dataset configuration name")
        data_dir: str | None = Field(None, description="load_dataset data_dir (e.g. an imagefolder's folder)")
        data_files: list[str] | None = Field(None, description="load_dataset data_files")
        revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
        image_column: str = Field("image", description="column with the Image feature (or a list of them)")
        text_column: str | None = Field("auto", description="column with the caption/text; auto: text, else "
                                        "caption, else none; null: images only")
        id_column: str | None = Field(None, description="column with a unique id; default <file>:<row>")
        meta_columns: list[str] | None = Field(None, description="columns kept in meta; default all others")

        @field_validator("data_files", mode="before")
        @classmethod
        def _one_file(cls, v):
            return [v] if isinstance(v, str) else v

    def output_kind(self) -> str:
        return "interleaved"

    # ------------------------------------------------------------------ listing
    def _saved_root(self) -> Path | None:
        """The save_to_disk folder (a split's folder for a DatasetDict), or None when ``path`` is not one."""
        root = Path(os.path.expanduser(self.params.path))
        if (root / "dataset_dict.json").is_file():
            splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
            if not self.params.split:
                raise ConfigError(f"{self.params.path}: source.split: a saved DatasetDict; choose one of {splits}")
            if self.params.split not in splits:
                raise ConfigError(f"{self.params.path}: source.split: no split {self.params.split!r} "
                                  f"(has {splits})")
            root = root / self.params.split
        return root if (root / "state.json").is_file() else None

    def shards(self) -> list[Shard]:
        """Saved folders: one shard per Arrow file; otherwise the streaming dataset's shards.
        ConfigError when the columns do not fit (see the module docstring)."""
        root = self._saved_root()
        if root is not None:
            state = json.loads((root / "state.json").read_text())
            files = [str(root / f["filename"]) for f in state["_data_files"]]
            out = []
            for i, (uri, info, rel) in enumerate(list_files(files)):
                schema = ipc_schema(uri)
                columns = self._check(uri, _features_of(schema), schema.names, schema)
                out.append(Shard(f"{i:05d}", content_key(uri, info), uri, rel, extra={"base": str(root), **columns}))
            return out
        ds = self._dataset()
        if ds.features:
            columns = self._check(self.params.path, ds.features.to_dict(), list(ds.features))
        else:  # a streaming dataset that does not declare its features: columns are resolved per batch
            columns = {"text_column": self.params.text_column, "labels": {}}
        p = self.params
        base = digest(p.path, p.name, p.split, p.data_dir, p.data_files, p.revision, _local_stamp(p), size=12).hex()
        where = os.path.expanduser(p.data_dir or p.path)
        return [Shard(f"{i:05d}", f"{base}-{i}", p.path, p.path, i, i + 1,
                      {"n_shards": ds.num_shards, "base": where if os.path.isdir(where) else "", **columns})
                for i in range(ds.num_shards)]

    def _check(self, where: str, features: dict, names: list[str], schema: pa.Schema | None = None) -> dict:
        """The resolved text column and ClassLabel names; ConfigError naming ``where`` when a column is
        missing or the image column holds no images."""
        p = self.params
        if p.image_column not in names:
            raise ConfigError(f"{where}: source.image_column: no column {p.image_column!r} (has {names})")
        feature = features.get(p.image_column)
        if feature is not None:
            fits, kind = _is_image_feature(feature), _type_name(feature)
        elif schema is not None:
            kind = schema.field(p.image_column).type
            fits = _is_image_type(kind)
        else:
            fits, kind = True, None
        if not fits:
            raise ConfigError(f"{where}: source.image_column: column {p.image_column!r} is {kind}, "
                              "not an Image feature (or a list of them, image bytes or file paths)")
        text = p.text_column
        if text == "auto":
            text = next((c for c in ("text", "caption") if c in names and c != p.image_column), None)
        elif text is not None and text not in names:
            raise ConfigError(f"{where}: source.text_column: no column {text!r} (has {names})")
        if p.id_column and p.id_column not in names:
            raise ConfigError(f"{where}: source.id_column: no column {p.id_column!r} (has {names})")
        labels = {k: v["names"] for k, v in features.items()
                  if isinstance(v, dict) and v.get("_type") == "ClassLabel" and v.get("names")}
        return {"text_column": text, "labels": labels}

    def _dataset(self):
        import datasets

        p = self.params
        try:
            return datasets.load_dataset(p.path, p.name, split=p.split or "train", data_dir=p.data_dir,
                                         data_files=p.data_files, revision=p.revision, streaming=True)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{p.path}: cannot open the dataset: {type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------ reading
    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        if shard.extra.get("n_shards") is None:
            yield from self._read_saved(shard, ctx)
            return
        ds = self._dataset().shard(num_shards=shard.extra["n_shards"], index=shard.start)
        builder = InterleavedBuilder(self.params.batch_rows, int(self.params.batch_bytes))
        row = 0
        rel = f"{shard.rel}:{shard.name}"
        for table in ds.with_format("arrow").iter(batch_size=self.params.batch_rows):
            for batch in table.to_batches():
                yield from self._rows(batch, row, rel, shard, builder, ctx)
                row += batch.num_rows
        last = builder.flush()
        if last is not None:
            yield last

    def _read_saved(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        builder = InterleavedBuilder(self.params.batch_rows, int(self.params.batch_bytes))
        row = 0
        try:
            for offset, batch in rebatch(open_ipc(shard.uri), self.params.batch_rows):
                row = offset + batch.num_rows
                yield from self._rows(batch, offset, shard.rel, shard, builder, ctx)
        except (pa.ArrowInvalid, OSError) as e:
            ctx.failure("unreadable_file", f"Arrow IPC data cannot be read after row {row - 1}: {e}",
                        file=shard.uri, line=row - 1 if row else None, offset=None, lost=None)
        last = builder.flush()
        if last is not None:
            yield last

    def _rows(self, batch: pa.RecordBatch, first_row: int, rel: str, shard: Shard, builder: InterleavedBuilder,
              ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        text_column = shard.extra.get("text_column")
        labels = shard.extra.get("labels", {})
        names = batch.schema.names
        if text_column == "auto":
            text_column = next((c for c in ("text", "caption") if c in names and c != p.image_column), None)
        missing = [c for c in (p.image_column, text_column, p.id_column) if c and c not in names]
        if missing:
            raise ConfigError(f"{shard.uri}: rows from row {first_row} lack column(s) {missing} (have {names})")
        own = {p.image_column, text_column, p.id_column}
        meta_cols = [c for c in (p.meta_columns if p.meta_columns is not None else names)
                     if c in names and c not in own]
        meta_cols = [c for c in meta_cols if not _has_binary(batch.schema.field(c).type)]
        images = batch.column(p.image_column).to_pylist()
        texts = batch.column(text_column).to_pylist() if text_column else [None] * batch.num_rows
        ids = batch.column(p.id_column).to_pylist() if p.id_column else None
        metas = batch.select(meta_cols).to_pylist() if meta_cols else [{}] * batch.num_rows
        base = shard.extra.get("base") or ""
        for i in range(batch.num_rows):
            row = first_row + i
            if ids is not None and ids[i] is None:
                ctx.failure("missing_id_field", f"column {p.id_column!r} is null", file=shard.uri, line=row)
                continue
            got = self._images(images[i], base, shard, row, ctx)
            if got is None:
                continue
            records, paths = got
            meta = {k: (labels[k][v] if k in labels and isinstance(v, int) and 0 <= v < len(labels[k]) else v)
                    for k, v in metas[i].items()}
            if any(paths):
                if len(paths) == 1:
                    meta["image_path"] = paths[0]
                else:
                    meta["image_paths"] = paths
            text = texts[i] if isinstance(texts[i], str) and texts[i].strip() else None
            row_id = str(ids[i]) if ids is not None else f"{rel}:{row}"
            out = builder.add(row_id, records, text, shard.rel, meta_string(meta))
            if out is not None:
                yield out

    def _images(self, value: Any, base: str, shard: Shard, row: int, ctx) -> tuple[list[dict], list] | None:
        """The IMAGE structs of one cell and their original paths; None (counted) when one is unusable."""
        items = value if isinstance(value, list) else [value]
        if not items or any(v is None for v in items):
            ctx.failure("missing_image", f"column {self.params.image_column!r} is null or empty",
                        file=shard.uri, line=row)
            return None
        records, paths = [], []
        for k, item in enumerate(items):
            data, path = _bytes_and_path(item)
            where = f"image {k} ({path})" if path else f"image {k}"
            if data is None:
                if not path:
                    ctx.failure("missing_image", f"{where}: neither bytes nor path", file=shard.uri, line=row)
                    return None
                try:
                    data = _resolve(path, base).read_bytes()
                except FileNotFoundError:
                    ctx.failure("missing_image_file", f"{where}: no such file", file=shard.uri, line=row)
                    return None
                except OSError as e:
                    ctx.failure("unreadable_file", f"{where}: {e.strerror or e}", file=shard.uri, line=row)
                    return None
            hint = IMAGE_EXTENSIONS.get(path.rsplit(".", 1)[-1].lower()) if path and "." in path else None
            record = image_record(data, hint)
            if record is None:
                ctx.failure("undecodable_image", f"{where}: Pillow cannot read the image header ({len(data)} bytes)",
                            file=shard.uri, line=row, record=data[:64])
                return None
            records.append(record)
            paths.append(path)
        return records, paths


# ------------------------------------------------------------------------------- helpers
def _bytes_and_path(item: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) of one image cell: an Image struct, raw bytes or a path string."""
    if isinstance(item, dict):
        return item.get("bytes"), item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item), None
    if isinstance(item, str):
        return None, item
    return None, None


def _resolve(path: str, base: str) -> Path:
    """``path`` as given when absolute or when it exists from the working directory, else under ``base``."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or not base:
        return p
    under = Path(base) / p
    return under if under.exists() or not p.exists() else p


def _features_of(schema: pa.Schema) -> dict:
    """The ``datasets`` features recorded in an Arrow schema's metadata ({} without them)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return orjson.loads(raw).get("info", {}).get("features", {}) or {}
    except (orjson.JSONDecodeError, AttributeError):
        return {}


def _is_image_feature(feature: Any) -> bool:
    """True for Image, a list/sequence of Image, binary or string (path) values."""
    if isinstance(feature, list):
        return bool(feature) and _is_image_feature(feature[0])
    if not isinstance(feature, dict):
        return False
    kind = feature.get("_type")
    if kind == "Image":
        return True
    if kind in ("Sequence", "List", "LargeList"):
        return _is_image_feature(feature.get("feature"))
    return kind == "Value" and feature.get("dtype") in ("binary", "large_binary", "string", "large_string")


def _is_image_type(kind: pa.DataType) -> bool:
    """True for an Arrow type an image cell can have: struct<bytes, path>, binary, string, or a list of them."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _is_image_type(kind.value_type)
    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0 or kind.get_field_index("path") >= 0
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind))


def _type_name(feature: Any) -> str:
    if isinstance(feature, dict):
        return feature.get("_type", "?") + (f"({feature['dtype']})" if "dtype" in feature else "")
    return type(feature).__name__


def _has_binary(kind: pa.DataType) -> bool:
    """True when a column type is or holds binary data (another image column): never put in ``meta``."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return True
    if pa.types.is_struct(kind):
        return any(_has_binary(f.type) for f in kind)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _has_binary(kind.value_type)
    return False


def _local_stamp(p) -> str:
    """Names, sizes and modification times of the files under a local ``data_dir``/``path`` folder
    (so editing a local image folder changes the content key); "" for anything else."""
    folder = os.path.expanduser(p.data_dir or p.path)
    if not os.path.isdir(folder):
        return ""
    parts = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            parts.append(f"{os.path.relpath(os.path.join(root, name), folder)}:{st.st_size}:{st.st_mtime_ns}")
    return digest(*parts, size=12).hex()


"""WebDataset tar shards (local paths, globs or fsspec URLs); each tar is a shard.

A sample's text comes from the member with extension ``text_field`` (default ``txt``); its ``json``
member becomes ``meta`` (with ``id_field`` looked up there). With ``schema: interleaved``, image
members (jpg, png, webp, …) become an interleaved row: the images in member-name order, then the text.
Samples without the text member, and undecodable text, go to ``failures/`` with the tar and the
sample's position; image members seen in documents mode are counted as ``read`` metric
``image_members_ignored`` rather than dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from typing import Literal

import fsspec
import orjson
import pyarrow as pa
from pydantic import Field

from curate.context import READ_LABEL
from curate.plugins import register_source
from curate.readers.base import DocumentBuilder, Reader, ReaderParams, Shard, content_key, list_files
from curate.schema import INTERLEAVED

IMAGE_EXTENSIONS = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                    "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff"}


@register_source("webdataset")
class WebDatasetReader(Reader):
    class Params(ReaderParams):
        text_field: str = Field("txt", description="extension of the text member")
        schema_: Literal["documents", "interleaved"] = Field(
            "documents", alias="schema", description="interleaved: image members become images of the row")

    def output_kind(self) -> str:
        return self.params.schema_

    def shards(self) -> list[Shard]:
        return [Shard(f"{i:05d}", content_key(uri, info), uri, rel)
                for i, (uri, info, rel) in enumerate(list_files(self.params.paths, (".tar",)))]

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        interleaved = p.schema_ == "interleaved"
        builder = DocumentBuilder(p.batch_rows, int(p.batch_bytes))
        rows: list[dict] = []
        with fsspec.open(shard.uri, "rb") as fh:
            for n, sample in enumerate(iter_samples(fh, shard.uri)):
                doc = self._sample(sample, n, shard, ctx)
                if doc is None:
                    continue
                if interleaved:
                    rows.append(doc)
                    if len(rows) >= p.batch_rows:
                        yield _interleaved_batch(rows)
                        rows = []
                else:
                    batch = builder.add(doc["id"], doc["text"], shard.rel, doc["meta"])
                    if batch is not None:
                        yield batch
        last = _interleaved_batch(rows) if rows else builder.flush()
        if last is not None:
            yield last

    def _sample(self, sample: dict, n: int, shard: Shard, ctx) -> dict | None:
        p = self.params
        key = sample.get("__key__", str(n))
        raw = sample.get(p.text_field)
        if raw is None:
            ctx.failure("missing_text_field", f"sample {key!r} has no .{p.text_field}", file=shard.uri, line=n)
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            ctx.failure("invalid_utf8", f"sample {key!r}: {e}", file=shard.uri, line=n)
            return None
        if not text.strip():
            ctx.failure("empty_text", f"sample {key!r}", file=shard.uri, line=n)
            return None
        meta = orjson.loads(sample["json"]) if "json" in sample else {}
        doc_id = str(meta.get(p.id_field, key)) if p.id_field else f"{shard.rel}:{key}"
        images = [(ext, sample[ext]) for ext in sorted(sample) if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        if images and p.schema_ == "documents":
            ctx.stats[READ_LABEL].metric("image_members_ignored").add_many(len(images), len(images), 1, 1)
        meta_str = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode() if meta else None
        return {"id": doc_id, "text": text, "meta": meta_str, "source": shard.rel, "images": images}


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def iter_samples(fh, url: str) -> Iterator[dict]:
    """The samples of an open tar stream, grouped by key as ``webdataset`` groups them.

    A member ``dir/key.ext1.ext2`` belongs to sample ``dir/key`` under the (lower-cased) field
    ``ext1.ext2``; consecutive members with the same key form one sample. Read with the standard
    library's ``tarfile``: importing ``webdataset`` would import torch (~250 MB) in every worker.
    """
    current: dict | None = None
    with tarfile.open(fileobj=fh, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            match = _KEY.match(member.name)
            if match is None:
                continue
            key, field = match.group(1), match.group(2).lower()
            data = tf.extractfile(member).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[field] = data
    if current is not None:
        yield current


def _image(ext: str, data: bytes) -> dict:
    width, height = _size(data)
    return {"bytes": data, "mime": IMAGE_EXTENSIONS[ext.rsplit(".", 1)[-1]],
            "sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height}


def _size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header, or (None, None) without Pillow or for a header it
    cannot read; the bytes are kept either way (decoding belongs to the image stages)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None, None


def _interleaved_batch(rows: list[dict]) -> pa.RecordBatch:
    texts, images = [], []
    for r in rows:
        imgs = [_image(ext, data) for ext, data in r["images"]]
        texts.append([None] * len(imgs) + [r["text"]])
        images.append(imgs + [None])
    return pa.RecordBatch.from_pydict(
        {"id": [r["id"] for r in rows], "texts": texts, "images": images,
         "source": [r["source"] for r in rows], "meta": [r["meta"] for r in rows]},
        schema=INTERLEAVED,
    )

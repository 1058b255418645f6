"""Local image folders with sidecar captions (``kind: image_folder``), and the interleaved-row helpers
every image source shares.

Each folder in ``paths`` is walked recursively for files whose extension (any case) is an image
extension (:data:`curate.readers.webdataset.IMAGE_EXTENSIONS`); names starting with ``.`` (hidden
files and folders, temporaries) are skipped. The files are sorted by their relative path and cut into
shards of ``files_per_shard``; a shard never spans two folders. Its content key covers the relative
paths, sizes and modification times of its images and their sidecars, so a changed caption is a
changed input.

A row is ``[image, caption]`` (image at position 0, caption at position 1) or ``[image]`` when the
image has no caption. The caption is ``<stem>.txt`` beside the image (surrounding whitespace
stripped), else the ``caption_field`` of ``<stem>.json``; the rest of that JSON object, with the
image's relative ``path``, becomes ``meta``. ``id`` is the relative path: relative to the folder when
``paths`` names one, to the folders' common parent when it names several (so ids stay unique).
``source`` is the folder as listed.

Counted under ``read`` and written to ``failures/`` (file, reason), never fatal, the image skipped:

- ``undecodable_image``: Pillow cannot read the image's header;
- ``unreadable_file``: the image or a sidecar cannot be read;
- ``invalid_utf8`` (``.txt``), ``invalid_json`` / ``not_an_object`` (``.json``): a broken sidecar;
- ``missing_caption``: no caption while ``require_caption: true``.

Images kept without a caption are counted as the ``read`` metric ``images_without_caption``.
``shards()`` raises ConfigError for a path that is not a folder or a folder without images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
from pydantic import ByteSize, Field, field_validator

from curate.context import READ_LABEL
from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers.base import BatchParams, Reader, Shard
from curate.readers.webdataset import IMAGE_EXTENSIONS
from curate.schema import INTERLEAVED
from curate.seeds import digest


# ------------------------------------------------------------------------- shared helpers
def sniff_mime(data: bytes) -> str | None:
    """The image MIME type the bytes start like (JPEG, PNG, GIF, WebP, BMP, TIFF), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    return None


def image_record(data: bytes, mime_hint: str | None = None) -> dict | None:
    """The IMAGE struct of encoded ``data`` (bytes, mime, sha256 hex, displayed width and height), or
    None when Pillow cannot read its header. ``mime`` comes from the bytes' signature, else
    ``mime_hint`` (an extension's type), else ``application/octet-stream``."""
    from curate.images import image_size

    width, height = image_size(data)
    if width is None or height is None:
        return None
    return {"bytes": data, "mime": sniff_mime(data) or mime_hint or "application/octet-stream",
            "sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height}


def meta_string(meta: dict | None) -> str | None:
    """``meta`` as a JSON object string with sorted keys (None when empty); values JSON cannot hold
    (dates, decimals) are written as their ``str``."""
    if not meta:
        return None
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()


class ImageBatchParams(BatchParams):
    """Batch bounds of the image sources: ``batch_bytes`` counts image bytes as well as text."""

    batch_bytes: ByteSize = Field(ByteSize(16_000_000), description="most image and text bytes per batch")


class InterleavedBuilder:
    """Accumulates interleaved rows (images first, then an optional text) and cuts them into batches
    bounded by rows and by bytes (image bytes plus text bytes)."""

    def __init__(self, batch_rows: int, batch_bytes: int):
        self.batch_rows, self.batch_bytes = batch_rows, batch_bytes
        self._clear()

    def _clear(self) -> None:
        self.ids: list[str] = []
        self.texts: list[list[str | None]] = []
        self.images: list[list[dict | None]] = []
        self.sources: list[str | None] = []
        self.metas: list[str | None] = []
        self.nbytes = 0

    def add(self, row_id: str, images: list[dict], text: str | None, source: str | None,
            meta: str | None) -> pa.RecordBatch | None:
        """Add one row; returns a full batch when this row filled one."""
        self.ids.append(row_id)
        self.images.append([*images, None] if text is not None else list(images))
        self.texts.append([None] * len(images) + ([text] if text is not None else []))
        self.sources.append(source)
        self.metas.append(meta)
        self.nbytes += sum(len(im["bytes"]) for im in images) + len(text or "")
        if len(self.ids) >= self.batch_rows or self.nbytes >= self.batch_bytes:
            return self.flush()
        return None

    def flush(self) -> pa.RecordBatch | None:
        if not self.ids:
            return None
        batch = pa.RecordBatch.from_pydict(
            {"id": self.ids, "texts": self.texts, "images": self.images, "source": self.sources,
             "meta": self.metas}, schema=INTERLEAVED)
        self._clear()
        return batch


# ------------------------------------------------------------------------------- the reader
@register_source("image_folder")
class ImageFolderReader(Reader):
    """Image files under local folders, with ``<stem>.txt`` / ``<stem>.json`` sidecars."""

    class Params(ImageBatchParams):
        paths: list[str] = Field(description="local folders, walked recursively for image files")
        files_per_shard: int = Field(1000, gt=0, description="images per shard (files sorted by relative path)")
        caption_field: str = Field("caption", description="field of the <stem>.json sidecar holding the caption "
                                   "(used when there is no <stem>.txt)")
        require_caption: bool = Field(False, description="skip (and count as missing_caption) images without a "
                                      "caption; otherwise they become image-only rows")

        @field_validator("paths", mode="before")
        @classmethod
        def _one_path(cls, v):
            return [v] if isinstance(v, str) else v

    def output_kind(self) -> str:
        return "interleaved"

    def shards(self) -> list[Shard]:
        """One shard per ``files_per_shard`` images of a folder; ConfigError for a path that is not a
        folder or holds no image."""
        folders = []
        for path in self.params.paths:
            folder = Path(os.path.expanduser(path))
            if not folder.is_dir():
                raise ConfigError(f"{path}: not a folder (image_folder reads folders of image files)")
            folders.append((path, folder.resolve()))
        roots = [f for _, f in folders]
        common = Path(os.path.commonpath(roots)) if len(roots) > 1 else None
        out: list[Shard] = []
        for path, folder in folders:
            files = list_images(folder)
            if not files:
                raise ConfigError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
            prefix = folder.relative_to(common).as_posix() if common is not None and folder != common else ""
            n = self.params.files_per_shard
            for start in range(0, len(files), n):
                chunk = files[start:start + n]
                key = digest(str(folder), *(_stamp(folder, rel) for rel in chunk), size=12).hex()
                out.append(Shard(f"{len(out):05d}", key, str(folder), path, start, start + len(chunk),
                                 {"files": chunk, "prefix": prefix}))
        return out

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        folder = Path(shard.uri)
        prefix = shard.extra.get("prefix", "")
        builder = InterleavedBuilder(p.batch_rows, int(p.batch_bytes))
        for rel in shard.extra["files"]:
            row = self._row(folder, rel, ctx)
            if row is None:
                continue
            image, caption, meta = row
            row_id = f"{prefix}/{rel}" if prefix else rel
            batch = builder.add(row_id, [image], caption, shard.rel, meta_string({**meta, "path": row_id}))
            if batch is not None:
                yield batch
        last = builder.flush()
        if last is not None:
            yield last

    def _row(self, folder: Path, rel: str, ctx) -> tuple[dict, str | None, dict] | None:
        """(image, caption or None, meta) of one image file; None (counted) when it is skipped."""
        path = folder / rel
        try:
            data = path.read_bytes()
        except OSError as e:
            ctx.failure("unreadable_file", f"{rel}: {e.strerror or e}", file=str(path))
            return None
        image = image_record(data, IMAGE_EXTENSIONS.get(path.suffix[1:].lower()))
        if image is None:
            ctx.failure("undecodable_image", f"{rel}: Pillow cannot read the image header ({len(data)} bytes)",
                        file=str(path), record=data[:64])
            return None
        sidecars = _sidecars(path, rel, ctx)
        if sidecars is None:
            return None
        caption, meta = sidecars
        if caption is None and self.params.caption_field in meta and isinstance(meta[self.params.caption_field], str):
            caption = meta.pop(self.params.caption_field)
        if caption is not None and not caption.strip():
            caption = None
        if caption is None:
            if self.params.require_caption:
                ctx.failure("missing_caption", f"{rel}: no <stem>.txt and no {self.params.caption_field!r} in "
                            "<stem>.json", file=str(path))
                return None
            ctx.stats[READ_LABEL].count("images_without_caption")
        return image, caption, meta


def _sidecars(path: Path, rel: str, ctx) -> tuple[str | None, dict] | None:
    """The ``.txt`` caption (stripped; None without one) and the ``.json`` object ({} without one);
    None (counted) when a sidecar is broken."""
    caption = None
    txt = path.with_suffix(".txt")
    if txt.is_file():
        try:
            caption = txt.read_bytes().decode("utf-8").strip()
        except OSError as e:
            ctx.failure("unreadable_file", f"{rel}: caption sidecar: {e.strerror or e}", file=str(txt))
            return None
        except UnicodeDecodeError as e:
            ctx.failure("invalid_utf8", f"{rel}: caption sidecar: {e}", file=str(txt))
            return None
    meta: dict = {}
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            raw = side.read_bytes()
        except OSError as e:
            ctx.failure("unreadable_file", f"{rel}: metadata sidecar: {e.strerror or e}", file=str(side))
            return None
        try:
            meta = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            ctx.failure("invalid_json", f"{rel}: metadata sidecar: {e}", file=str(side), record=raw)
            return None
        if not isinstance(meta, dict):
            ctx.failure("not_an_object", f"{rel}: metadata sidecar is {type(meta).__name__}", file=str(side),
                        record=raw)
            return None
    return caption, meta


def list_images(folder: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``folder`` (recursive, hidden names skipped), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if ext in IMAGE_EXTENSIONS:
                found.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(found)


def _stamp(folder: Path, rel: str) -> str:
    """``rel`` with the size and modification time of the image and of its sidecars (when present)."""
    parts = [rel]
    path = folder / rel
    for p in (path, path.with_suffix(".txt"), path.with_suffix(".json")):
        try:
            st = p.stat()
        except OSError:
            parts.append("-")
            continue
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)

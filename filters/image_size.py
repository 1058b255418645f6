"""``image_size``: remove images that are too small, too large or too elongated from interleaved rows.

Works on ``interleaved`` rows (``texts`` and ``images`` aligned position by position, see
:mod:`curate.schema`). An image that fails a bound is removed together with its position, so both
lists stay aligned; the row itself is kept unless fewer than ``min_images`` images are left, in which
case it is dropped with the reason ``too_few_images`` (the default ``min_images: 0`` keeps rows with
no image left). Every removed image is counted as a stage metric under its reason (``stats.json`` →
``stages.<label>.metrics.<reason>.count`` is the number of images); nothing is removed silently.

An image's width and height come from its struct (``images[k].width`` / ``.height``); when either is
null (or not positive) they are read from the encoded header with :func:`curate.images.image_size`
(EXIF orientation applied) — pixels are never decoded. Reasons, first match wins:

* ``undecodable_image`` — no bytes, or a header Pillow cannot read (also written to ``failures/``);
* ``image_too_large`` — ``width × height > max_image_pixels`` (a decompression bomb: a few KB of PNG
  can claim 40,000 × 40,000 pixels) or a side above ``max_side``;
* ``image_too_small`` — a side below ``min_side`` (default 150 px, as MMC4 and OBELICS);
* ``aspect_ratio`` — ``width / height`` outside ``[min_aspect, max_aspect]`` (default ``[0.5, 2]``,
  as MMC4; the bounds themselves are kept).

Rows whose ``texts`` and ``images`` are not aligned (different lengths, or a position with both or
neither set) are dropped as ``misaligned_row`` and written to ``failures/``.

This module also holds :class:`ImageFilter`, the base of the stages that remove images from rows
(``image_size``, ``image_dedup``): it finds the images of a batch, removes the positions a subclass
names, counts them, and drops rows left with fewer than ``min_images`` images. Per-image scores
written by earlier stages (``clip_score``'s ``image_scores``) refer to positions before removal; run
image filters before scoring stages.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.images import MAX_PIXELS
from curate.registry import register_stage
from curate.stage import Filter

#: The drop reason of a row left with fewer than ``min_images`` images.
TOO_FEW_IMAGES = "too_few_images"
#: The drop reason of a row whose texts and images are not aligned.
MISALIGNED_ROW = "misaligned_row"


@dataclass
class ImageView:
    """Where the images of a batch are, without copying their bytes into Python.

    ``rows``, ``pos`` and ``flat`` have one entry per image of an aligned row, in (row, position)
    order: the row in the batch, the position in the row, and the index into ``images_flat`` (the
    flattened ``images`` column). ``aligned`` says which rows are well formed; misaligned rows
    contribute no image.
    """

    n_rows: int
    aligned: np.ndarray
    lengths: np.ndarray
    texts_flat: pa.Array
    images_flat: pa.Array
    text_start: np.ndarray
    image_start: np.ndarray
    rows: np.ndarray
    pos: np.ndarray
    flat: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def field(self, name: str) -> pa.Array:
        """One struct field (``bytes``, ``width`` …) of every image, in image order."""
        return pc.struct_field(self.images_flat, name).take(pa.array(self.flat, pa.int64()))

    def image_counts(self) -> np.ndarray:
        """How many images each row of the batch has."""
        return np.bincount(self.rows, minlength=self.n_rows)


def image_view(batch: pa.RecordBatch) -> ImageView:
    """The images of ``batch`` and which rows are aligned (see :class:`ImageView`)."""
    n = batch.num_rows
    texts, images = batch.column("texts"), batch.column("images")
    t_len = pc.fill_null(pc.list_value_length(texts), 0).to_numpy().astype(np.int64)
    i_len = pc.fill_null(pc.list_value_length(images), 0).to_numpy().astype(np.int64)
    t_flat, i_flat = pc.list_flatten(texts), pc.list_flatten(images)
    t_start = np.concatenate([[0], np.cumsum(t_len)])[:-1]
    i_start = np.concatenate([[0], np.cumsum(i_len)])[:-1]
    aligned = (t_len == i_len) & texts.is_valid().to_numpy(zero_copy_only=False) & \
        images.is_valid().to_numpy(zero_copy_only=False)
    lengths = np.where(aligned, i_len, 0)
    rows = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(rows)) - np.repeat(np.concatenate([[0], np.cumsum(lengths)])[:-1], lengths)
    t_idx, i_idx = t_start[rows] + pos, i_start[rows] + pos
    t_ok = t_flat.is_valid().to_numpy(zero_copy_only=False)[t_idx] if len(t_idx) else np.zeros(0, bool)
    i_ok = i_flat.is_valid().to_numpy(zero_copy_only=False)[i_idx] if len(i_idx) else np.zeros(0, bool)
    bad = np.bincount(rows[t_ok == i_ok], minlength=n) > 0  # a position with both or neither
    if bad.any():
        aligned &= ~bad
        lengths = np.where(aligned, i_len, 0)
        keep = aligned[rows]
        rows, pos, i_idx, i_ok = rows[keep], pos[keep], i_idx[keep], i_ok[keep]
    return ImageView(n, aligned, lengths, t_flat, i_flat, t_start, i_start, rows[i_ok], pos[i_ok], i_idx[i_ok])


def remove_positions(batch: pa.RecordBatch, view: ImageView, removed: np.ndarray) -> pa.RecordBatch:
    """``batch`` without its misaligned rows and without the images where ``removed`` (one flag per
    image of ``view``) is set — each removed image's position goes from both lists."""
    if not removed.any() and view.aligned.all():
        return batch
    n = view.n_rows
    rows = np.repeat(np.arange(n), view.lengths)  # every position of every aligned row
    pos = np.arange(len(rows)) - np.repeat(np.concatenate([[0], np.cumsum(view.lengths)])[:-1], view.lengths)
    keep = np.ones(len(rows), bool)
    if removed.any():
        row_base = np.concatenate([[0], np.cumsum(view.lengths)])[:-1]
        keep[row_base[view.rows[removed]] + view.pos[removed]] = False
    rows, pos = rows[keep], pos[keep]
    new_len = np.bincount(rows, minlength=n)[view.aligned]
    offsets = pa.array(np.concatenate([[0], np.cumsum(new_len)]).astype(np.int32))
    columns = {}
    for name, flat, start in (("texts", view.texts_flat, view.text_start), ("images", view.images_flat, view.image_start)):
        values = flat.take(pa.array(start[rows] + pos, pa.int64()))
        columns[name] = pa.ListArray.from_arrays(offsets, values, type=batch.schema.field(name).type)
    out = batch.filter(pa.array(view.aligned)) if not view.aligned.all() else batch
    for name, array in columns.items():
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(name), array)
    return out


class ImageFilter(Filter):
    """Base of the stages that remove images from interleaved rows.

    A subclass implements :meth:`image_reasons`: one removal reason (or None) per image of the
    batch. The base removes those images, counts each under its reason as a stage metric, drops
    misaligned rows (``misaligned_row``, in ``failures/``) and rows left with fewer than
    ``min_images`` images (``too_few_images``), both counted as row drops.
    """

    class Params(Filter.Params):
        min_images: int = Field(0, ge=0, description="drop rows left with fewer images than this "
                                "(reason too_few_images; 0 keeps rows with none left)")

    requires = ("texts", "images")

    def score_names(self) -> list[str]:
        return []

    @abstractmethod
    def image_reasons(self, batch: pa.RecordBatch, view: ImageView, ctx, row0: int) -> tuple[list, set[int]]:
        """Per image of ``view`` (in its order) a reason to remove it or None, and the indices of the
        images already counted (through ``ctx.failure``), which the base must not count again.
        ``row0`` is the shard-wide index of the batch's first row."""

    def run(self, batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
        yield from super().run(self._strip(batches, ctx), ctx)

    def _strip(self, batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
        row0 = 0  # rows of this shard seen so far (a generator's local: one shard's alone)
        for batch in batches:
            view = image_view(batch)
            self._report_misaligned(batch, view, ctx)
            reasons, counted = self.image_reasons(batch, view, ctx, row0) if len(view) else ([], set())
            removed = np.array([r is not None for r in reasons], bool)
            tally = Counter(r for k, r in enumerate(reasons) if r is not None and k not in counted)
            stats = ctx.stats[self.label]
            for reason, k in sorted(tally.items()):
                stats.metric(reason).add_many(k, k, 1, 1)
            row0 += batch.num_rows
            yield remove_positions(batch, view, removed)

    def _report_misaligned(self, batch: pa.RecordBatch, view: ImageView, ctx) -> None:
        if view.aligned.all():
            return
        ids = batch.column("id")
        for r in np.flatnonzero(~view.aligned):
            doc_id = ids[int(r)].as_py()
            ctx.failure(MISALIGNED_ROW, f"stage {self.label}, row {doc_id!r}: texts and images are not aligned "
                        "(lengths differ, or a position has both or neither)", record=doc_id, stage=self.label,
                        dropped=True)

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        need = self.params.min_images
        if not need:
            return pa.nulls(batch.num_rows, pa.string())
        flat = pc.list_flatten(batch.column("images"))
        lengths = pc.fill_null(pc.list_value_length(batch.column("images")), 0).to_numpy()
        parents = np.repeat(np.arange(batch.num_rows), lengths)
        counts = np.bincount(parents[flat.is_valid().to_numpy(zero_copy_only=False)], minlength=batch.num_rows)
        return pa.array(np.where(counts < need, TOO_FEW_IMAGES, None), pa.string())


def where(ids: pa.Array, view: ImageView, k: int) -> str:
    """``row 'id', image at position p`` for image ``k`` of ``view`` (for failure details)."""
    return f"row {ids[int(view.rows[k])].as_py()!r}, image at position {int(view.pos[k])}"


@register_stage("image_size")
class ImageSize(ImageFilter):
    """Remove images by side length, aspect ratio and pixel count (header only, never decoded)."""

    class Params(ImageFilter.Params):
        min_side: int | None = Field(150, ge=0, description="remove images with a side below this many pixels "
                                     "(image_too_small; MMC4/OBELICS: 150)")
        max_side: int | None = Field(None, gt=0, description="remove images with a side above this (image_too_large)")
        min_aspect: float | None = Field(0.5, gt=0, description="remove images whose width/height is below this "
                                         "(aspect_ratio; MMC4: 0.5)")
        max_aspect: float | None = Field(2.0, gt=0, description="remove images whose width/height is above this "
                                         "(aspect_ratio; MMC4: 2)")
        max_image_pixels: int = Field(MAX_PIXELS, gt=0, description="remove images claiming more pixels than this "
                                      "(image_too_large: a decompression bomb)")

        @model_validator(mode="after")
        def _ordered(self):
            if self.min_side is not None and self.max_side is not None and self.min_side > self.max_side:
                raise ValueError(f"min_side {self.min_side} is above max_side {self.max_side}")
            if self.min_aspect is not None and self.max_aspect is not None and self.min_aspect > self.max_aspect:
                raise ValueError(f"min_aspect {self.min_aspect} is above max_aspect {self.max_aspect}")
            return self

    needs: ClassVar[dict[str, str]] = {"PIL": "img"}

    def image_reasons(self, batch, view, ctx, row0):
        p = self.params
        width = pc.fill_null(view.field("width"), 0).to_numpy().astype(np.int64)
        height = pc.fill_null(view.field("height"), 0).to_numpy().astype(np.int64)
        reasons: list[str | None] = [None] * len(view)
        counted: set[int] = set()
        unknown = np.flatnonzero((width <= 0) | (height <= 0))
        if len(unknown):
            from curate.images import image_size

            blobs = view.field("bytes").take(pa.array(unknown, pa.int64()))
            ids = batch.column("id")
            for k, blob in zip(unknown, blobs):
                data = blob.as_py()
                w, h = image_size(data) if data else (None, None)
                if not w or not h or w <= 0 or h <= 0:
                    why = "no image bytes" if not data else "the header cannot be read"
                    ctx.failure("undecodable_image", f"stage {self.label}, {where(ids, view, int(k))}: {why}",
                                record=ids[int(view.rows[k])].as_py(), stage=self.label)
                    reasons[int(k)] = "undecodable_image"
                    counted.add(int(k))
                    width[k] = height[k] = 0
                else:
                    width[k], height[k] = w, h
        known = (width > 0) & (height > 0)
        short, long_ = np.minimum(width, height), np.maximum(width, height)
        too_large = known & (width * height > p.max_image_pixels)
        if p.max_side is not None:
            too_large |= known & (long_ > p.max_side)
        too_small = known & (short < p.min_side) if p.min_side else np.zeros(len(view), bool)
        aspect = np.where(known, width / np.maximum(height, 1), 1.0)
        bad_aspect = np.zeros(len(view), bool)
        if p.min_aspect is not None:
            bad_aspect |= known & (aspect < p.min_aspect)
        if p.max_aspect is not None:
            bad_aspect |= known & (aspect > p.max_aspect)
        for mask, reason in ((bad_aspect, "aspect_ratio"), (too_small, "image_too_small"),
                             (too_large, "image_too_large")):  # the last written wins: the first reason listed
            for k in np.flatnonzero(mask):
                reasons[int(k)] = reason
        return reasons, counted

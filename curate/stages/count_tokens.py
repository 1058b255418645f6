"""``count_tokens``: the sequence length of each row for a target VLM, text and images together.

Adds ``n_tokens`` (int32: the run tokenizer's tokens over every text position, plus every image's
tokens under ``image_tokens``, see :mod:`curate.image_tokens`) and ``n_image_tokens`` (int32: the
images' part) to interleaved rows; on documents rows ``n_tokens`` is the text's tokens and
``n_image_tokens`` is 0. Existing columns of those names are replaced. Image sizes come from the
struct's ``width``/``height`` or, when null or not positive, from the bytes' header (never decoded); an
image whose header cannot be read costs the smallest image's tokens and is counted as metric
``unknown_image_size``. Interleaved rows whose ``texts`` and ``images`` are not aligned (a null list,
different lengths, or a position with both or neither) are dropped as ``misaligned_row`` and written to
``failures/``, so what comes out is valid interleaved data. ``select`` on ``n_tokens`` then keeps rows
within a budget, and every later length decision uses the same count.

With ``v2pe_stride`` it also adds ``n_positions`` (int32): the positions the row spans under V2PE
(:mod:`curate.v2pe`) — text tokens and image markers one each, each image's own tokens
``ceil(stride × tokens / v2pe_unit)`` — to check long multimodal rows against a model's position window.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.image_tokens import ImageTokenParams
from curate.registry import register_stage
from curate.stage import Stage, StageParams
from curate.v2pe import image_positions as image_positions_of


@register_stage("count_tokens")
class CountTokens(Stage):
    """``n_tokens`` (text + image tokens) and ``n_image_tokens`` for each row."""

    class Params(StageParams):
        image_tokens: ImageTokenParams = Field(default_factory=ImageTokenParams,
                                               description="how many tokens an image costs the target VLM")
        v2pe_stride: int | None = Field(None, ge=1, le=4096, description="also write n_positions: the "
                                        "positions a row spans under V2PE with this stride (e.g. 64)")
        v2pe_unit: int = Field(256, ge=1, description="V2PE: image tokens whose positions advance by `stride` "
                               "in all (InternVL's tokens per tile)")

    provides = ("n_tokens", "n_image_tokens")
    needs_tokenizer = True

    def columns_out(self, columns_in: list[str]) -> list[str]:
        cols = [c for c in super().columns_out(columns_in) if c != "n_positions"]  # a recount drops a stale one
        return cols + ["n_positions"] if self.params.v2pe_stride else cols

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self.counter = params.image_tokens.counter()

    def run(self, batches, ctx):
        tok = ctx.tokenizer
        st = ctx.stats[self.label]
        for batch in batches:
            names = batch.schema.names
            if "texts" in names:
                texts = batch.column("texts").to_pylist()
                images = batch.column("images").to_pylist() if "images" in names else [[] for _ in texts]
                if "images" in names:
                    batch, texts, images = self._aligned(batch, texts, images, ctx)
            elif "text" in names:
                texts = [[t] for t in batch.column("text").to_pylist()]
                images = [[] for _ in texts]
            else:
                raise ValueError(f"{self.label}: rows have neither `texts` nor `text` to count")
            flat = [t for row in texts for t in (row or []) if t]
            owner = np.repeat(np.arange(len(texts)), [sum(1 for t in (row or []) if t) for row in texts])
            lengths = np.array([len(ids) for ids in tok.encode_arrays(flat)], np.int64) if flat else np.zeros(0, np.int64)
            text_tokens = np.bincount(owner, weights=lengths, minlength=len(texts)).astype(np.int64)
            image_tokens = np.zeros(len(texts), np.int64)
            image_positions = np.zeros(len(texts), np.int64)  # V2PE: what the images span
            stride = self.params.v2pe_stride
            for r, row in enumerate(images):
                for im in row or []:
                    if im is None:
                        continue
                    if not ((im.get("width") or 0) > 0 and (im.get("height") or 0) > 0):
                        from curate.images import image_size

                        w, h = image_size(im["bytes"]) if im.get("bytes") else (None, None)
                        if not (w and h):
                            st.count("unknown_image_size")
                        im = {"width": w, "height": h}
                    cost = self.counter.count(im["width"], im["height"])
                    image_tokens[r] += cost
                    if stride:
                        own = cost - self.counter.extra  # the markers are text tokens
                        image_positions[r] += self.counter.extra + image_positions_of(own, stride,
                                                                                     self.params.v2pe_unit)
            out = batch
            for name in ("n_tokens", "n_image_tokens", "n_positions"):
                if name in out.schema.names:
                    out = out.drop_columns([name])
            total = (text_tokens + image_tokens).astype(np.int32)
            out = out.append_column("n_tokens", pa.array(total, pa.int32()))
            out = out.append_column("n_image_tokens", pa.array(image_tokens.astype(np.int32), pa.int32()))
            if stride:
                positions = (text_tokens + image_positions).astype(np.int32)
                out = out.append_column("n_positions", pa.array(positions, pa.int32()))
            st.count("image_tokens", int(image_tokens.sum()))
            yield out

    def _aligned(self, batch, texts, images, ctx):
        """The batch without its misaligned rows (dropped as ``misaligned_row``, in ``failures/``)."""
        ok = [t is not None and i is not None and len(t) == len(i) and
              all((a is None) != (b is None) for a, b in zip(t, i)) for t, i in zip(texts, images)]
        if all(ok):
            return batch, texts, images
        ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * len(ok)
        for r in (r for r, good in enumerate(ok) if not good):
            ctx.failure("misaligned_row", f"stage {self.label}, row {ids[r]!r}: texts and images are not aligned "
                        "(a null list, lengths differ, or a position has both or neither)", record=ids[r],
                        stage=self.label, dropped=True)
        keep = [r for r, good in enumerate(ok) if good]
        return (batch.take(pa.array(keep, pa.int64())), [texts[r] for r in keep], [images[r] for r in keep])

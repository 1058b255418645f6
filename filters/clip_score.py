"""``clip_score``: image–text cosine similarity under an open_clip model, as score columns.

Works on interleaved rows (an image–caption pair is a row with one image and one text). Every image is
compared with every text of its row: a text longer than the text encoder's context (77 tokens for CLIP,
248 for a Long-CLIP checkpoint — the encoder's own ``context_length`` decides) is split into sentence
chunks that fit, each chunk is embedded, and the image–text similarity is the **mean** over chunks
(the **max** is kept too). Each image takes the text it matches best (by the mean). Scores:

* ``score`` — mean over the row's images of their best text's similarity (for a pair: the similarity);
* ``score_max`` — the same with the max over chunks; ``min_image_score`` — the weakest image;
* ``image_scores`` (one per image, in order) and ``image_text`` (the position of each image's best text);
* ``text_scores`` (one per text, in order): each text's similarity to the image it matches best —
  with ``texts_column: captions`` on rows that carry candidate captions of one image, the ranking
  ``caption_fuse`` takes as its ``rank_column`` (``scores.clip_score.text_scores``).

Similarity is the cosine of L2-normalized embeddings (no logit scale): DataComp keeps ViT-B/32 ≥ 0.25
or the top 30% by ViT-L/14; LAION used ≥ 0.28–0.3 — select on ``score`` afterwards. Images are
decoded and preprocessed a batch ahead of the model (``decode_workers`` threads; on CUDA processes, one
per core). ``model`` is an open_clip name (``ViT-B-32``) with ``pretrained`` (a tag or a checkpoint
file), an ``hf-hub:``/``local-dir:`` id, or a folder holding ``open_clip_config.json`` and weights.
``device: auto`` uses CUDA in float16 when present. Images are decoded by
:func:`curate.images.decode_rgb` (EXIF orientation applied; CMYK, 16-bit, palette, alpha and animated
images to RGB). Undecodable images (reason ``undecodable_image``) and
images above ``max_image_pixels`` (``image_too_large``) are recorded in ``failures/``, counted as the
stage's metrics, and get a null score; one bad image never fails the shard.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.registry import register_stage
from curate.stage import Filter
from filters.clip_model import ClipModel, ClipModelParams


@register_stage("clip_score")
class ClipScore(Filter):
    """Image–text cosine similarity (open_clip), long captions scored by sentence chunks."""

    class Params(Filter.Params, ClipModelParams):
        min_score: float | None = Field(None, description="drop rows whose score is below this")
        texts_column: str = Field("texts", description="the list<string> column compared with the images "
                                  "(e.g. captions: candidate captions to rank)")

    requires = ("images", "texts")
    provides = ("scores",)
    needs = ClipModel.needs

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self.requires = ("images", params.texts_column)
        self.clip = ClipModel(params)

    def score_names(self) -> list[str]:
        return ["score", "score_max", "min_image_score", "image_scores", "image_text", "text_scores"]

    def model_refs(self) -> dict[str, str]:
        return self.clip.model_refs()

    def setup(self, ctx) -> None:
        self.clip.load()

    def chunks(self, text: str) -> list[str]:
        """The text as is when it fits the text encoder, else sentence chunks that each fit."""
        return self.clip.chunks(text)

    # ---------------------------------------------------------------- scoring
    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        images = batch.column("images").to_pylist()
        texts = batch.column(self.params.texts_column).to_pylist()
        ids = batch.column("id").to_pylist()
        flat = [(r, k, img["bytes"]) for r, row in enumerate(images) for k, img in enumerate(row or [])
                if img is not None]
        image_emb, ok = self.clip.embed_images([b for _, _, b in flat],
                                               [f"row {ids[r]!r}, image {k}" for r, k, _ in flat], ctx, self.label,
                                               records=[ids[r] for r, _, _ in flat])
        chunks, owner = [], []  # owner: (row, text position)
        for r, row in enumerate(texts):
            for k, t in enumerate(row or []):
                if t is not None and t.strip():
                    for c in self.chunks(t):
                        chunks.append(c)
                        owner.append((r, k))
        text_emb = self.clip.embed_texts(chunks)
        scores = _aggregate(len(images), flat, image_emb, ok, owner, text_emb)
        scores["text_scores"] = _text_scores(texts, flat, image_emb, ok, owner, text_emb)
        return scores

    def thresholds(self, ctx) -> dict[str, dict[str, float | None]]:
        """``min_score`` as a bound on ``score``."""
        s = self.params.min_score
        return {} if s is None else {"score": {"min": s, "max": None}}

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        if self.params.min_score is None:
            return pa.nulls(batch.num_rows, pa.string())
        import pyarrow.compute as pc

        low = pc.fill_null(pc.less(scores["score"], self.params.min_score), True)
        return pc.if_else(low, pa.scalar("clip_score_below_min"), pa.scalar(None, pa.string()))


def _text_scores(texts, flat, image_emb, ok, owner, text_emb) -> pa.Array:
    """Per row, per text position: the text's mean-over-chunks similarity to its best image (null for
    an empty text or a row without a usable image)."""
    out: list[list[float | None]] = [[None] * len(row or []) for row in texts]
    by_row: dict[int, list[int]] = {}
    for i, (r, _, _) in enumerate(flat):
        if ok[i]:
            by_row.setdefault(r, []).append(i)
    sums: dict[tuple[int, int], list[np.ndarray]] = {}
    for j, (r, k) in enumerate(owner):
        if r in by_row:
            sums.setdefault((r, k), []).append(text_emb[j])
    for (r, k), embs in sums.items():
        sims = np.stack(embs) @ image_emb[by_row[r]].T  # chunks × images
        out[r][k] = float(sims.mean(axis=0).max())
    return pa.array(out, pa.list_(pa.float64()))


def _aggregate(n_rows, flat, image_emb, ok, owner, text_emb) -> dict[str, pa.Array]:
    """Per-image best-text similarities (mean and max over chunks) folded into per-row scores."""
    owner_arr = np.array(owner, dtype=np.int64).reshape(-1, 2)  # rows in order: each row's chunks are a range
    row_start = np.searchsorted(owner_arr[:, 0], np.arange(n_rows + 1)) if len(owner_arr) else np.zeros(n_rows + 1, int)
    per_row: list[list[float | None]] = [[] for _ in range(n_rows)]
    per_row_max: list[list[float]] = [[] for _ in range(n_rows)]
    best_text: list[list[int | None]] = [[] for _ in range(n_rows)]
    for i, (r, _, _) in enumerate(flat):
        mine = np.arange(row_start[r], row_start[r + 1])
        if not ok[i] or len(mine) == 0:
            per_row[r].append(None)
            best_text[r].append(None)
            continue
        sims = text_emb[mine] @ image_emb[i]
        positions = owner_arr[mine, 1]
        best, best_mean, best_max = None, -np.inf, np.nan
        for pos in np.unique(positions):
            s = sims[positions == pos]
            if s.mean() > best_mean:
                best, best_mean, best_max = int(pos), float(s.mean()), float(s.max())
        per_row[r].append(best_mean)
        per_row_max[r].append(best_max)
        best_text[r].append(best)

    def row_stat(values, fn):
        vals = [v for v in values if v is not None]
        return fn(vals) if vals else np.nan

    score = np.array([row_stat(v, np.mean) for v in per_row])
    score_max = np.array([row_stat(v, np.mean) for v in per_row_max])
    low = np.array([row_stat(v, np.min) for v in per_row])
    return {
        "score": pa.array(score, pa.float64(), mask=np.isnan(score)),
        "score_max": pa.array(score_max, pa.float64(), mask=np.isnan(score_max)),
        "min_image_score": pa.array(low, pa.float64(), mask=np.isnan(low)),
        "image_scores": pa.array(per_row, pa.list_(pa.float64())),
        "image_text": pa.array(best_text, pa.list_(pa.int32())),
    }


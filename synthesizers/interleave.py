"""``interleave``: place a document's candidate images between its sentences, MMC4 style.

Input: interleaved rows whose text positions hold the document (one or several paragraphs) and whose
image positions hold its candidate images, in any order (e.g. the images of the page, fetched with the
``img2dataset`` source and filtered with ``image_size`` / ``image_dedup``). For each row:

1. The text positions, joined by blank lines, are split into sentences (:func:`split_sentences`: exact spans, so the sentences joined give
   the text back).
2. Every image and every sentence is embedded with an open_clip model (the same loading, decoding and
   long-text chunking as ``clip_score``; a sentence longer than the text encoder's context is the mean of
   its chunks) and the sentence × image cosine similarities computed.
3. Images whose best similarity to any sentence is below ``min_similarity`` (0.15, MMC4's floor) are
   dropped and counted (``images_below_floor``); undecodable or oversized images are recorded in
   ``failures/`` and counted by their reason.
4. A linear assignment (``scipy.optimize.linear_sum_assignment`` on the negated similarities) gives each
   remaining image a sentence such that each sentence takes at most one image and the total similarity
   is largest. With more images than sentences, the images left over are dropped and counted
   (``surplus_images``), or with ``surplus: nearest`` go to their most similar sentence as MMC4 does
   (a sentence may then hold several).
5. The row is written back in document order: each image immediately ``before`` (default) or ``after``
   its sentence, the sentences between two images joined into one text position (OBELICS convention:
   aligned ``texts``/``images`` lists, exactly one non-null per position).

Scores, under ``scores.<label>``: ``image_scores`` (each output image's similarity to its sentence, in
output order), ``image_sentences`` (its sentence index), ``n_sentences``, ``mean_score``. Rows with no
text are dropped (``no_text``), rows left with fewer than ``min_images`` images are dropped
(``too_few_images``); both counted. Rows whose ``texts`` and ``images`` are not aligned (null lists,
different lengths, or a position with both or neither set) are dropped as ``misaligned_row``, counted
and written to ``failures/``, as the image filters do. The output is independent of batch boundaries
and worker count.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.registry import register_stage
from curate.schema import IMAGE, INTERLEAVED, with_scores
from curate.stage import Synthesizer
from filters.clip_model import ClipModel, ClipModelParams

#: A sentence ends at . ! ? (or … and their runs, with closing quotes/brackets) followed by whitespace,
#: or at a blank line; a newline alone ends a sentence too (headings, list items).
_BOUNDARY = re.compile(r"""(?:[.!?…]+["'”’)\]]*\s+|\n\s*)""")


def split_sentences(text: str) -> list[str]:
    """Exact, non-empty spans of ``text`` ending at sentence boundaries (whitespace kept with the
    sentence it follows; leading whitespace kept with the first), so ``"".join(...) == text``.
    Spans holding only whitespace are merged into the sentence before them."""
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if end <= start:
            continue
        piece = text[start:end]
        if out and not piece.strip():
            out[-1] += piece
        else:
            out.append(piece)
        start = end
    if start < len(text):
        piece = text[start:]
        if out and not piece.strip():
            out[-1] += piece
        else:
            out.append(piece)
    return out


def _document(texts: list[str | None]) -> str:
    """A row's text positions as one text, paragraphs separated by a blank line."""
    return "\n\n".join(t.strip("\n") for t in texts if t is not None and t.strip())


def _aligned(texts: list | None, images: list | None) -> bool:
    """The interleaved convention: both lists present, equal lengths, exactly one of the two per position."""
    return texts is not None and images is not None and len(texts) == len(images) and \
        all((t is None) != (i is None) for t, i in zip(texts, images))


@register_stage("interleave")
class Interleave(Synthesizer):
    """Each image to at most one sentence by CLIP similarity and linear assignment (MMC4)."""

    class Params(ClipModelParams):
        min_similarity: float = Field(0.15, description="images whose best sentence similarity is below this "
                                      "are dropped (MMC4: 0.15 with ViT-L/14)")
        surplus: str = Field("drop", pattern="^(drop|nearest)$",
                             description="images beyond the number of sentences: drop (counted), or nearest "
                                         "(to their most similar sentence, as MMC4 does)")
        place: str = Field("before", pattern="^(before|after)$",
                           description="put each image before or after its sentence")
        min_images: int = Field(0, ge=0, description="drop rows left with fewer images (too_few_images)")
        max_sentences: int = Field(2000, gt=0, description="documents with more sentences are scored on "
                                   "the first ones only (the rest keep no image)")

    requires = ("texts", "images")
    provides = ("scores",)
    needs = {**ClipModel.needs, "scipy": "img"}

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self.clip = ClipModel(params)

    def model_refs(self) -> dict[str, str]:
        return self.clip.model_refs()

    def score_names(self) -> list[str]:
        return ["image_scores", "image_sentences", "n_sentences", "mean_score"]

    def setup(self, ctx) -> None:
        self.clip.load()

    def run(self, batches, ctx):
        for batch in batches:
            out = self.process(batch, ctx)
            if out is not None and out.num_rows:
                yield out

    # ------------------------------------------------------------------------------------------ batch
    def process(self, batch: pa.RecordBatch, ctx) -> pa.RecordBatch | None:
        from scipy.optimize import linear_sum_assignment

        p, st = self.params, ctx.stats[self.label]
        ids = batch.column("id").to_pylist()
        texts = batch.column("texts").to_pylist()
        images = batch.column("images").to_pylist()
        aligned = [_aligned(t, i) for t, i in zip(texts, images)]
        for r in np.flatnonzero(~np.array(aligned, bool)).tolist():
            ctx.failure("misaligned_row", f"stage {self.label}, row {ids[r]!r}: texts and images are not aligned "
                        "(a null list, lengths differ, or a position has both or neither)", record=ids[r],
                        stage=self.label, dropped=True)
        texts = [t if ok else [] for t, ok in zip(texts, aligned)]
        images = [i if ok else [] for i, ok in zip(images, aligned)]
        docs = [split_sentences(_document(row)) for row in texts]
        cands = [[img for img in row if img is not None] for row in images]

        flat = [(r, k) for r, row in enumerate(cands) for k in range(len(row))]
        owners = [f"row {ids[r]!r}, image {k}" for r, k in flat]
        image_emb, ok = self.clip.embed_images([cands[r][k]["bytes"] for r, k in flat], owners, ctx, self.label,
                                               records=[ids[r] for r, _ in flat])
        sent_owner, chunks = [], []
        for r, sentences in enumerate(docs):
            if not cands[r]:
                continue  # no image to place: the sentences need no embedding
            for j, s in enumerate(sentences[:p.max_sentences]):
                if s.strip():
                    for c in self.clip.chunks(s.strip()):
                        chunks.append(c)
                        sent_owner.append((r, j))
        text_emb = self.clip.embed_texts(chunks)

        t0 = time.perf_counter()
        by_row_images: dict[int, list[int]] = {}
        for i, (r, _) in enumerate(flat):
            by_row_images.setdefault(r, []).append(i)
        by_row_chunks: dict[int, list[int]] = {}
        for c, (r, _) in enumerate(sent_owner):
            by_row_chunks.setdefault(r, []).append(c)

        keep, rows_out = [], []
        for r in range(batch.num_rows):
            if not aligned[r]:
                continue  # dropped and recorded above
            if not "".join(docs[r]).strip():
                st.drop("no_text")
                continue
            st.count("images_in", len(cands[r]))
            placed = self._assign(r, docs[r], cands[r], by_row_images.get(r, []), ok, image_emb,
                                  by_row_chunks.get(r, []), sent_owner, text_emb, linear_sum_assignment, st)
            if len(placed) < p.min_images:
                st.drop("too_few_images")
                continue
            st.count("images_kept", len(placed))
            keep.append(r)
            rows_out.append(self._compose(docs[r], cands[r], placed))
        self.clip.timings["assign_s"] = self.clip.timings.get("assign_s", 0.0) + time.perf_counter() - t0
        if not keep:
            return None
        return self._batch(batch, keep, rows_out)

    def _assign(self, r, sentences, images, image_idx, ok, image_emb, chunk_idx, sent_owner, text_emb,
                solve, st) -> list[tuple[int, int, float]]:
        """``[(image position, sentence index, similarity)]`` for the images this row keeps."""
        good = [i for i in image_idx if ok[i]]
        if not good or not chunk_idx:
            if good:
                st.count("images_without_sentence", len(good))
            return []
        sent_ids = sorted({sent_owner[c][1] for c in chunk_idx})
        col = {j: n for n, j in enumerate(sent_ids)}
        sims_chunks = text_emb[chunk_idx] @ image_emb[good].T  # chunks × images
        sims = np.zeros((len(sent_ids), len(good)), np.float64)
        counts = np.zeros(len(sent_ids), np.int64)
        for c_row, c in enumerate(chunk_idx):
            n = col[sent_owner[c][1]]
            sims[n] += sims_chunks[c_row]
            counts[n] += 1
        sims /= counts[:, None]  # sentence × image: a long sentence is the mean of its chunks
        best = sims.max(axis=0)
        above = np.flatnonzero(best >= self.params.min_similarity)
        if len(above) < len(good):
            st.count("images_below_floor", len(good) - len(above))
        if not len(above):
            return []
        sub = sims[:, above]  # sentences × kept images
        s_idx, i_idx = solve(-sub)
        placed = {int(i): (int(s), float(sub[s, i])) for s, i in zip(s_idx, i_idx)}
        surplus = [int(i) for i in range(len(above)) if i not in placed]
        if surplus:
            if self.params.surplus == "nearest":
                for i in surplus:
                    s = int(np.argmax(sub[:, i]))
                    placed[i] = (s, float(sub[s, i]))
            else:
                st.count("surplus_images", len(surplus))
        first = image_idx[0]
        return [(good[above[i]] - first, sent_ids[s], sim) for i, (s, sim) in sorted(placed.items())]

    def _compose(self, sentences, images, placed) -> dict:
        """Texts/images in document order, each image beside its sentence; scores per output image."""
        by_sentence: dict[int, list[tuple[int, float]]] = {}
        for pos, s, sim in placed:
            by_sentence.setdefault(s, []).append((pos, sim))
        texts, imgs, img_scores, img_sentences = [], [], [], []
        pending = ""

        def flush():
            nonlocal pending
            if pending:
                texts.append(pending)
                imgs.append(None)
                pending = ""

        for j, sentence in enumerate(sentences):
            mine = sorted(by_sentence.get(j, []))
            if self.params.place == "after":
                pending += sentence
            if mine:
                flush()
                for pos, sim in mine:
                    texts.append(None)
                    imgs.append(images[pos])
                    img_scores.append(sim)
                    img_sentences.append(j)
            if self.params.place == "before":
                pending += sentence
        flush()
        mean = float(np.mean(img_scores)) if img_scores else None
        return {"texts": texts, "images": imgs, "image_scores": img_scores, "image_sentences": img_sentences,
                "n_sentences": len(sentences), "mean_score": mean}

    def _batch(self, batch: pa.RecordBatch, keep: list[int], rows: list[dict]) -> pa.RecordBatch:
        taken = batch.take(pa.array(keep, pa.int64()))
        texts = pa.array([r["texts"] for r in rows], pa.list_(pa.string()))
        images = pa.array([r["images"] for r in rows], pa.list_(IMAGE))
        taken = taken.set_column(taken.schema.get_field_index("texts"), INTERLEAVED.field("texts"), texts)
        taken = taken.set_column(taken.schema.get_field_index("images"), INTERLEAVED.field("images"), images)
        return with_scores(taken, self.label, {
            "image_scores": pa.array([r["image_scores"] for r in rows], pa.list_(pa.float64())),
            "image_sentences": pa.array([r["image_sentences"] for r in rows], pa.list_(pa.int32())),
            "n_sentences": pa.array([r["n_sentences"] for r in rows], pa.int32()),
            "mean_score": pa.array([r["mean_score"] for r in rows], pa.float64()),
        })

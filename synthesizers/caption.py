"""``caption``: dense, long captions of images by one or several (vision-)language teachers.

Every image of every row (the ``images`` column of the interleaved schema, or image–text pairs read
from WebDataset) is decoded (:func:`curate.images.decode_rgb`: bombs refused, EXIF orientation, any
mode to RGB), re-encoded as PNG no larger than ``max_side`` pixels on its longer side, and sent as a
``data:`` URL to ``teacher`` and each of ``more_teachers``, ``samples`` times each (a different seed per
sample). Multi-teacher captioning as in Panda-70M: the candidates are meant for ranking (e.g. by CLIP
/ Long-CLIP score) and fusion (``caption_fuse``).

One output row per image: ``id`` (``<row>#img<k>``), ``images`` (that image), ``captions`` (the
candidates), ``caption_teachers`` (who wrote each), ``messages`` (user: ``<image>`` and the instruction;
assistant: the first candidate) and ``lineage``. Undecodable or oversized images are counted and
recorded in ``failures/`` (reasons ``undecodable_image`` / ``image_too_large``).
"""

from __future__ import annotations

import base64
import io

import pyarrow as pa
from pydantic import Field

from curate.arrays import string_lists, strings
from curate.images import MAX_PIXELS, ImageProblem, decode_rgb
from curate.registry import register_stage
from curate.schema import IMAGE
from synthesizers.teachers.session import Ask, TeacherSession
from synthesizers.teachers.spec import TeacherSpec
from synthesizers.teachers.task import TeacherCommon, TeacherTask, messages_array


def data_url(data: bytes, max_side: int, max_pixels: int = MAX_PIXELS) -> str:
    """The image as a PNG ``data:`` URL, scaled down to ``max_side`` on its longer side."""
    im = decode_rgb(data, max_pixels)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@register_stage("caption")
class Caption(TeacherTask):
    """Captions from one or several VLM teachers (see the module docstring)."""

    class Params(TeacherCommon):
        more_teachers: list[TeacherSpec] = Field(default_factory=list, description="further teachers, each "
                                                 "writing its own candidates")
        samples: int = Field(1, ge=1, le=16, description="captions per image from each teacher")
        words: int = Field(150, ge=10, description="caption length asked for, in words")
        max_side: int = Field(1024, ge=32, description="images are scaled down to this many pixels on the "
                              "longer side before they are sent")
        max_image_pixels: int = Field(MAX_PIXELS, gt=0, description="images with more pixels are refused")

    requires = ("id", "images")
    provides = ("images", "captions", "caption_teachers", "messages", "lineage")
    needs = {"PIL": "clip"}
    templates = ("caption_image", "caption_train")

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self.requires = ("id", "images")

    def requirements(self) -> dict[str, str]:
        return {**super().requirements(), "PIL": "clip"}

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return ["id", *self.provides]

    def teacher_specs(self) -> list[TeacherSpec]:
        return [self.params.teacher, *self.params.more_teachers]

    def run(self, batches, ctx):
        teachers = self.teacher_specs()
        sessions = [TeacherSession(self.label, t, ctx, self.template_hash, repair_attempts=0) for t in teachers]
        try:
            for batch in batches:
                out = self._batch(batch, ctx, sessions)
                if out is not None:
                    yield out
        finally:
            for s in sessions:
                s.close()
        for s in sessions:
            s.finish()

    def _batch(self, batch: pa.RecordBatch, ctx, sessions: list[TeacherSession]) -> pa.RecordBatch | None:
        p = self.params
        ids = batch.column("id").to_pylist()
        images = batch.column("images").to_pylist()
        items = []  # (row id, k, image dict, url)
        for rid, imgs in zip(ids, images, strict=True):
            for k, img in enumerate(imgs or []):
                if img is None or not img.get("bytes"):
                    continue
                try:
                    url = data_url(img["bytes"], p.max_side, p.max_image_pixels)
                except ImageProblem as e:
                    ctx.failure(e.reason, f"stage {self.label}, row {rid!r}, image {k}: {e.detail}",
                                stage=self.label, dropped=True)
                    continue
                items.append((rid, k, img, url))
        prompt = self.render("caption_image", words=p.words)
        candidates: list[list[tuple[str, str]]] = [[] for _ in items]
        for session, teacher in zip(sessions, [p.teacher, *p.more_teachers], strict=True):
            asks = [Ask(messages=({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]},),
                sample=s, row=f"{rid}#img{k}") for rid, k, _, url in items for s in range(p.samples)]
            answers = session.ask(asks)
            for j, a in enumerate(answers):
                n = j // p.samples
                if a.ok:
                    candidates[n].append((teacher.model, a.text.strip()))
                elif a.error_kind != "context_length":
                    ctx.failure(a.error_kind or "teacher_error", f"stage {self.label}, {asks[j].row}: {a.error}",
                                record=a.text, stage=self.label)
        rows = []
        for (rid, k, img, _), cands in zip(items, candidates, strict=True):
            if not cands:
                ctx.stats[self.label].drop("no_caption")
                continue
            rows.append((f"{rid}#img{k}", img, cands, self.lineage(ctx, [rid], image=k, sha256=img.get("sha256"))))
        if not rows:
            return None
        return pa.RecordBatch.from_pydict({
            "id": strings([r[0] for r in rows]),
            "images": pa.array([[r[1]] for r in rows], pa.list_(IMAGE)),
            "captions": string_lists([[c for _, c in r[2]] for r in rows]),
            "caption_teachers": string_lists([[t for t, _ in r[2]] for r in rows]),
            "messages": messages_array([[{"role": "user", "content": self.render("caption_train")},
                                         {"role": "assistant", "content": r[2][0][1]}] for r in rows]),
            "lineage": strings([r[3] for r in rows])})

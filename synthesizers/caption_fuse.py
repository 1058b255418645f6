"""``caption_fuse``: a teacher LLM merges candidate captions of one image into one richer caption.

Input rows carry candidates in a list column (``candidates_column``, e.g. what ``caption`` wrote from
several teachers). With ``rank_column`` (a list of numbers aligned with the candidates, e.g.
``scores.clip_score.text_scores`` from ``clip_score: {texts_column: captions}``, CLIP or Long-CLIP)
only the ``top_k`` best-ranked candidates are fused — the ranking-then-fusion recipe,
which fuses the top two; without it the first ``top_k`` are. A row with a single candidate keeps it
unchanged (nothing to fuse, nothing sent). Writes ``caption`` and, when the row has images,
``messages`` (user: ``<image>`` and the instruction; assistant: the caption) plus ``lineage``.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from curate.arrays import strings
from curate.registry import register_stage
from curate.schema import score_column
from synthesizers.teachers.session import Ask
from synthesizers.teachers.task import TeacherCommon, TeacherTask, messages_array


@register_stage("caption_fuse")
class CaptionFuse(TeacherTask):
    """LLM fusion of candidate captions (see the module docstring)."""

    class Params(TeacherCommon):
        candidates_column: str = Field("captions", description="list<string> column of candidate captions")
        rank_column: str | None = Field(None, description="list<number> column (or score path, e.g. "
                                        "scores.clip_score.text_scores) aligned with the candidates: fuse "
                                        "the top_k highest (null: the first top_k)")
        top_k: int = Field(2, ge=1, le=32, description="candidates fused per image")

    requires = ("id",)
    provides = ("caption", "messages", "lineage")
    templates = ("caption_fuse", "caption_train")

    def process(self, batch: pa.RecordBatch, ctx, session) -> pa.RecordBatch | None:
        p = self.params
        st = ctx.stats[self.label]
        ids = batch.column("id").to_pylist()
        cands = batch.column(p.candidates_column).to_pylist()
        ranks = score_column(batch, p.rank_column).to_pylist() if p.rank_column else [None] * batch.num_rows
        chosen: list[list[str]] = []
        for c, r in zip(cands, ranks, strict=True):
            c = c or []
            aligned = r is not None and len(r) == len(c)
            pairs = [(x, r[j] if aligned else None) for j, x in enumerate(c) if isinstance(x, str) and x.strip()]
            if aligned:  # candidates and their ranks are filtered together
                pairs.sort(key=lambda xr: -(xr[1] if xr[1] is not None else float("-inf")))
            chosen.append([x for x, _ in pairs[:p.top_k]])
        send = [i for i, c in enumerate(chosen) if len(c) > 1]
        asks = [Ask(messages=({"role": "user", "content": self.render(
            "caption_fuse", count=len(chosen[i]),
            captions="\n\n".join(f"{j + 1}. {c}" for j, c in enumerate(chosen[i])))},), row=ids[i])
            for i in send]
        answers = dict(zip(send, session.ask(asks), strict=True))
        keep, captions = [], []
        for i, c in enumerate(chosen):
            if not c:
                st.drop("no_candidates")
                continue
            a = answers.get(i)
            if a is not None and not a.ok:
                if self.unusable(ctx, ids[i], a):
                    continue
                captions.append(None)
            else:
                captions.append(a.text.strip() if a is not None else c[0])
            keep.append(i)
        if not keep:
            return None
        out = batch.take(pa.array(keep, pa.int64()))
        has_images = "images" in out.schema.names
        messages = [[{"role": "user", "content": self.render("caption_train")},
                     {"role": "assistant", "content": cap}] if cap is not None and has_images else None
                    for cap in captions]
        lineage = [self.lineage(ctx, [ids[i]], fused=len(chosen[i])) for i in keep]
        for name, arr in (("caption", strings(captions)), ("messages", messages_array(messages)),
                          ("lineage", strings(lineage))):
            if name in out.schema.names:
                out = out.set_column(out.schema.get_field_index(name), name, arr)
            else:
                out = out.append_column(name, arr)
        return out

"""``summarize``: hierarchical summaries of long documents, written by a teacher.

Each document is cut on line boundaries into chunks of about ``chunk_tokens`` run-tokenizer tokens
(:mod:`synthesizers.teachers.segments`). Level 0 summarizes every chunk; each next level merges
``fanout`` consecutive summaries into one, until one summary is left (a document of one chunk is
summarized once). Every level of every document in a batch goes to the teacher in one call, so the
server stays busy. Rows: ``summary``, ``summary_levels`` (how many levels it took), ``messages``
(user: the document and the instruction; assistant: the summary) and ``lineage``.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from curate.arrays import strings
from curate.registry import register_stage
from synthesizers.teachers.segments import segment_documents
from synthesizers.teachers.session import Ask
from synthesizers.teachers.task import TeacherParams, TeacherTask, messages_array


@register_stage("summarize")
class Summarize(TeacherTask):
    """Hierarchical (map, then merge) summaries (see the module docstring)."""

    class Params(TeacherParams):
        chunk_tokens: int = Field(4096, ge=16, description="tokens per chunk summarized at level 0")
        fanout: int = Field(4, ge=2, le=64, description="summaries merged into one at each higher level")
        words: int = Field(300, ge=10, description="longest summary asked for, in words")
        max_levels: int = Field(8, ge=1, description="most merge levels (a bound on the teacher calls)")

    requires = ("id", "text")
    provides = ("messages", "summary", "summary_levels", "lineage")
    needs_tokenizer = True
    templates = ("summarize_chunk", "summarize_merge", "summarize_train")

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return ["id", *self.provides]

    def process(self, batch: pa.RecordBatch, ctx, session) -> pa.RecordBatch | None:
        p = self.params
        st = ctx.stats[self.label]
        ids = batch.column("id").to_pylist()
        texts = ["" if t is None else t for t in batch.column(p.text_column).to_pylist()]
        chunks = segment_documents(texts, ctx.tokenizer, p.chunk_tokens)
        # per document: the texts of the current level, and whether it has failed
        level: dict[int, list[str]] = {}
        for i, segs in enumerate(chunks):
            if not segs:
                st.drop("empty")
            else:
                level[i] = [s.text for s in segs]
        failed: dict[int, object] = {}
        depth: dict[int, int] = {i: 0 for i in level}
        first = True
        for _ in range(p.max_levels + 1):
            work = [(i, k) for i, items in level.items() if i not in failed and (first or len(items) > 1)
                    for k in range(len(items) if first else -(-len(items) // p.fanout))]
            if not work:
                break
            asks = []
            for i, k in work:
                items = level[i]
                if first:
                    prompt = self.render("summarize_chunk", part=k + 1, parts=len(items), words=p.words,
                                         text=items[k])
                else:
                    group = items[k * p.fanout:(k + 1) * p.fanout]
                    prompt = self.render("summarize_merge", words=p.words,
                                         summaries="\n\n".join(f"[{j + 1}] {g}" for j, g in enumerate(group)))
                asks.append(Ask(messages=({"role": "user", "content": prompt},), row=ids[i]))
            answers = session.ask(asks)
            new: dict[int, list[str]] = {}
            for (i, _k), answer in zip(work, answers, strict=True):
                if i in failed:
                    continue
                if not answer.ok:
                    failed[i] = answer
                    continue
                new.setdefault(i, []).append(answer.text.strip())
            for i, summaries in new.items():
                if i not in failed:
                    level[i] = summaries
                    depth[i] += 1
            first = False
        rows = []
        for i in level:
            if i in failed:
                if self.unusable(ctx, ids[i], failed[i]):
                    continue
                rows.append((ids[i], None, None, depth[i], self.lineage(ctx, [ids[i]])))
                continue
            if len(level[i]) != 1:
                st.drop("too_many_levels")
                continue
            summary = level[i][0]
            user = self.render("summarize_train", text=texts[i])
            rows.append((ids[i], [{"role": "user", "content": user}, {"role": "assistant", "content": summary}],
                         summary, depth[i], self.lineage(ctx, [ids[i]], chunks=len(chunks[i]), levels=depth[i])))
        if not rows:
            return None
        return pa.RecordBatch.from_pydict({
            "id": strings([r[0] for r in rows]), "messages": messages_array([r[1] for r in rows]),
            "summary": strings([r[2] for r in rows]), "summary_levels": pa.array([r[3] for r in rows], pa.int32()),
            "lineage": strings([r[4] for r in rows])})

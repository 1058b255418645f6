"""``long_doc_qa``: questions over whole long documents (books, repositories) that need several parts.

Map, then ask:

1. each document is cut on line boundaries into chunks of about ``chunk_tokens`` tokens
   (:mod:`synthesizers.teachers.segments`); the teacher lists up to ``facts_per_chunk`` specific facts
   of every chunk (one call for all chunks of a batch);
2. per question, ``hops`` chunks (between ``min_hops`` and ``max_hops``, drawn from the document's
   own seeded generator, among chunks with facts) are chosen; the teacher sees their notes, labelled
   with their part numbers, and writes a question that needs at least two of them, listing those in
   ``evidence`` (only the shown numbers are accepted, in the schema too).

The training row's context is the **whole document**: ``messages`` (user: the document and the
question; assistant: the answer), ``question``, ``answer``, ``context_tokens`` and ``evidence`` — per
evidence chunk its number and its ``[char_offset, char_end)`` span in the user message. Documents with
fewer than two chunks are dropped as ``too_short`` (use ``segment_qa`` for those).
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, Field, model_validator

from curate import seeds
from curate.arrays import strings
from curate.registry import register_stage
from synthesizers.teachers.qa import evidence_model
from synthesizers.teachers.segments import segment_documents
from synthesizers.teachers.session import Ask
from synthesizers.teachers.task import TeacherParams, TeacherTask, messages_array

EVIDENCE = pa.list_(pa.struct([("chunk", pa.int32()), ("char_offset", pa.int64()), ("char_end", pa.int64())]))


class ChunkNotes(BaseModel):
    facts: list[str]


@register_stage("long_doc_qa")
class LongDocQA(TeacherTask):
    """Multi-part questions over whole documents (see the module docstring)."""

    class Params(TeacherParams):
        chunk_tokens: int = Field(2048, ge=16, description="tokens per chunk the teacher takes notes of")
        facts_per_chunk: int = Field(8, ge=1, le=64, description="most facts listed per chunk")
        questions_per_doc: int = Field(2, ge=1, le=64, description="questions asked per document")
        min_hops: int = Field(2, ge=2, description="fewest chunks whose notes one question is built from")
        max_hops: int = Field(3, ge=2, le=16, description="most chunks whose notes one question is built from")

        @model_validator(mode="after")
        def _hops(self):
            if self.min_hops > self.max_hops:
                raise ValueError("min_hops is larger than max_hops")
            return self

    requires = ("id", "text")
    provides = ("messages", "question", "answer", "context_tokens", "evidence", "lineage")
    needs_tokenizer = True
    templates = ("chunk_notes", "doc_question", "doc_train")

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return ["id", *self.provides]

    def process(self, batch: pa.RecordBatch, ctx, session) -> pa.RecordBatch | None:
        p = self.params
        st = ctx.stats[self.label]
        ids = batch.column("id").to_pylist()
        texts = ["" if t is None else t for t in batch.column(p.text_column).to_pylist()]
        chunks = segment_documents(texts, ctx.tokenizer, p.chunk_tokens)
        docs = [i for i, c in enumerate(chunks) if len(c) >= 2]
        st.drop("too_short", len(ids) - len(docs))
        work = [(i, k) for i in docs for k in range(len(chunks[i]))]
        notes_asks = [Ask(messages=({"role": "user", "content": self.render(
            "chunk_notes", part=k + 1, parts=len(chunks[i]), facts=p.facts_per_chunk, text=chunks[i][k].text)},),
            model=ChunkNotes, row=f"{ids[i]}#part{k + 1}") for i, k in work]
        notes: dict[tuple[int, int], list[str]] = {}
        for (i, k), a in zip(work, session.ask(notes_asks), strict=True):
            if a.ok and a.value.facts:
                notes[(i, k)] = [f.strip() for f in a.value.facts[:p.facts_per_chunk] if f.strip()]
            elif not a.ok and a.error_kind != "context_length":
                st.count("chunks_without_notes")
        plans, asks = [], []
        for i in docs:
            usable = [k for k in range(len(chunks[i])) if notes.get((i, k))]
            if len(usable) < 2:
                st.drop("too_few_notes")
                continue
            for q in range(p.questions_per_doc):
                rng = seeds.rng(ctx.seed, self.label, ids[i], q)
                hops = int(rng.integers(p.min_hops, min(p.max_hops, len(usable)) + 1))
                chosen = sorted(int(k) for k in rng.choice(usable, size=hops, replace=False))
                shown = "\n\n".join(f"Part {k + 1}:\n" + "\n".join(f"- {f}" for f in notes[(i, k)]) for k in chosen)
                row = f"{ids[i]}#q{q}"
                plans.append((i, row, chosen))
                asks.append(Ask(messages=({"role": "user", "content": self.render(
                    "doc_question", count=len(chosen), notes=shown)},),
                    model=evidence_model(tuple(k + 1 for k in chosen)), row=row, sample=q))
        rows = []
        for (i, row, chosen), a in zip(plans, session.ask(asks), strict=True):
            if not a.ok:
                if not self.unusable(ctx, row, a):
                    rows.append({"id": row, "teacher_raw": a.text, "teacher_error": a.error,
                                 "lineage": self.lineage(ctx, [ids[i]])})
                continue
            user = self.render("doc_train", text=texts[i], question=a.value.question)
            base = user.find(texts[i])
            evidence = [{"chunk": k, "char_offset": base + chunks[i][k - 1].start,
                         "char_end": base + chunks[i][k - 1].start + len(chunks[i][k - 1].text)}
                        for k in a.value.evidence]
            rows.append({"id": row, "messages": [{"role": "user", "content": user},
                                                 {"role": "assistant", "content": a.value.answer}],
                         "question": a.value.question, "answer": a.value.answer,
                         "context_tokens": sum(c.tokens for c in chunks[i]), "evidence": evidence,
                         "lineage": self.lineage(ctx, [ids[i]], shown=[k + 1 for k in chosen],
                                                 evidence=a.value.evidence)})
        if not rows:
            return None
        cols = {"id": strings([r["id"] for r in rows]),
                "messages": messages_array([r.get("messages") for r in rows]),
                "question": strings([r.get("question") for r in rows]),
                "answer": strings([r.get("answer") for r in rows]),
                "context_tokens": pa.array([r.get("context_tokens") for r in rows], pa.int32()),
                "evidence": pa.array([r.get("evidence") for r in rows], EVIDENCE),
                "lineage": strings([r["lineage"] for r in rows])}
        if p.unparsable == "keep":
            cols["teacher_raw"] = strings([r.get("teacher_raw") for r in rows])
            cols["teacher_error"] = strings([r.get("teacher_error") for r in rows])
        return pa.RecordBatch.from_pydict(cols)

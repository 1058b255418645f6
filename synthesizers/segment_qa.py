"""``segment_qa``: IN2-style long-context QA (An et al., NeurIPS 2024) written by a teacher.

Each input document is cut into segments of about ``segment_tokens`` tokens (IN2's Algorithm 1, see
:mod:`synthesizers.teachers.segments`). Per document, with its own seeded generator:

- **single** (fine-grained awareness, probability ``1 − multi_hop_fraction``): one random segment is
  shown to the teacher, which writes a question about a specific detail of it and the answer;
- **multi_hop** (integration and reasoning): up to ``hop_segments`` consecutive segments, numbered, are
  shown; the teacher writes a question that needs at least two of them and lists those in
  ``evidence`` (checked: ≥ 2 valid numbers, else the repair turn);
- the **context** is built from the document's segments (the one segment, or all shown ones) and
  distractor segments of *other* documents of the shard (a seeded reservoir of ``pool_segments``),
  to a length drawn uniformly from ``[min_tokens, max_tokens]`` (IN2 spreads lengths evenly over
  4K–32K), counted with the run tokenizer on the final context text;
- **evidence depth**: each document segment is placed at a depth drawn from ``depth_weights`` (weights
  of equal-width depth bins over [0, 1]; uniform by default — IN2's point is that evidence can be
  anywhere); distractors fill the other slots in random order; segments are joined with ``"\\n"``.

Output rows (one per document, or ``questions_per_doc``): ``messages`` (user: context + question,
assistant: answer — the only turn with loss once tokenized by ``chat_tokens``), ``question``,
``answer``, ``qa_type``, ``context_tokens``, ``evidence`` (per evidence segment: its document, its index
there, its character and token offset in the context and its ``depth`` = token offset / context
tokens), ``lineage``. A shard whose documents cannot fill ``min_tokens`` with other documents'
segments drops the rows it cannot build under ``not_enough_distractors``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate import seeds
from curate.arrays import strings
from curate.registry import register_stage
from synthesizers.teachers.qa import SingleQA, evidence_model
from synthesizers.teachers.segments import Segment, segment_documents
from synthesizers.teachers.session import Answer, Ask
from synthesizers.teachers.task import TeacherParams, TeacherTask, messages_array

EVIDENCE = pa.list_(pa.struct([("source_id", pa.string()), ("segment", pa.int32()),
                               ("char_offset", pa.int64()), ("char_end", pa.int64()),
                               ("token_offset", pa.int32()),
                               ("depth", pa.float32())]))


@dataclass
class _Plan:
    row: str
    doc: str
    kind: str
    segments: list[Segment]  # what the teacher sees (single: one)
    rng: np.random.Generator
    question: int = 0  # which of the document's questions (a different sample of the same prompt)


@register_stage("segment_qa")
class SegmentQA(TeacherTask):
    """IN2-style QA over segments placed among distractors (see the module docstring)."""

    class Params(TeacherParams):
        segment_tokens: int = Field(128, ge=8, description="tokens per segment (IN2: 128)")
        min_tokens: int = Field(4096, gt=0, description="shortest context, in run-tokenizer tokens")
        max_tokens: int = Field(32768, gt=0, description="longest context, in run-tokenizer tokens")
        multi_hop_fraction: float = Field(0.2, ge=0, le=1, description="share of multi-hop questions "
                                          "(IN2's mixture: about 0.2)")
        hop_segments: int = Field(6, ge=2, le=50, description="most consecutive segments shown for a "
                                  "multi-hop question")
        questions_per_doc: int = Field(1, ge=1, le=64, description="QA rows per document")
        depth_weights: list[float] | None = Field(None, description="weights of equal-width evidence-depth "
                                                  "bins over [0, 1] (null: uniform)")
        pool_segments: int = Field(20_000, ge=16, description="distractor segments kept per shard")

        @model_validator(mode="after")
        def _ranges(self):
            if self.min_tokens > self.max_tokens:
                raise ValueError("min_tokens is larger than max_tokens")
            if self.depth_weights is not None and (not self.depth_weights or min(self.depth_weights) < 0
                                                   or sum(self.depth_weights) <= 0):
                raise ValueError("depth_weights must be non-negative with a positive sum")
            return self

    requires = ("id", "text")
    provides = ("messages", "question", "answer", "qa_type", "context_tokens", "evidence", "lineage")
    needs_tokenizer = True
    templates = ("qa_single", "qa_multi", "qa_train")

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self._pools: dict[int, _Pool] = {}

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return ["id", *self.provides]

    def run(self, batches, ctx):
        # the distractor pool belongs to this shard: kept on the context, never on the stage
        self._pools[id(ctx)] = _Pool(self.params.pool_segments,
                                     seeds.rng(ctx.seed, self.label, "pool", ctx.shard.key))
        try:
            yield from super().run(batches, ctx)
        finally:
            self._pools.pop(id(ctx), None)

    # ------------------------------------------------------------------ one batch
    def process(self, batch: pa.RecordBatch, ctx, session) -> pa.RecordBatch | None:
        p = self.params
        pool = self._pools[id(ctx)]
        st = ctx.stats[self.label]
        ids = batch.column("id").to_pylist()
        texts = batch.column(p.text_column).to_pylist()
        texts = ["" if t is None else t for t in texts]
        tok = ctx.tokenizer
        docs = segment_documents(texts, tok, p.segment_tokens)
        for doc_id, segs in zip(ids, docs, strict=True):
            pool.add(doc_id, segs)
        plans: list[_Plan] = []
        for doc_id, segs in zip(ids, docs, strict=True):
            if not segs:
                st.drop("empty")
                continue
            for q in range(p.questions_per_doc):
                rng = seeds.rng(ctx.seed, self.label, doc_id, q)
                row = f"{doc_id}#qa{q}" if p.questions_per_doc > 1 else f"{doc_id}#qa"
                if len(segs) >= 2 and rng.random() < p.multi_hop_fraction:
                    n = min(p.hop_segments, len(segs))
                    start = int(rng.integers(0, len(segs) - n + 1))
                    plans.append(_Plan(row, doc_id, "multi_hop", segs[start:start + n], rng, q))
                else:
                    plans.append(_Plan(row, doc_id, "single", [segs[int(rng.integers(0, len(segs)))]], rng, q))
        answers = session.ask([self._ask(plan) for plan in plans])
        rows = []
        for plan, answer in zip(plans, answers, strict=True):
            if not answer.ok:
                if self.unusable(ctx, plan.row, answer):
                    continue
                rows.append(self._null_row(plan, answer, ctx))
                continue
            row = self._row(plan, answer, ctx, pool, tok)
            if row is not None:
                rows.append(row)
        if not rows:
            return None
        return _to_batch(rows, keep_errors=p.unparsable == "keep")

    def _ask(self, plan: _Plan) -> Ask:
        if plan.kind == "single":
            prompt = self.render("qa_single", segment=plan.segments[0].text)
            model = SingleQA
        else:
            pieces = "\n\n".join(f"[{k + 1}]\n{s.text}" for k, s in enumerate(plan.segments))
            prompt = self.render("qa_multi", count=len(plan.segments), pieces=pieces)
            model = evidence_model(tuple(range(1, len(plan.segments) + 1)))
        return Ask(messages=({"role": "user", "content": prompt},), model=model, row=plan.row,
                   sample=plan.question)

    # ------------------------------------------------------------------ the context
    def _row(self, plan: _Plan, answer: Answer, ctx, pool: _Pool, tok) -> dict | None:
        p = self.params
        value = answer.value
        if plan.kind == "multi_hop":
            valid = [k - 1 for k in value.evidence if 1 <= k <= len(plan.segments)]
            if len(valid) < 2:
                answer.error, answer.error_kind = "evidence names fewer than two shown pieces", "unparsable"
                return None if self.unusable(ctx, plan.row, answer) else self._null_row(plan, answer, ctx)
            evidence_idx = set(valid)
        else:
            evidence_idx = {0}
        rng = plan.rng
        target = int(rng.integers(p.min_tokens, p.max_tokens + 1))
        own = sum(s.tokens for s in plan.segments) + len(plan.segments)
        distractors = pool.draw(plan.doc, max(target - own, 0), rng)
        depths = self._depths(rng, len(plan.segments))
        for _ in range(8):  # exact token count of the final text; adjust by whole distractors
            context, offsets = _assemble(plan.segments, distractors, depths)
            encoding = tok.tk.encode(context, add_special_tokens=False)
            n = len(encoding.ids)
            if n > p.max_tokens and distractors:
                distractors = distractors[:-max(1, (n - p.max_tokens) // max(p.segment_tokens, 1))]
                continue
            if n < p.min_tokens:
                more = pool.draw(plan.doc, p.max_tokens - n, rng, exclude={id(s) for _, s in distractors},
                                 enough=p.min_tokens - n)
                if not more:
                    break
                distractors = distractors + more
                continue
            break
        if not (p.min_tokens <= n <= p.max_tokens):
            ctx.stats[self.label].drop("not_enough_distractors" if n < p.min_tokens else "context_too_long")
            return None
        user = self.render("qa_train", context=context, question=value.question)
        base = user.find(context)
        evidence = []
        starts = [start for start, _ in encoding.offsets]
        for k in sorted(evidence_idx):
            char = offsets[k]
            t_off = bisect.bisect_left(starts, char)  # the segment's first token in the encoded context
            evidence.append({"source_id": plan.doc, "segment": plan.segments[k].index,
                             "char_offset": base + char, "char_end": base + char + len(plan.segments[k].text),
                             "token_offset": t_off, "depth": t_off / n})
        sources = [plan.doc] + sorted({d for d, _ in distractors})
        return {"id": plan.row, "messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": value.answer}],
                "question": value.question, "answer": value.answer, "qa_type": plan.kind,
                "context_tokens": n, "evidence": evidence,
                "lineage": self.lineage(ctx, sources, evidence=[(e["segment"], e["depth"]) for e in evidence],
                                        distractors=len(distractors))}

    def _depths(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """``k`` evidence depths in [0, 1) from the configured bin weights."""
        w = self.params.depth_weights
        if w is None:
            return rng.random(k)
        w = np.asarray(w, dtype=float) / sum(w)
        bins = rng.choice(len(w), size=k, p=w)
        return (bins + rng.random(k)) / len(w)

    def _null_row(self, plan: _Plan, answer: Answer, ctx) -> dict:
        return {"id": plan.row, "messages": None, "question": None, "answer": None, "qa_type": plan.kind,
                "context_tokens": None, "evidence": None, "teacher_raw": answer.text,
                "teacher_error": answer.error, "lineage": self.lineage(ctx, [plan.doc])}


class _Pool:
    """A seeded reservoir of (document id, segment) for distractors."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.items: list[tuple[str, Segment]] = []
        self.seen = 0

    def add(self, doc: str, segs: list[Segment]) -> None:
        for s in segs:
            self.seen += 1
            if len(self.items) < self.size:
                self.items.append((doc, s))
            else:
                j = int(self.rng.integers(0, self.seen))
                if j < self.size:
                    self.items[j] = (doc, s)

    def draw(self, doc: str, tokens: int, rng: np.random.Generator, exclude: set[int] | None = None,
             enough: int | None = None) -> list[tuple[str, Segment]]:
        """Segments of other documents, in random order, that fit together in ``tokens``; stops once
        ``enough`` (default: ``tokens`` less one segment's worth) is reached. Segments too large for
        the room left are skipped, not a reason to stop."""
        out: list[tuple[str, Segment]] = []
        total = 0
        if tokens <= 0:
            return out
        smallest = min((s.tokens for _, s in self.items), default=1)
        goal = enough if enough is not None else tokens - smallest
        for j in rng.permutation(len(self.items)):
            d, s = self.items[int(j)]
            if d == doc or (exclude and id(s) in exclude) or total + s.tokens + 1 > tokens:
                continue
            out.append((d, s))
            total += s.tokens + 1
            if total >= goal:
                break
        return out


def _assemble(own: list[Segment], distractors: list[tuple[str, Segment]],
              depths: np.ndarray) -> tuple[str, list[int]]:
    """The context text, with each own segment at the slot its depth names; their char offsets."""
    n = len(own) + len(distractors)
    slots: list[int | None] = [None] * n
    order = np.argsort(depths, kind="stable")
    for k in order:
        want = min(int(depths[k] * n), n - 1)
        free = [i for i in range(n) if slots[i] is None]
        slot = min(free, key=lambda i: (abs(i - want), i))
        slots[slot] = int(k)
    parts, offsets, pos = [], [0] * len(own), 0
    it = iter(distractors)
    for s in slots:
        text = own[s].text if s is not None else next(it)[1].text
        if s is not None:
            offsets[s] = pos
        parts.append(text)
        pos += len(text) + 1
    return "\n".join(parts), offsets


def _to_batch(rows: list[dict], keep_errors: bool) -> pa.RecordBatch:
    cols = {
        "id": strings([r["id"] for r in rows]),
        "messages": messages_array([r["messages"] for r in rows]),
        "question": strings([r["question"] for r in rows]),
        "answer": strings([r["answer"] for r in rows]),
        "qa_type": strings([r["qa_type"] for r in rows]),
        "context_tokens": pa.array([r["context_tokens"] for r in rows], pa.int32()),
        "evidence": pa.array([r["evidence"] for r in rows], EVIDENCE),
        "lineage": strings([r["lineage"] for r in rows]),
    }
    if keep_errors:
        cols["teacher_raw"] = strings([r.get("teacher_raw") for r in rows])
        cols["teacher_error"] = strings([r.get("teacher_error") for r in rows])
    return pa.RecordBatch.from_pydict(cols)

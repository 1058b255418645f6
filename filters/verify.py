"""``verify``: a teacher checks that each answer is supported by its evidence; unsupported QA is dropped.

For every row the teacher sees the evidence, the question and the answer, and says whether every claim
of the answer is found in (or follows directly from) the evidence. Rows judged unsupported are dropped
as ``unsupported``; rows without a question, an answer or any evidence text are dropped as
``nothing_to_verify`` (nothing is sent); the verdict is stored as ``scores.<label>.supported`` (1.0 / 0.0) with the one-line
reason under ``verify_reason`` when ``keep_reason``.

The evidence is, in order of preference: ``evidence_column`` (a string or list of strings), or the
``evidence`` spans that ``segment_qa`` and ``long_doc_qa`` write (``char_offset`` … ``char_end`` in the
first user message of ``messages``).

With ``candidates_column`` (a list of alternative answers to the same question), a **pairwise judge**
first picks the best candidate: every pair is judged in both orders (so the position of an answer
cannot decide), a candidate scores one point per win, ties go to the earlier candidate, and the winner
becomes the ``answer`` (and the assistant turn of ``messages``) before it is verified.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from curate.arrays import strings
from curate.registry import register_stage
from curate.stage import Filter
from synthesizers.teachers.session import Ask, TeacherSession, make_teacher, template_digest
from synthesizers.teachers.task import TeacherCommon, load_template, messages_array


class Verdict(BaseModel):
    supported: bool
    reason: str


class Preference(BaseModel):
    better: Literal["A", "B"]
    reason: str


@register_stage("verify")
class Verify(Filter):
    """Drop QA whose answer its evidence does not support (see the module docstring)."""

    class Params(TeacherCommon, Filter.Params):
        question_column: str = Field("question", description="the question")
        answer_column: str = Field("answer", description="the answer checked (and replaced by the judge's pick)")
        evidence_column: str | None = Field(None, description="evidence text (string or list of strings); "
                                            "null: the evidence spans in messages")
        candidates_column: str | None = Field(None, description="list of alternative answers: pick the best by "
                                              "pairwise judging first")
        max_candidates: int = Field(4, ge=2, le=8, description="most candidates judged (pairs grow as n²)")

    requires = ("question", "answer")
    templates = ("verify", "judge")

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self.texts = {name: load_template(name, params.prompts) for name in self.templates}
        self._sessions: dict[int, TeacherSession] = {}
        self.template_hash = template_digest(*(f"{n}\n{t}" for n, t in sorted(self.texts.items())))
        self.requires = tuple(c for c in (params.question_column, params.answer_column, params.evidence_column,
                                          params.candidates_column) if c) + (() if params.evidence_column
                                                                              else ("messages", "evidence"))

    def requirements(self) -> dict[str, str]:
        return {"openai": {"openai": "llm"}, "vllm": {"vllm": "vllm"},
                "transformers": {"transformers": "llm", "torch": "llm"}}[self.params.teacher.backend]

    def score_names(self) -> list[str]:
        return ["supported"]

    def setup(self, ctx) -> None:
        """Load (or connect to) the teacher once per worker process, before the first batch."""
        make_teacher(self.params.teacher, ctx.seed)

    def run(self, batches, ctx):
        # one session per shard, found by the shard's context (a stage object may serve several
        # shards at once, in threads): never a shard's state on the stage itself
        session = TeacherSession(self.label, self.params.teacher, ctx, self.template_hash,
                                 repair_attempts=self.params.repair_attempts)
        self._sessions[id(ctx)] = session
        try:
            yield from super().run(batches, ctx)
        finally:
            self._sessions.pop(id(ctx), None)
            session.close()
        session.finish()

    def _render(self, name: str, **values) -> str:
        from string import Template

        return Template(self.texts[name]).safe_substitute({k: str(v) for k, v in values.items()})

    def _evidence(self, batch: pa.RecordBatch) -> list[str]:
        p = self.params
        if p.evidence_column:
            out = []
            for v in batch.column(p.evidence_column).to_pylist():
                out.append("\n\n".join(x for x in v if x) if isinstance(v, list) else (v or ""))
            return out
        out = []
        for msgs, spans in zip(batch.column("messages").to_pylist(), batch.column("evidence").to_pylist(),
                               strict=True):
            user = next((m["content"] for m in msgs or [] if m["role"] == "user"), "") or ""
            out.append("\n\n".join(user[e["char_offset"]:e["char_end"]] for e in spans or []))
        return out

    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        p = self.params
        ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * batch.num_rows
        questions = batch.column(p.question_column).to_pylist()
        answers = batch.column(p.answer_column).to_pylist()
        evidence = self._evidence(batch)
        if p.candidates_column:
            answers = self._judge(ctx, ids, questions, answers, evidence,
                                  batch.column(p.candidates_column).to_pylist())
        checkable = [k for k, (q, a, e) in enumerate(zip(questions, answers, evidence, strict=True))
                     if (q or "").strip() and (a or "").strip() and e.strip()]
        asks = [Ask(messages=({"role": "user", "content": self._render(
            "verify", evidence=evidence[k], question=questions[k], answer=answers[k])},), model=Verdict, row=ids[k])
            for k in checkable]
        answered = dict(zip(checkable, self._sessions[id(ctx)].ask(asks), strict=True))
        supported, reasons = [], []
        for k, rid in enumerate(ids):
            v = answered.get(k)
            if v is None:  # no question, answer or evidence: nothing to check, never "supported"
                supported.append(float("nan"))
                reasons.append("nothing_to_verify")
            elif v.ok:
                supported.append(1.0 if v.value.supported else 0.0)
                reasons.append(v.value.reason)
            else:
                supported.append(float("nan"))
                reasons.append(None)
                if v.error_kind != "context_length":
                    ctx.failure(v.error_kind or "teacher_error", f"stage {self.label}, row {rid!r}: {v.error}",
                                record=v.text, stage=self.label)
        return {"supported": pa.array([None if math.isnan(s) else s for s in supported], pa.float32()),
                "_answers": strings(answers), "_verdict_errors": pa.array([math.isnan(s) for s in supported]),
                "_why": pa.array(reasons, pa.string())}

    def _judge(self, ctx, ids, questions, answers, evidence, candidates) -> list[str]:
        p = self.params
        pairs, owners = [], []
        pools = []
        for r, (q, a, e, c) in enumerate(zip(questions, answers, evidence, candidates, strict=True)):
            pool = list(dict.fromkeys([x for x in [a, *(c or [])] if isinstance(x, str) and x.strip()]))
            pool = pool[:p.max_candidates]
            pools.append(pool)
            for x, y in combinations(range(len(pool)), 2):
                for first, second in ((x, y), (y, x)):
                    pairs.append(Ask(messages=({"role": "user", "content": self._render(
                        "judge", evidence=e, question=q or "", first=pool[first], second=pool[second])},),
                        model=Preference, row=ids[r]))
                    owners.append((r, first, second))
        wins = [[0] * len(pool) for pool in pools]
        for (r, first, second), a in zip(owners, self._sessions[id(ctx)].ask(pairs), strict=True):
            if a.ok:
                wins[r][first if a.value.better == "A" else second] += 1
        return [pool[max(range(len(pool)), key=lambda k: (w[k], -k))] if pool else a
                for pool, w, a in zip(pools, wins, answers, strict=True)]

    def decide(self, batch: pa.RecordBatch, scores: dict[str, pa.Array], ctx) -> pa.Array:
        supported = scores["supported"].to_pylist()
        errors = scores["_verdict_errors"].to_pylist()
        why = scores["_why"].to_pylist()
        reasons = []
        for s, err, w in zip(supported, errors, why, strict=True):
            if w == "nothing_to_verify":
                reasons.append(w)
            elif err:
                reasons.append("unverified" if self.params.unparsable == "drop" else None)
            else:
                reasons.append(None if s == 1.0 else "unsupported")
        return pa.array(reasons, pa.string())

    def _filter(self, batch: pa.RecordBatch, ctx) -> pa.RecordBatch:
        """As :class:`Filter`, and with a judge, the picked answer replaces ``answer`` and the assistant turn."""
        from curate.stage import _apply_reasons, _with_scores, record_scores

        scores = self.score(batch, ctx)
        if self.params.candidates_column:
            batch = _replace_answers(batch, self.params.answer_column, scores["_answers"])
        batch = _with_scores(batch, self.label, {"supported": scores["supported"]})
        reasons = self.decide(batch, scores, ctx)
        record_scores(ctx.stats[self.label], {"supported": scores["supported"]})
        return _apply_reasons(batch, reasons, ctx.stats[self.label], ctx, self.label, self.params)


def _replace_answers(batch: pa.RecordBatch, column: str, answers: pa.Array) -> pa.RecordBatch:
    batch = batch.set_column(batch.schema.get_field_index(column), column, answers)
    if "messages" not in batch.schema.names:
        return batch
    rows = batch.column("messages").to_pylist()
    for msgs, answer in zip(rows, answers.to_pylist(), strict=True):
        for m in reversed(msgs or []):
            if m["role"] == "assistant":
                m["content"] = answer
                break
    return batch.set_column(batch.schema.get_field_index("messages"), "messages", messages_array(rows))

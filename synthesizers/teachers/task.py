"""The base of every teacher task stage: its ``teacher:`` block, prompt templates and output columns.

A task renders prompts from template files (``synthesizers/teachers/prompts/<name>.txt``, ``$name``
placeholders, :class:`string.Template`; a manifest may point ``prompts: {name: path}`` at its own
files), asks its :class:`~synthesizers.teachers.session.TeacherSession`, and writes chat rows:

- ``messages``: ``list<struct<role, content>>`` — what a chat SFT trainer reads (``user`` turns may
  start with ``<image>`` placeholders, one per entry of an ``images`` column);
- ``lineage``: a JSON object per row — teacher backend, model and sampling, the prompt-template hash,
  the run seed, the source document ids and, for QA, the evidence positions.

Answers that cannot be parsed after the repair turns are dropped with reason ``unparsable`` (the raw
answer and the error go to ``failures/``), or with ``unparsable: keep`` kept with null outputs and
``teacher_raw`` / ``teacher_error`` columns. Prompts longer than the teacher's context are dropped with
reason ``context_length``. Either way they are counted, never lost silently.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, ClassVar, Literal

import orjson
import pyarrow as pa
from pydantic import Field

from curate.arrays import strings
from curate.errors import ConfigError
from curate.stage import StageParams, Synthesizer
from synthesizers.teachers.session import Answer, TeacherSession, make_teacher, template_digest
from synthesizers.teachers.spec import TeacherSpec

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)


class TeacherCommon(StageParams):
    """Parameters every teacher task has."""

    teacher: TeacherSpec = Field(description="the model that writes this task's outputs (see docs/teachers.md)")
    repair_attempts: int = Field(1, ge=0, le=5, description="times an unusable JSON answer is sent back with "
                                 "the error before it counts as unparsable")
    unparsable: Literal["drop", "keep"] = Field("drop", description="rows whose answer cannot be used: drop "
                                                "(counted, raw answer in failures/) or keep with null outputs")
    prompts: dict[str, str] = Field(default_factory=dict, description="replace prompt templates: template "
                                    "name → file with $placeholders")


class TeacherParams(TeacherCommon):
    """Parameters of a teacher task that reads a text column."""

    text_column: str = Field("text", description="the column with each row's text")


def load_template(name: str, overrides: dict[str, str]) -> str:
    """A prompt template: the manifest's file for ``name`` if it gives one, else the built-in."""
    if name in overrides:
        path = Path(overrides[name]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"prompts.{name}: cannot read {path}: {e.strerror or e}") from None
    return resources.files("synthesizers.teachers").joinpath(f"prompts/{name}.txt").read_text(encoding="utf-8")


class TeacherTask(Synthesizer):
    """A synthesizer that asks a teacher. Subclasses list ``templates`` and implement ``run``."""

    Params: ClassVar[type[TeacherCommon]] = TeacherParams
    #: The prompt templates this task renders (file names without ``.txt``).
    templates: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: TeacherParams, label: str | None = None):
        super().__init__(params, label)
        unknown = sorted(set(params.prompts) - set(self.templates))
        if unknown:
            raise ConfigError(f"prompts: {', '.join(unknown)} is not a template of {self.name} "
                              f"(its templates: {', '.join(self.templates)})")
        self.texts = {name: load_template(name, params.prompts) for name in self.templates}
        for name, text in self.texts.items():
            try:
                Template(text).substitute({k: "" for k in Template(text).get_identifiers()})
            except ValueError as e:
                raise ConfigError(f"prompts.{name}: bad template: {e}") from None
        # the text a task reads comes from its text_column
        text_column = getattr(params, "text_column", "text")
        self.requires = tuple(text_column if c == "text" else c for c in type(self).requires)
        self.template_hash = template_digest(*(f"{n}\n{t}" for n, t in sorted(self.texts.items())))

    def requirements(self) -> dict[str, str]:
        backend = self.params.teacher.backend
        return {"openai": {"openai": "llm"}, "vllm": {"vllm": "vllm"},
                "transformers": {"transformers": "llm", "torch": "llm"}}[backend]

    def model_refs(self) -> dict[str, str]:
        t = self.params.teacher
        refs = {"teacher.model": t.model} if t.backend != "openai" else {}
        if t.tokenizer:
            refs["teacher.tokenizer"] = t.tokenizer
        return refs

    def run(self, batches, ctx):
        """Each batch through :meth:`process` with this shard's session; after the last batch, the
        session raises if requests failed through every retry (the shard then stays incomplete)."""
        session = self.session(ctx)
        try:
            for batch in batches:
                out = self.process(batch, ctx, session)
                if out is not None and out.num_rows:
                    yield out
        finally:
            session.close()
        session.finish()

    def setup(self, ctx) -> None:
        """Load (or connect to) the teachers once per worker process, before the first batch."""
        for spec in self.teacher_specs():
            make_teacher(spec, ctx.seed)

    def teacher_specs(self) -> list[TeacherSpec]:
        """Every teacher this task asks (one, unless a task takes several)."""
        return [self.params.teacher]

    def process(self, batch: pa.RecordBatch, ctx, session: TeacherSession) -> pa.RecordBatch | None:
        """One batch's output rows (None: none). Every task with one teacher defines it; a task with
        several teachers (``caption``) overrides :meth:`run` instead and never reaches this."""
        raise TypeError(f"{type(self).__name__} must define process() or override run()")

    def render(self, name: str, **values: Any) -> str:
        return Template(self.texts[name]).safe_substitute({k: str(v) for k, v in values.items()})

    def session(self, ctx) -> TeacherSession:
        return TeacherSession(self.label, self.params.teacher, ctx, self.template_hash,
                              repair_attempts=self.params.repair_attempts)

    def lineage(self, ctx, sources: list[str], **extra: Any) -> str:
        """The row's lineage as a JSON string."""
        return orjson.dumps({"stage": self.label, "teacher": self.params.teacher.identity(),
                             "template": self.template_hash, "seed": ctx.seed, "sources": sources, **extra},
                            option=orjson.OPT_SORT_KEYS).decode()

    def unusable(self, ctx, row_id: str, answer: Answer) -> bool:
        """Count and record a row whose answer is unusable; True when the row is to be dropped."""
        reason = answer.error_kind or "teacher_error"
        if reason == "context_length":
            ctx.stats[self.label].drop("context_length")
            return True
        drop = self.params.unparsable == "drop"
        ctx.failure(reason, f"stage {self.label}, row {row_id!r}: {answer.error}", record=answer.text,
                    stage=self.label, dropped=drop)
        return drop


def messages_array(rows: list[list[dict[str, str]] | None]) -> pa.Array:
    """``list<struct<role, content>>`` from Python rows (None: a null row)."""
    return pa.array(rows, type=MESSAGES)


def json_strings(values: list[Any]) -> pa.Array:
    return strings([None if v is None else orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode() for v in values])

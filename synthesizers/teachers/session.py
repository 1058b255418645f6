"""A teacher task's view of its teacher for one shard: cache first, then the backend, then parsing.

:class:`TeacherSession` is what a task stage calls: ``ask(asks)`` returns one :class:`Answer` per
:class:`Ask`, in order. Per shard it

1. keys each request (backend, model, sampling, the task's prompt-template hash, the rendered
   messages, the JSON schema, the sample index) and reads the shard's cache (:mod:`.cache`);
2. skips, without sending, prompts the teacher's own tokenizer says are longer than
   ``max_context_tokens`` (``context_length``);
3. sends the rest in one backend call (so the server or engine is kept full), storing each answer in
   the cache as it arrives;
4. parses JSON answers against the task's pydantic model and, up to ``repair_attempts`` times, asks
   again with the error shown (:func:`~.structured.repair_messages`);
5. counts everything in the stage's stats: ``requests_sent``, ``cache_hits``, ``prompt_tokens`` and
   ``completion_tokens`` (of the requests sent), ``retries``, ``repairs``, ``unparsable``,
   ``context_length``, ``cost_usd`` (with ``teacher.price``) and a ``latency_s`` histogram (p50/p90/p99).

Requests that still failed with a transient error are remembered; :meth:`finish` (called by the stage
after its last batch) raises :class:`~curate.errors.RetryableError` listing them, so the shard stays
incomplete and the next attempt or run sends only those. A ``fatal`` refusal raises at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from curate import models
from curate.errors import RetryableError
from curate.secrets import redact
from synthesizers.teachers.base import Reply, Request, Teacher, digest
from synthesizers.teachers.cache import ReplyCache, cache_path
from synthesizers.teachers.spec import TeacherSpec
from synthesizers.teachers.structured import json_schema, parse, repair_messages

if TYPE_CHECKING:
    from curate.context import RunContext

#: How many failed requests a RetryableError message lists (all are in the shard log).
_LISTED = 5


@dataclass
class Ask:
    """One question for the teacher: the chat ``messages``, the pydantic ``model`` of a JSON answer
    (None: free text), which ``sample`` of the prompt this is, and ``row`` (the id named in errors)."""

    messages: tuple[dict[str, Any], ...]
    model: type[BaseModel] | None = None
    sample: int = 0
    row: str | None = None
    max_tokens: int | None = None


@dataclass
class Answer:
    """The teacher's answer: ``text`` (the last raw answer), ``value`` (the parsed model, for JSON
    answers), or ``error`` with ``error_kind`` (``context_length``, ``unparsable``, ``transient``)."""

    text: str | None = None
    value: BaseModel | None = None
    error: str | None = None
    error_kind: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def make_teacher(spec: TeacherSpec, seed: int = 0) -> Teacher:
    """The backend ``spec`` names, created once per process (shared by every shard and stage)."""
    def load() -> Teacher:
        if spec.backend == "openai":
            from synthesizers.teachers.openai_backend import OpenAITeacher

            return OpenAITeacher(spec, rng_seed=seed)
        if spec.backend == "vllm":
            from synthesizers.teachers.vllm_backend import VllmTeacher

            return VllmTeacher(spec)
        from synthesizers.teachers.transformers_backend import TransformersTeacher

        return TransformersTeacher(spec)

    key = (spec.model_dump_json(),)
    return models.shared(f"teacher-{spec.backend}", key, load)


def template_digest(*texts: str) -> str:
    """A short digest of a task's prompt templates (part of every cache key and of lineage)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class TeacherSession:
    """One stage's teacher on one shard (see the module docstring)."""

    def __init__(self, label: str, spec: TeacherSpec, ctx: RunContext, template_hash: str, *,
                 repair_attempts: int = 1, teacher: Teacher | None = None):
        self.label = label
        self.spec = spec
        self.ctx = ctx
        self.stats = ctx.stats[label]
        self.template_hash = template_hash
        self.repair_attempts = repair_attempts
        self.teacher = teacher or make_teacher(spec, ctx.seed)
        self.cache = ReplyCache(cache_path(ctx.run_dir.root, label, ctx.shard_id))
        self._identity = {**spec.identity(), "template": template_hash}
        self.failed: list[tuple[str | None, str]] = []

    # ------------------------------------------------------------------ public
    def ask(self, asks: Sequence[Ask]) -> list[Answer]:
        answers = [Answer() for _ in asks]
        todo = list(range(len(asks)))
        messages = [a.messages for a in asks]
        for round_ in range(self.repair_attempts + 1):
            if not todo:
                break
            replies = self._replies([(messages[i], asks[i]) for i in todo])
            retry = []
            for i, reply in zip(todo, replies, strict=True):
                ask, answer = asks[i], answers[i]
                answer.attempts.append({"text": reply.text, "error": reply.error})
                if not reply.ok:
                    answer.text, answer.error, answer.error_kind = None, reply.error, reply.error_kind
                    continue
                answer.text = reply.text
                if ask.model is None:
                    empty = not (reply.text or "").strip()
                    answer.error, answer.error_kind = ("empty answer", "unparsable") if empty else (None, None)
                    continue
                try:
                    answer.value = parse(ask.model, reply.text or "")
                    answer.error = answer.error_kind = None
                except ValueError as e:
                    answer.error, answer.error_kind = str(e), "unparsable"
                    if round_ < self.repair_attempts:
                        self.stats.count("repairs")
                        messages[i] = repair_messages(messages[i], reply.text or "", str(e),
                                                      json_schema(ask.model))
                        retry.append(i)
            todo = retry
        for ask, answer in zip(asks, answers, strict=True):
            if answer.error_kind == "unparsable":
                self.stats.count("unparsable")
            elif answer.error_kind == "context_length":
                self.stats.count("context_length")
            elif answer.error_kind == "transient":
                self.failed.append((ask.row, answer.error or ""))
            elif answer.error_kind == "fatal":
                raise RuntimeError(f"stage {self.label}: the teacher refused a request"
                                   f"{f' for row {ask.row!r}' if ask.row else ''}: {answer.error}")
        return answers

    def finish(self) -> None:
        """Raise :class:`RetryableError` when requests of this shard failed through every retry."""
        self.cache.close()
        if self.failed:
            listed = "; ".join(f"row {row!r}: {error}" for row, error in self.failed[:_LISTED])
            more = f" (and {len(self.failed) - _LISTED} more)" if len(self.failed) > _LISTED else ""
            raise RetryableError(f"stage {self.label}: {len(self.failed)} teacher request(s) failed after "
                                 f"every retry: {listed}{more}; answered requests are cached and a rerun "
                                 "sends only these")

    def close(self) -> None:
        self.cache.close()

    # ------------------------------------------------------------------ internals
    def _key(self, messages: tuple[dict[str, Any], ...], schema: dict | None, sample: int,
             max_tokens: int | None) -> str:
        return digest({**self._identity, "messages": messages, "schema": schema, "sample": sample,
                       "max_tokens": max_tokens})

    def _replies(self, items: list[tuple[tuple[dict[str, Any], ...], Ask]]) -> list[Reply]:
        requests, keys = [], []
        for messages, ask in items:
            schema = json_schema(ask.model) if ask.model is not None else None
            key = self._key(messages, schema, ask.sample, ask.max_tokens)
            seed = self.spec.sampling.seed
            if seed is None:
                seed = int(digest([self.ctx.seed, key])[:8], 16) & 0x7FFFFFFF
            requests.append(Request(messages=messages, schema=schema, sample=ask.sample,
                                    max_tokens=ask.max_tokens, seed=seed, key=key))
            keys.append(key)
        cached = self.cache.get_many(keys)
        replies: list[Reply | None] = [cached.get(k) for k in keys]
        self.stats.count("cache_hits", sum(r is not None for r in replies))
        first: dict[str, int] = {}  # the same request twice in one call is sent once
        send = [i for i, r in enumerate(replies) if r is None and first.setdefault(keys[i], i) == i]
        if self.spec.max_context_tokens is not None:
            send = [i for i in send if not self._too_long(i, requests[i], replies)]
        if send:
            for j, reply in self.teacher.stream([requests[i] for i in send], journal=self.cache):
                i = send[j]
                if reply.text is not None:  # a half of a surrogate pair (an answer cut inside an emoji)
                    reply.text = reply.text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
                replies[i] = reply
                self._count(reply)
                if reply.ok or reply.error_kind == "context_length":
                    self.cache.put(keys[i], reply)
        for i, key in enumerate(keys):
            if replies[i] is None and first.get(key, i) != i:
                replies[i] = replies[first[key]]
        return [r if r is not None else Reply(error="no answer", error_kind="transient") for r in replies]

    def _too_long(self, i: int, request: Request, replies: list[Reply | None]) -> bool:
        n = self.teacher.count_tokens(request.messages)
        limit = self.spec.max_context_tokens
        if n is None or limit is None or n <= limit:
            return False
        replies[i] = Reply(error=f"the prompt has {n} tokens; the teacher's context is {limit}",
                           error_kind="context_length", prompt_tokens=n)
        return True

    def _count(self, reply: Reply) -> None:
        st = self.stats
        st.count("requests_sent")
        if reply.attempts > 1:
            st.count("retries", reply.attempts - 1)
            for reason in reply.retry_reasons:
                st.count(f"retry_{reason}")
        if reply.ok:
            st.count("prompt_tokens", reply.prompt_tokens)
            st.count("completion_tokens", reply.completion_tokens)
            st.histogram("latency_s").add(max(reply.latency_s, 1e-6))
            price = self.spec.price
            if price is not None:
                st.count("cost_usd", (reply.prompt_tokens * price.input_per_million
                                      + reply.completion_tokens * price.output_per_million) / 1e6)
        else:
            st.count(f"error_{reply.error_kind}")
            self.ctx.log.warning("stage %s: teacher request failed (%s): %s", self.label, reply.error_kind,
                                 redact(reply.error or ""))

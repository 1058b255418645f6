"""What every teacher backend speaks: :class:`Request` in, :class:`Reply` out, answers streamed as they come.

A backend never raises for one request's failure: the reply carries ``error`` and ``error_kind``:

- ``context_length`` — the prompt does not fit the teacher; it is never retried (skipped and counted);
- ``transient`` — 429, 5xx, timeouts, dropped connections, malformed or empty answers that persisted
  through every retry; the shard is left incomplete and a rerun asks again;
- ``fatal`` — the server refuses the request itself (401, 404 unknown model, 400): the same request
  will fail again, so the shard fails with the server's message.

Only a backend that cannot work at all (no server, a model that does not load) raises.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

ErrorKind = Literal["context_length", "transient", "fatal"]


@dataclass(frozen=True)
class Request:
    """One chat request. ``messages`` are OpenAI chat messages: ``content`` is a string, or a list of
    parts ``{"type": "text", "text": …}`` / ``{"type": "image_url", "image_url": {"url": "data:…"}}``.
    ``schema`` (a JSON schema) asks for a JSON answer; ``sample`` tells apart several answers to one
    prompt (a different seed each)."""

    messages: tuple[dict[str, Any], ...]
    schema: dict[str, Any] | None = None
    sample: int = 0
    max_tokens: int | None = None
    seed: int | None = None
    key: str | None = None  # the request's cache key (a stable id, e.g. a batch line's custom_id)


@dataclass
class Reply:
    """One answer (``text``) or why there is none (``error``, ``error_kind``)."""

    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    finish_reason: str | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    cached: bool = False
    retry_reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_record(self) -> dict[str, Any]:
        """What the cache stores (everything but ``cached`` and the retry history)."""
        return {"text": self.text, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_s": round(self.latency_s, 6),
                "attempts": self.attempts, "finish_reason": self.finish_reason, "error": self.error,
                "error_kind": self.error_kind}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Reply:
        return cls(**record, cached=True)


class Teacher(ABC):
    """A backend. :meth:`stream` sends all requests of one call together (so the backend can keep its
    server or engine busy) and yields ``(index, reply)`` as answers arrive, in any order."""

    backend: str = ""

    @abstractmethod
    def stream(self, requests: Sequence[Request], journal: Journal | None = None) -> Iterator[tuple[int, Reply]]:
        """Answer every request; yield each one's index and reply exactly once. ``journal`` keeps small
        notes across runs (the batch API records its batch there, so a rerun resumes it)."""

    def count_tokens(self, messages: Sequence[dict[str, Any]]) -> int | None:
        """Prompt tokens of ``messages`` by the teacher's own tokenizer, None when it is not local."""
        return None

    def close(self) -> None:
        """Release connections, engines and threads."""


class Journal(Protocol):
    """Small persistent notes of one shard (the teacher cache implements it)."""

    def get_note(self, key: str) -> str | None: ...

    def put_note(self, key: str, value: str | None) -> None: ...


def digest(obj: Any) -> str:
    """A stable sha256 of a JSON-able value (sorted keys)."""
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()


def is_context_error(status: int | None, message: str) -> bool:
    """True when a server's refusal says the prompt is longer than the model's context."""
    m = message.lower()
    return (status in (400, 413, 422, None) and
            any(s in m for s in ("maximum context length", "context length", "context_length_exceeded",
                                 "too many tokens", "prompt is too long", "exceeds the model",
                                 "longer than the maximum", "max_model_len", "input is too long",
                                 # vLLM when the prompt fills the whole context: no room left to answer
                                 "max_tokens must be at least 1")))

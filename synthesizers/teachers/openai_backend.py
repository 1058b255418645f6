"""``backend: openai`` — any OpenAI-compatible chat server (vLLM serve, SGLang, TGI, llama.cpp, OpenAI).

Requests go through the official ``openai`` client (``AsyncOpenAI``, its own retries off) on one event
loop in a background thread that lives as long as the backend, so connections are reused across
batches. Per request:

- at most :class:`~synthesizers.teachers.limiter.AdaptiveLimiter` ``limit`` requests are in flight;
- 408/409/429/5xx, timeouts, dropped connections and malformed or empty answers are retried up to
  ``max_retries`` times (an answer still empty after that is an empty answer — the task counts it
  unusable — not a failed request), after ``uniform(0, min(max_backoff_s, backoff_s × 2^k))`` seconds ("full
  jitter") or the server's ``Retry-After`` when that is longer; 429/503 and timeouts also tell the
  limiter to back off;
- a refusal saying the prompt exceeds the model's context is ``context_length`` (never retried);
  any other 4xx is ``fatal``;
- a JSON schema is sent as ``response_format: {type: json_schema}`` (when ``guided_json``);
- images travel inside the messages as ``data:`` URLs (the caller builds them);
- with ``batch_api``, a call's requests go through the provider's Batch API instead
  (:mod:`synthesizers.teachers.openai_batch`).

The API key is read from the spec (a ``${VAR}`` secret) or ``OPENAI_API_KEY``, sent in a header and
never logged: error texts kept in replies and failure records go through :func:`curate.secrets.redact`.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from curate.errors import ConfigError, MissingDependency
from curate.secrets import redact
from synthesizers.teachers.base import Journal, Reply, Request, Teacher, is_context_error
from synthesizers.teachers.limiter import AdaptiveLimiter
from synthesizers.teachers.spec import TeacherSpec

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_CONGESTION_STATUS = {429, 503}


class _Malformed(Exception):
    """The server answered 200 but the answer cannot be used (no choices)."""


class _Empty(Exception):
    """The server answered 200 with empty content."""


class OpenAITeacher(Teacher):
    """The ``openai`` backend (see the module docstring)."""

    backend = "openai"

    def __init__(self, spec: TeacherSpec, *, rng_seed: int = 0):
        try:
            import openai
        except ImportError:
            raise MissingDependency("openai", "llm") from None
        self.spec = spec
        self._openai = openai
        self._rng = random.Random(rng_seed)
        self.limiter = AdaptiveLimiter(spec.max_concurrency, spec.min_concurrency, adaptive=spec.adaptive)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="curate-teacher", daemon=True)
        self._thread.start()
        self._client = self._call(self._make_client())
        self._counter = None
        self._sync = None  # a synchronous client, for the Batch API

    # ------------------------------------------------------------------ plumbing
    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_client(self):
        api_key = self.spec.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        base_url = self.spec.base_url or os.environ.get("OPENAI_BASE_URL")
        http = self._openai.DefaultAsyncHttpxClient(
            limits=__import__("httpx").Limits(max_connections=self.spec.max_concurrency + 8,
                                              max_keepalive_connections=self.spec.max_concurrency + 8))
        return self._openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0,
                                        timeout=self.spec.timeout_s, http_client=http)

    def count_tokens(self, messages: Sequence[dict[str, Any]]) -> int | None:
        if self.spec.tokenizer is None:
            return None
        if self._counter is None:
            from synthesizers.teachers.local_tokens import ChatTokenCounter

            self._counter = ChatTokenCounter(self.spec.tokenizer)
        return self._counter.count(messages)

    def stream(self, requests: Sequence[Request], journal: Journal | None = None) -> Iterator[tuple[int, Reply]]:
        if self.spec.batch_api:
            yield from self._batch(requests, journal)
            return
        out: queue.Queue = queue.Queue()

        async def run_all() -> None:
            async def one(i: int, req: Request) -> None:
                try:
                    reply = await self._ask(req)
                except Exception as e:  # noqa: BLE001 - a bug must not hang the caller: report it as fatal
                    reply = Reply(error=f"{type(e).__name__}: {redact(str(e))}", error_kind="fatal")
                out.put((i, reply))

            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

        future = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
        try:
            for _ in range(len(requests)):
                yield out.get()
            future.result()
        finally:
            if not future.done():
                future.cancel()

    def _batch(self, requests: Sequence[Request], journal: Journal | None) -> Iterator[tuple[int, Reply]]:
        """All requests through the provider's Batch API (:mod:`.openai_batch`)."""
        import logging

        from synthesizers.teachers.openai_batch import run_batch

        if self._sync is None:
            api_key = self.spec.api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            self._sync = self._openai.OpenAI(api_key=api_key, base_url=self.spec.base_url or
                                             os.environ.get("OPENAI_BASE_URL"), timeout=self.spec.timeout_s)
        bodies = []
        for req in requests:
            args = self._arguments(req)
            bodies.append(args)
        ids = [r.key or f"request-{i}" for i, r in enumerate(requests)]
        replies = run_batch(self._sync, bodies, ids, window=self.spec.batch_window, poll_s=self.spec.batch_poll_s,
                            journal=journal, log=logging.getLogger("curate"))
        yield from enumerate(replies)

    # ------------------------------------------------------------------ one request
    def _arguments(self, req: Request) -> dict[str, Any]:
        s = self.spec.sampling
        args: dict[str, Any] = {"model": self.spec.model, "messages": list(req.messages),
                                "temperature": s.temperature, "top_p": s.top_p,
                                "max_tokens": req.max_tokens or s.max_tokens}
        if s.stop:
            args["stop"] = list(s.stop)
        if req.seed is not None:
            args["seed"] = req.seed
        if req.schema is not None and self.spec.guided_json:
            args["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": req.schema, "strict": True}}
        return args

    async def _ask(self, req: Request) -> Reply:
        openai = self._openai
        args = self._arguments(req)
        reasons: list[str] = []
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            start = await self.limiter.acquire()
            try:
                resp = await self._client.chat.completions.create(**args)
                text, finish = _content(resp)
                latency = time.monotonic() - start
                self.limiter.success(latency, start)
                usage = getattr(resp, "usage", None)
                return Reply(text=text, finish_reason=finish, latency_s=latency, attempts=attempt,
                             prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                             completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                             retry_reasons=reasons)
            except openai.APIStatusError as e:
                status = e.status_code
                message = redact(_message(e))
                if is_context_error(status, message):
                    return Reply(error=f"HTTP {status}: {message}", error_kind="context_length",
                                 attempts=attempt, retry_reasons=reasons)
                if status not in _RETRY_STATUS:
                    return Reply(error=f"HTTP {status}: {message}", error_kind="fatal", attempts=attempt,
                                 retry_reasons=reasons)
                if status in _CONGESTION_STATUS:
                    self.limiter.congestion(start)
                retry_after = _retry_after(e.response.headers if e.response is not None else {})
                reason, detail = f"http_{status}", f"HTTP {status}: {message}"
            except openai.APITimeoutError:
                self.limiter.congestion(start)
                reason, detail = "timeout", f"no answer within {self.spec.timeout_s:g} s"
            except openai.APIConnectionError as e:
                reason, detail = "connection", f"connection failed: {redact(str(e.__cause__ or e))}"
            except _Empty:
                reason, detail = "empty", "empty completion"
            except (_Malformed, openai.APIResponseValidationError, ValueError, AttributeError,
                    TypeError, KeyError, IndexError) as e:
                reason, detail = "malformed", f"malformed answer: {redact(str(e))[:500]}"
            finally:
                self.limiter.release()
            reasons.append(reason)
            if attempt > self.spec.max_retries:
                if reason == "empty":  # the model answers nothing to this prompt: an (unusable) answer
                    return Reply(text="", attempts=attempt, retry_reasons=reasons[:-1])
                return Reply(error=f"{detail} (after {attempt} attempts)", error_kind="transient",
                             attempts=attempt, retry_reasons=reasons)
            cap = min(self.spec.max_backoff_s, self.spec.backoff_s * 2 ** (attempt - 1))
            delay = self._rng.uniform(0, cap)
            if retry_after is not None:
                delay = max(delay, retry_after)
            await asyncio.sleep(delay)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()


def _content(resp: Any) -> tuple[str, str | None]:
    """The answer text of a chat completion; raises :class:`_Malformed` when there is none."""
    if isinstance(resp, (str, bytes)) or not getattr(resp, "choices", None):
        raise _Malformed("the answer has no choices")
    choice = resp.choices[0]
    text = getattr(getattr(choice, "message", None), "content", None)
    if text is None or (isinstance(text, str) and not text.strip()):
        raise _Empty()
    if not isinstance(text, str):
        raise _Malformed(f"the answer's content is {type(text).__name__}, not text")
    return text, getattr(choice, "finish_reason", None)


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if isinstance(inner.get("message"), str):
            return inner["message"]
    return str(getattr(e, "message", None) or e)


def _retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` (or ``retry-after-ms``) header; None when absent or a date."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(float(ms) / 1000, 0.0)
        value = headers.get("retry-after")
        return max(float(value), 0.0) if value is not None else None
    except (TypeError, ValueError):
        return None


def check_spec(spec: TeacherSpec) -> None:
    """Refuse what can never work before anything is sent."""
    if spec.base_url is not None and not spec.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"teacher.base_url: {spec.base_url!r} is not an http(s) URL")

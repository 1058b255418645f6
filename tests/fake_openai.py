"""A scripted, loopback OpenAI-compatible chat server for tests and benchmarks of LLM clients.

In-process (a background thread running its own asyncio loop)::

    with FakeOpenAI(latency=0.01, script=fail_first(2)) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
        ...
        assert fake.requests_per_key[key_of("hello")] == 3

As a subprocess (own interpreter, so the server never shares the GIL with the client)::

    with FakeOpenAI(subprocess=True, latency=0.05, capacity=64) as fake:   # same API; stats over HTTP
        ...
    python -m tests.fake_openai --port 8011 --latency 0.05 --capacity 64 --capacity-mode queue

The HTTP/1.1 server is a small hand-written asyncio one (keep-alive, Content-Length and chunked request
bodies, no pipelining needed); a hanging or delayed request watches its socket, so a client that times
out and closes the connection frees the request at once. Endpoints: ``POST /v1/chat/completions``
(non-streaming), ``GET /v1/models``, the Files and Batch APIs below, and for the harness
``GET /_fake/stats`` and ``POST /_fake/reset``.

Files and batches (as the official ``openai`` client calls them; both modes, state kept until the server
stops, the api_key checked like chat):

    POST /v1/files (multipart: file, purpose)   GET /v1/files[?purpose=]   GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content (raw bytes)      POST /v1/batches           GET /v1/batches (cursor page)
    GET /v1/batches/{id}                        POST /v1/batches/{id}/cancel (409 once it has ended)

A batch (endpoint ``/v1/chat/completions`` only, completion_window ``24h``) is ``validating`` for
``batch_delay``/2 seconds; then its input lines (``{"custom_id", "method": "POST", "url", "body"}``) are
checked as OpenAI does (bad JSON, missing fields, another url, duplicate custom_id, empty file: the batch
ends ``failed`` with ``errors``; so does every batch while ``batch_fail`` is set); then it is
``in_progress``: every line is answered at once, in order, through the chat path (same counters, script
n/key/attempt, responder, default answers), and after ``batch_delay``/2 more plus the longest line delay
(``latency`` + script ``delay X``, not slept per line) it is ``completed``. Answers with status < 400 go to
the output file as ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``
(a ``malformed`` body is kept as a string); status >= 400 (script ``status``, ``context_length``, 401,
capacity 429, a raising responder's 500) goes to the error file with the body in OpenAI's
``{"error": {...}}`` shape; ``hang`` and ``disconnect`` become status-500 error lines (counted under
by_status "hang"/"disconnect"). ``output_file_id``/``error_file_id`` are null when empty; request_counts
and usage are filled. A cancel makes it ``cancelling`` and soon ``cancelled``, keeping what was answered.

Script actions (strings; ``None`` means ``"ok"``):

    ok                      normal answer (responder or the default deterministic answer)
    status CODE [RA]        HTTP CODE with an OpenAI-style error body; for 429 a ``Retry-After`` header
                            (RA seconds, default the server's ``retry_after``). A bare int 500 works too.
    hang                    never answer; ends when the client closes the connection (or the server stops)
    delay X [ACTION]        sleep X seconds (on top of ``latency``), then ACTION (default ok)
    malformed               HTTP 200, ``application/json``, body that is not valid JSON
    empty                   HTTP 200, valid completion whose content is ""
    bad_json_content        HTTP 200, valid completion whose content is not valid JSON
    length                  HTTP 200, truncated content with finish_reason "length"
    context_length          HTTP 400 with vLLM's body for a prompt longer than the context
    disconnect              close the connection without any response
    {dict}                  full control, as a responder dict (see below)

``script=`` forms (n = global 0-based request number, attempt = 0-based count of earlier requests with
the same key, key = sha256 hex of the last user message's text, see ``key_of``):

    None                               everything ok
    [a0, a1, ...]                      action by n (past the end: ok)
    {n: action, key: action_or_list, "*": action_or_list}
                                       an int key matches n first; then the request's key, else "*";
                                       a list is indexed by attempt (past the end: ok), a single action
                                       applies to every attempt.
                                       ``fail_first(2)`` == {"*": ["status 500"] * 2}
    callable(n, key, attempt, request_json) -> action | None   (may return an awaitable; in-process only)

``responder(request_json) -> str | dict | None`` (sync or async) makes the content of ok answers; a dict is
full control: ``{"status": 200, "headers": {}, "delay": 0.0, "body": dict|str|bytes}`` (body sent as is),
or without "body": ``{"content": str|obj, "finish_reason": "stop"}`` wrapped in a completion, or a status
>= 400 alone for the standard error body, or ``{"action": "<script action>"}``.

Counters (``stats()`` snapshot, or the properties of the same names): total_requests, requests_per_key
{key: n}, inflight, max_inflight, by_status {200: n, 429: n, "hang": n, "disconnect": n,
"client_closed": n}, events [(key, status)], last_authorization, last_request, requests (only with
record_requests=True), batches_created, batch_requests (batch lines answered; they also count in
total_requests, requests_per_key, by_status and events). ``reset_counters()`` zeroes them (stored files
and batches stay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import subprocess as _subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

try:  # orjson is a core dependency of the project; keep a fallback so the file stands alone
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def _loads(data: bytes | str) -> Any:
        return orjson.loads(data)
except ImportError:  # pragma: no cover
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def _loads(data: bytes | str) -> Any:
        return json.loads(data)


__all__ = ["FakeOpenAI", "fail_first", "key_of", "message_text"]

_HANG = "hang"
_DISCONNECT = "disconnect"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


# ----------------------------------------------------------------------------------------------- helpers

def message_text(content: Any) -> str:
    """The text of one message's ``content`` (a string, or a list of parts whose text parts are joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return json.dumps(content, sort_keys=True)


def _last_user_text(req: dict) -> str:
    msgs = req.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "user":
                return message_text(m.get("content"))
    return ""


def key_of(text: str) -> str:
    """The script/counter key of a request: sha256 hex of its last user message's text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fail_first(k: int, action: Any = "status 500") -> dict:
    """Script: the first ``k`` attempts of every key get ``action``, later attempts are ok."""
    return {"*": [action] * k}


def _ntokens(text: str) -> int:
    """A deterministic token estimate: 4 characters a token."""
    return (len(text) + 3) // 4


def _prompt_tokens(req: dict) -> int:
    msgs = req.get("messages")
    if not isinstance(msgs, list):
        return 0
    return sum(4 + _ntokens(message_text(m.get("content") if isinstance(m, dict) else m)) for m in msgs)


def _error_body(status: int, message: str | None = None) -> dict:
    if status == 429:
        return {"error": {"message": message or "Rate limit reached for requests. Please try again later.",
                          "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    if status == 401:
        return {"error": {"message": message or "Incorrect API key provided.",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    kind = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
            503: "ServiceUnavailableError"}.get(status, "APIError")
    # vLLM's OpenAI server error shape.
    return {"object": "error", "message": message or _REASONS.get(status, "error"), "type": kind,
            "param": None, "code": status}


_API_PATH = re.compile(r"/(files|batches)(?:/([^/]+)(?:/(content|cancel))?)?/?$")


def _oai_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body (the Files and Batch endpoints and batch error lines use it)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _as_oai_error(status: int, body: Any) -> dict:
    """A failed batch line's body in OpenAI's ``{"error": {...}}`` shape (vLLM-shaped bodies converted)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body
    if isinstance(body, dict) and "message" in body:
        return {"error": {"message": body.get("message"), "type": body.get("type") or "server_error",
                          "param": body.get("param"), "code": body.get("code")}}
    return _oai_error(str(body) if body else _REASONS.get(status, "error"), "server_error")


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename or None, bytes)} of a multipart/form-data body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if "multipart/form-data" not in content_type.lower() or m is None:
        raise ValueError("expected multipart/form-data with a boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(delim)[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        disp = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-disposition":
                disp = v
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', disp)
        fname = re.search(r'(?:^|;)\s*filename="([^"]*)"', disp)
        if name:
            out[name.group(1)] = (urllib.parse.unquote(fname.group(1)) if fname else None, data)
    return out


def _page(items: list[dict], query: dict, default_limit: int, max_limit: int = 10000) -> dict:
    """A cursor page, newest first: ``after`` (an id) and ``limit`` as OpenAI takes them."""
    items = list(reversed(items))
    after = query.get("after")
    if after:
        ids = [o["id"] for o in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    try:
        limit = min(max(int(query.get("limit", default_limit)), 1), max_limit)
    except ValueError:
        limit = default_limit
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


# ----------------------------------------------------------------------------------------- JSON schemas

def _schema_of(req: dict) -> tuple[str | None, Any]:
    """('json_schema', schema) | ('json_object', None) | (None, None) for the request's JSON mode."""
    rf = req.get("response_format")
    if isinstance(rf, dict):
        if rf.get("type") == "json_schema":
            js = rf.get("json_schema") or {}
            schema = js.get("schema", js.get("schema_")) if isinstance(js, dict) else None
            return "json_schema", schema if isinstance(schema, dict) else {}
        if rf.get("type") == "json_object":
            return "json_object", None
    if isinstance(req.get("guided_json"), (dict, str)):  # vLLM extra_body
        g = req["guided_json"]
        return "json_schema", _loads(g) if isinstance(g, str) else g
    so = req.get("structured_outputs")
    if isinstance(so, dict) and isinstance(so.get("json"), (dict, str)):
        g = so["json"]
        return "json_schema", _loads(g) if isinstance(g, str) else g
    return None, None


def _hnum(seed: str, path: str) -> int:
    return int.from_bytes(hashlib.sha256((seed + "|" + path).encode()).digest()[:8], "big")


def _fill(schema: Any, root: dict, seed: str, path: str, depth: int = 0) -> Any:
    """A value satisfying a simple JSON schema, derived deterministically from ``seed``."""
    if not isinstance(schema, dict) or depth > 12:
        return None
    if "$ref" in schema:
        ref = schema["$ref"]
        node: Any = root
        if isinstance(ref, str) and ref.startswith("#"):
            for part in [p for p in ref[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                node = node.get(part, {}) if isinstance(node, dict) else {}
            return _fill(node, root, seed, path, depth + 1)
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        opts = schema["enum"]
        return opts[_hnum(seed, path) % len(opts)]
    for comb in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(comb), list) and schema[comb]:
            opts = schema[comb]
            pick = next((o for o in opts if not (isinstance(o, dict) and o.get("type") == "null")), opts[0])
            return _fill(pick, root, seed, path, depth + 1)
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if typ is None:
        typ = "object" if "properties" in schema else ("array" if "items" in schema else "string")
    h = _hnum(seed, path)
    if typ == "object":
        props = schema.get("properties") or {}
        return {name: _fill(sub, root, seed, f"{path}.{name}", depth + 1) for name, sub in props.items()}
    if typ == "array":
        lo = int(schema.get("minItems", 0) or 0)
        hi = schema.get("maxItems")
        n = max(lo, 2)
        if hi is not None:
            n = min(n, int(hi))
        items = schema.get("items")
        if isinstance(schema.get("prefixItems"), list):
            return [_fill(sub, root, seed, f"{path}[{i}]", depth + 1)
                    for i, sub in enumerate(schema["prefixItems"])]
        return [_fill(items if isinstance(items, dict) else {"type": "string"}, root, seed, f"{path}[{i}]",
                      depth + 1) for i in range(n)]
    if typ in ("integer", "number"):
        lo_i = hi_i = None
        if isinstance(schema.get("minimum"), (int, float)):
            lo_i = math.ceil(schema["minimum"])
        elif isinstance(schema.get("exclusiveMinimum"), (int, float)):
            lo_i = math.floor(schema["exclusiveMinimum"]) + 1
        if isinstance(schema.get("maximum"), (int, float)):
            hi_i = math.floor(schema["maximum"])
        elif isinstance(schema.get("exclusiveMaximum"), (int, float)):
            hi_i = math.ceil(schema["exclusiveMaximum"]) - 1
        if lo_i is None:
            lo_i = 0 if hi_i is None or hi_i >= 0 else hi_i - 9
        if hi_i is None:
            val = lo_i + 1 + h % 9
        elif hi_i >= lo_i:
            val = lo_i + h % (hi_i - lo_i + 1)
        else:  # no integer in range (a narrow float range): take its middle
            lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
            hi = schema.get("maximum", schema.get("exclusiveMaximum", lo))
            return (lo + hi) / 2
        return float(val) if typ == "number" else val
    if typ == "boolean":
        return bool(h & 1)
    if typ == "null":
        return None
    # string
    fmt = schema.get("format")
    if fmt == "date-time":
        return f"2024-01-{1 + h % 28:02d}T00:00:00Z"
    if fmt == "date":
        return f"2024-01-{1 + h % 28:02d}"
    if fmt == "email":
        return f"user{h % 1000}@example.com"
    if fmt in ("uri", "url"):
        return f"https://example.com/{h % 65536:x}"
    if fmt == "uuid":
        hx = hashlib.sha256(f"{seed}|{path}".encode()).hexdigest()
        return f"{hx[:8]}-{hx[8:12]}-4{hx[13:16]}-a{hx[17:20]}-{hx[20:32]}"
    label = path.rsplit(".", 1)[-1].split("[", 1)[0] or "text"
    s = f"{label} {seed[:8]}" if "[" not in path.rsplit(".", 1)[-1] else f"{label} {seed[:6]}{h % 100:02d}"
    mx = schema.get("maxLength")
    mn = schema.get("minLength")
    if mn is not None and len(s) < int(mn):
        s = s + "x" * (int(mn) - len(s))
    if mx is not None:
        s = s[: int(mx)]
    return s


def default_content(req: dict) -> str:
    """The default deterministic answer to a request (a JSON document when JSON output was asked)."""
    text = _last_user_text(req)
    mode, schema = _schema_of(req)
    if mode == "json_schema":
        seed = key_of(text)
        return json.dumps(_fill(schema, schema, seed, ""), ensure_ascii=False)
    if mode == "json_object":
        return json.dumps({"answer": "answer: " + text[:40]}, ensure_ascii=False)
    return "answer: " + text[:40]


# --------------------------------------------------------------------------------------------- server

class _Resp:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: Any, headers: dict | None = None):
        self.status = status
        self.headers = headers or {}
        if isinstance(body, (bytes, bytearray)):
            self.body = bytes(body)
        elif isinstance(body, str):
            self.body = body.encode()
        else:
            self.body = _dumps(body)


class _Server:
    """The asyncio server and its counters. Runs on one event loop; counters are guarded by a lock."""

    def __init__(self, *, responder=None, script=None, latency=0.0, capacity=None, capacity_mode="reject",
                 capacity_retry_after=0, retry_after=1, api_key=None, model="fake-model", max_context=None,
                 context_window=512, record_requests=False, batch_delay=0.2, batch_fail=False):
        if capacity_mode not in ("reject", "429", "queue"):
            raise ValueError("capacity_mode must be 'reject' (alias '429') or 'queue'")
        self.responder = responder
        self.script = script
        self.latency = float(latency or 0.0)
        self.capacity = int(capacity) if capacity else None
        self.capacity_mode = "reject" if capacity_mode == "429" else capacity_mode
        self.capacity_retry_after = capacity_retry_after
        self.retry_after = retry_after
        self.api_key = api_key
        self.model = model
        self.max_context = max_context
        self.context_window = max_context or context_window
        self.record_requests = record_requests
        self.batch_delay = float(batch_delay or 0.0)
        self.batch_fail = bool(batch_fail)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._obj_ids = itertools.count(1)
        self._conns: set[asyncio.Task] = set()
        # Files and batches live on the server's event loop (only its handlers and batch tasks touch them).
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._batch_cancel: dict[str, asyncio.Event] = {}
        self._batch_tasks: set[asyncio.Task] = set()
        self._reset_locked()

    # -- counters
    def _reset_locked(self):
        self.total = 0
        self.per_key: Counter = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self.by_status: Counter = Counter()
        self.events: list = []
        self.requests: list = []
        self.last_authorization: str | None = None
        self.last_request: dict | None = None
        self.batches_created = 0
        self.batch_requests = 0

    def reset(self):
        with self._lock:
            inflight = self.inflight
            self._reset_locked()
            self.inflight = inflight
            self.max_inflight = inflight

    def stats(self) -> dict:
        with self._lock:
            return {"total_requests": self.total, "requests_per_key": dict(self.per_key),
                    "inflight": self.inflight, "max_inflight": self.max_inflight,
                    "by_status": dict(self.by_status), "events": list(self.events),
                    "last_authorization": self.last_authorization, "last_request": self.last_request,
                    "requests": list(self.requests), "batches_created": self.batches_created,
                    "batch_requests": self.batch_requests}

    def _record(self, key, outcome):
        with self._lock:
            self.by_status[outcome] += 1
            self.events.append((key, outcome))

    def _done(self):
        with self._lock:
            self.inflight -= 1

    # -- script
    def _action(self, n: int, key: str, attempt: int, req: dict) -> Any:
        s = self.script
        if s is None:
            return None
        if callable(s):
            return s(n, key, attempt, req)
        if isinstance(s, (list, tuple)):
            return s[n] if n < len(s) else None
        if isinstance(s, dict):
            if n in s:
                return s[n]
            entry = s[key] if key in s else s.get("*")
            if isinstance(entry, (list, tuple)):
                return entry[attempt] if attempt < len(entry) else None
            return entry
        raise TypeError(f"script must be a dict, list or callable, not {type(s).__name__}")

    # -- one chat request: returns (delay_seconds, response | _HANG | _DISCONNECT, key)
    async def chat(self, headers: dict, body: bytes):
        auth = headers.get("authorization")
        try:
            req = _loads(body) if body else {}
        except ValueError:
            req = None
        if not isinstance(req, dict):
            req = None
        text = _last_user_text(req) if req else ""
        key = key_of(text)
        with self._lock:
            n = self.total
            self.total += 1
            attempt = self.per_key[key]
            self.per_key[key] += 1
            self.inflight += 1
            inflight = self.inflight
            self.max_inflight = max(self.max_inflight, inflight)
            self.last_authorization = auth
            self.last_request = req
            if self.record_requests:
                self.requests.append(req)
        if req is None:
            return 0.0, _Resp(400, _error_body(400, "Request body is not a valid JSON object.")), key
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return 0.0, _Resp(401, _error_body(401)), key
        if self.capacity and inflight > self.capacity and self.capacity_mode == "reject":
            return 0.0, self._status(429, self.capacity_retry_after), key
        delay = self.latency
        if self.capacity and self.capacity_mode == "queue":
            delay = self.latency * math.ceil(inflight / self.capacity)
        try:
            action = self._action(n, key, attempt, req)
            if inspect.isawaitable(action):
                action = await action
            extra, out = await self._perform(action, req, text)
        except Exception as exc:  # noqa: BLE001 - a broken responder or script: answer 500, say why
            return 0.0, _Resp(500, _error_body(500, f"fake server error: {exc!r}")), key
        return delay + extra, out, key

    def _status(self, code: int, retry_after=None) -> _Resp:
        hdrs = {}
        if code == 429 or retry_after is not None:
            ra = self.retry_after if retry_after is None else retry_after
            ra = float(ra)
            hdrs["Retry-After"] = str(int(ra)) if ra == int(ra) else repr(ra)
        return _Resp(code, _error_body(code), hdrs)

    def _completion(self, req: dict, content: str, finish_reason: str = "stop", status: int = 200,
                    headers: dict | None = None) -> _Resp:
        pt = _prompt_tokens(req)
        ct = _ntokens(content)
        n = req.get("n") if isinstance(req.get("n"), int) and req.get("n", 1) > 0 else 1
        body = {
            "id": f"chatcmpl-fake{next(self._ids):08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model") or self.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish_reason} for i in range(n)],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct * n, "total_tokens": pt + ct * n},
        }
        return _Resp(status, body, headers)

    def _context_error(self, req: dict, forced: bool) -> _Resp | None:
        ctx = self.context_window
        prompt = _prompt_tokens(req)
        comp = req.get("max_completion_tokens") or req.get("max_tokens") or 0
        if not isinstance(comp, int):
            comp = 0
        if prompt + comp <= ctx:
            if not forced:
                return None
            prompt = max(prompt, ctx + 1 + ctx // 2 - comp)
        msg = (f"This model's maximum context length is {ctx} tokens. However, you requested "
               f"{prompt + comp} tokens ({prompt} in the messages, {comp} in the completion). "
               f"Please reduce the length of the messages or completion.")
        return _Resp(400, _error_body(400, msg))

    async def _perform(self, action: Any, req: dict, text: str) -> tuple[float, Any]:
        if action is None or action == "ok":
            return await self._ok(req)
        if isinstance(action, bool):
            raise TypeError("script action must be a string, int or dict")
        if isinstance(action, int):
            return 0.0, self._status(action)
        if isinstance(action, dict):
            return await self._from_dict(action, req)
        if not isinstance(action, str):
            raise TypeError(f"bad script action {action!r}")
        word, _, rest = action.strip().partition(" ")
        rest = rest.strip()
        if word == "delay":
            secs, _, then = rest.partition(" ")
            extra, out = await self._perform(then.strip() or None, req, text)
            return float(secs) + extra, out
        if word == "status" or word.isdigit():
            parts = (rest if word == "status" else word + " " + rest).split()
            code = int(parts[0])
            return 0.0, self._status(code, float(parts[1]) if len(parts) > 1 else None)
        if word == "hang":
            return 0.0, _HANG
        if word == "disconnect":
            return 0.0, _DISCONNECT
        if word == "malformed":
            return 0.0, _Resp(200, b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [')
        if word == "empty":
            return 0.0, self._completion(req, "")
        if word == "bad_json_content":
            return 0.0, self._completion(req, '{"answer": "unterminated, not json')
        if word == "length":
            full = default_content(req)
            return 0.0, self._completion(req, full[: max(1, len(full) // 2)], "length")
        if word == "context_length":
            return 0.0, self._context_error(req, forced=True)
        raise ValueError(f"unknown script action {action!r}")

    async def _ok(self, req: dict) -> tuple[float, Any]:
        if self.max_context:
            err = self._context_error(req, forced=False)
            if err is not None:
                return 0.0, err
        if self.responder is None:
            return 0.0, self._completion(req, default_content(req))
        out = self.responder(req)
        if inspect.isawaitable(out):
            out = await out
        if isinstance(out, dict):
            return await self._from_dict(out, req)
        if out is None:
            out = default_content(req)
        return 0.0, self._completion(req, str(out))

    async def _from_dict(self, d: dict, req: dict) -> tuple[float, Any]:
        delay = float(d.get("delay", 0.0) or 0.0)
        if d.get("action") is not None:
            extra, out = await self._perform(d["action"], req, "")
            return delay + extra, out
        status = int(d.get("status", 200))
        headers = dict(d.get("headers") or {})
        if "body" in d:
            return delay, _Resp(status, d["body"], headers)
        if status >= 400 and "content" not in d:
            r = self._status(status, d.get("retry_after"))
            r.headers.update(headers)
            return delay, r
        content = d.get("content")
        if content is None:
            content = default_content(req)
        elif not isinstance(content, str):
            content = json.dumps(content)
        return delay, self._completion(req, content, d.get("finish_reason", "stop"), status, headers)

    # -- files and batches (OpenAI Files + Batch APIs; state lives on the server loop)
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._obj_ids):08d}"

    def _store_file(self, filename: str, purpose: str, data: bytes) -> dict:
        meta = {"id": self._new_id("file-fake"), "object": "file", "bytes": len(data),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                "status": "processed", "expires_at": None, "status_details": None}
        self.files[meta["id"]] = {"meta": meta, "data": data}
        return meta

    def _authorized(self, headers: dict) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Bearer {self.api_key}"

    async def serve_api(self, method: str, target: str, headers: dict, body: bytes):
        """Files and batches: (status, body, content_type), or None when the path is not theirs."""
        path, _, qs = target.partition("?")
        m = _API_PATH.search(path)
        if m is None:
            return None
        if not self._authorized(headers):
            return 401, _error_body(401), "application/json"
        kind, oid, sub = m.group(1), m.group(2), m.group(3)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(qs).items()}
        route = (kind, method, oid is not None, sub)
        if kind == "files":
            if route == ("files", "POST", False, None):
                return self._file_upload(headers, body)
            if route == ("files", "GET", False, None):
                items = [f["meta"] for f in self.files.values()
                         if "purpose" not in query or f["meta"]["purpose"] == query["purpose"]]
                return 200, _page(items, query, 10000), "application/json"
            f = self.files.get(oid or "")
            if oid is not None and f is None:
                return 404, _oai_error(f"No such File object: {oid}", "invalid_request_error", "id"), \
                    "application/json"
            if route == ("files", "GET", True, None):
                return 200, f["meta"], "application/json"
            if route == ("files", "GET", True, "content"):
                return 200, f["data"], "application/octet-stream"
            if route == ("files", "DELETE", True, None):
                del self.files[oid]
                return 200, {"id": oid, "object": "file", "deleted": True}, "application/json"
        else:
            if route == ("batches", "POST", False, None):
                return self._batch_create(headers, body)
            if route == ("batches", "GET", False, None):
                return 200, _page(list(self.batches.values()), query, 20, 100), "application/json"
            b = self.batches.get(oid or "")
            if oid is not None and b is None:
                return 404, _oai_error(f"No batch found with id '{oid}'.", "invalid_request_error", "id"), \
                    "application/json"
            if route == ("batches", "GET", True, None):
                return 200, b, "application/json"
            if route == ("batches", "POST", True, "cancel"):
                if b["status"] in ("validating", "in_progress", "finalizing"):
                    b["status"] = "cancelling"
                    b["cancelling_at"] = int(time.time())
                    self._batch_cancel[oid].set()
                elif b["status"] != "cancelling":
                    return 409, _oai_error(f"Cannot cancel a batch with status '{b['status']}'.",
                                           "invalid_request_error"), "application/json"
                return 200, b, "application/json"
        return 405, _oai_error(f"no route {method} {path}", "invalid_request_error"), "application/json"

    def _file_upload(self, headers: dict, body: bytes):
        try:
            parts = _parse_multipart(headers.get("content-type", ""), body)
        except ValueError as exc:
            return 400, _oai_error(f"Invalid multipart body: {exc}", "invalid_request_error"), "application/json"
        purpose = parts.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if "file" not in parts or not purpose:
            missing = "file" if "file" not in parts else "purpose"
            return 400, _oai_error(f"Missing required parameter: '{missing}'.", "invalid_request_error",
                                   missing, "missing_required_parameter"), "application/json"
        filename, data = parts["file"]
        return 200, self._store_file(filename or "upload", purpose, data), "application/json"

    def _batch_create(self, headers: dict, body: bytes):
        try:
            req = _loads(body) if body else None
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return 400, _oai_error("Request body is not a valid JSON object.", "invalid_request_error"), \
                "application/json"
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not req.get(name):
                return 400, _oai_error(f"Missing required parameter: '{name}'.", "invalid_request_error",
                                       name, "missing_required_parameter"), "application/json"
        if not str(req["endpoint"]).endswith("/chat/completions"):
            return 400, _oai_error(f"The fake server batches only /v1/chat/completions, not {req['endpoint']!r}.",
                                   "invalid_request_error", "endpoint"), "application/json"
        if req["completion_window"] != "24h":
            return 400, _oai_error("completion_window must be '24h'.", "invalid_request_error",
                                   "completion_window"), "application/json"
        if req["input_file_id"] not in self.files:
            return 404, _oai_error(f"No such File object: {req['input_file_id']}", "invalid_request_error",
                                   "input_file_id"), "application/json"
        now = int(time.time())
        b = {"id": self._new_id("batch_fake"), "object": "batch", "endpoint": req["endpoint"],
             "model": None, "errors": None, "input_file_id": req["input_file_id"],
             "completion_window": "24h", "status": "validating", "output_file_id": None,
             "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
             "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
             "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "usage": None,
             "metadata": req.get("metadata")}
        self.batches[b["id"]] = b
        self._batch_cancel[b["id"]] = asyncio.Event()
        with self._lock:
            self.batches_created += 1
        task = asyncio.ensure_future(self._run_batch(b, headers.get("authorization")))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)
        return 200, b, "application/json"

    def _batch_lines(self, data: bytes, endpoint: str) -> tuple[list, list]:
        """The (custom_id, body) of each input line, or the validation errors OpenAI would report."""
        lines: list = []
        errors: list = []
        seen: set = set()

        def err(code, line, message, param=None):
            errors.append({"code": code, "line": line, "message": message, "param": param})

        for i, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = _loads(raw)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                err("invalid_json_line", i, "This line is not parseable as valid JSON.")
                continue
            missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
            if missing:
                err("missing_required_parameter", i, f"Missing required parameter: '{missing[0]}'.", missing[0])
                continue
            if str(obj["method"]).upper() != "POST":
                err("invalid_method", i, "The method must be 'POST'.", "method")
            elif obj["url"] != endpoint and not (str(obj["url"]).endswith("/chat/completions")
                                                  and endpoint.endswith("/chat/completions")):
                err("mismatched_endpoint", i, f"The url {obj['url']!r} does not match the batch endpoint "
                    f"{endpoint!r}.", "url")
            elif obj["custom_id"] in seen:
                err("duplicate_custom_id", i, "The custom_id for this request is a duplicate of another "
                    "request. The custom_id parameter must be unique for each request in a batch.", "custom_id")
            else:
                seen.add(obj["custom_id"])
                lines.append((obj["custom_id"], obj["body"]))
        if not lines and not errors:
            err("empty_file", None, "The batch input file is empty.")
        return lines, errors

    async def _batch_line(self, auth: str | None, custom_id: Any, body: Any) -> tuple[float, bool, dict]:
        """Answer one batch line through the chat path: (delay, ok, output-or-error line)."""
        with self._lock:
            self.batch_requests += 1
        delay, out, key = await self.chat({"authorization": auth} if auth else {}, _dumps(body))
        if out is _HANG or out is _DISCONNECT:
            outcome, status = ("hang" if out is _HANG else "disconnect"), 500
            rbody: Any = _oai_error("The fake server's answer to this request "
                                    + ("hung." if out is _HANG else "dropped the connection."), "server_error")
        else:
            outcome = status = out.status
            try:
                rbody = _loads(out.body)
            except ValueError:
                rbody = out.body.decode("utf-8", "replace")
        self._record(key, outcome)
        self._done()
        ok = status < 400
        if not ok:
            rbody = _as_oai_error(status, rbody)
        n = next(self._ids)
        entry = {"id": f"batch_req_fake{n:08d}", "custom_id": custom_id,
                 "response": {"status_code": status, "request_id": f"req_fake{n:08d}", "body": rbody},
                 "error": None}
        return delay, ok, entry

    async def _run_batch(self, b: dict, auth: str | None):
        """validating (batch_delay/2) -> in_progress (every line answered at once, then batch_delay/2 plus the
        longest line delay) -> completed; a cancel at any point ends it cancelled with what was answered."""
        cancel = self._batch_cancel[b["id"]]

        async def wait(seconds: float) -> bool:
            if seconds > 0 and not cancel.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(cancel.wait(), seconds)
            return cancel.is_set()

        half = self.batch_delay / 2
        oks: list = []
        errs: list = []
        usage = [0, 0]
        if not await wait(half):
            lines, errors = self._batch_lines(self.files[b["input_file_id"]]["data"], b["endpoint"])
            if self.batch_fail and not errors:
                errors = [{"code": "batch_failed", "line": None, "param": None,
                           "message": "The fake server failed this batch (batch_fail=True)."}]
            if errors:
                b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
                return
            first = lines[0][1]
            b.update(status="in_progress", in_progress_at=int(time.time()),
                     model=first.get("model") if isinstance(first, dict) else None)
            counts = b["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
            longest = 0.0
            for custom_id, body in lines:
                if cancel.is_set():
                    break
                delay, ok, entry = await self._batch_line(auth, custom_id, body)
                longest = max(longest, delay)
                (oks if ok else errs).append(entry)
                counts["completed" if ok else "failed"] += 1
                u = entry["response"]["body"].get("usage") if ok and isinstance(entry["response"]["body"], dict) \
                    else None
                if isinstance(u, dict):
                    usage[0] += int(u.get("prompt_tokens") or 0)
                    usage[1] += int(u.get("completion_tokens") or 0)
                await asyncio.sleep(0)
            await wait(half + longest)
        now = int(time.time())
        for entries, kind, field in ((oks, "output", "output_file_id"), (errs, "error", "error_file_id")):
            if entries:
                data = b"".join(_dumps(e) + b"\n" for e in entries)
                b[field] = self._store_file(f"{b['id']}_{kind}.jsonl", "batch_output", data)["id"]
        if oks or errs:
            b["usage"] = {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": usage[0] + usage[1]}
        if cancel.is_set():
            b.update(status="cancelled", cancelled_at=now)
        else:
            b.update(status="completed", finalizing_at=now, completed_at=now)

    # -- HTTP plumbing
    async def _read_request(self, reader: asyncio.StreamReader, buf: bytearray):
        while True:
            idx = buf.find(b"\r\n\r\n")
            if idx >= 0:
                break
            if len(buf) > 1 << 16:
                raise ValueError("header too large")
            data = await reader.read(1 << 16)
            if not data:
                return None
            buf += data
        head = bytes(buf[:idx]).decode("latin-1")
        del buf[: idx + 4]
        lines = head.split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return method, target, version, headers

    async def _read_body(self, reader, writer, buf: bytearray, headers: dict) -> bytes:
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                while b"\r\n" not in buf:
                    data = await reader.read(1 << 16)
                    if not data:
                        raise ConnectionError("eof in chunked body")
                    buf += data
                i = buf.find(b"\r\n")
                size = int(bytes(buf[:i]).split(b";")[0].strip() or b"0", 16)
                del buf[: i + 2]
                while len(buf) < size + 2:
                    data = await reader.read(1 << 16)
                    if not data:
                        raise ConnectionError("eof in chunked body")
                    buf += data
                if size == 0:
                    # skip trailers up to the blank line
                    while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                        data = await reader.read(1 << 16)
                        if not data:
                            break
                        buf += data
                    j = 0 if buf.startswith(b"\r\n") else buf.find(b"\r\n\r\n") + 2
                    del buf[: j + 2]
                    return bytes(out)
                out += buf[:size]
                del buf[: size + 2]
        n = int(headers.get("content-length", "0") or 0)
        while len(buf) < n:
            data = await reader.read(max(1 << 16, n - len(buf)))
            if not data:
                raise ConnectionError("eof in body")
            buf += data
        body = bytes(buf[:n])
        del buf[:n]
        return body

    async def _wait_watch(self, reader, buf: bytearray, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: forever) unless the client closes the connection; False if it did."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return True
            peer = asyncio.ensure_future(reader.read(1 << 16))
            try:
                await asyncio.wait({peer}, timeout=remaining)
            finally:
                if not peer.done():
                    peer.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await peer
            if peer.cancelled():
                return True
            exc = peer.exception()
            if exc is not None:
                return False
            data = peer.result()
            if not data:
                return False
            buf += data  # a pipelined request: keep it, go on waiting

    def _write(self, writer, status: int, body: bytes, headers: dict, keep_alive: bool,
               content_type: str = "application/json"):
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
                 f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                 "Connection: keep-alive" if keep_alive else "Connection: close"]
        for k, v in headers.items():
            lines.append(f"{k}: {v}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    async def handle_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._conns.add(task)
        buf = bytearray()
        try:
            while True:
                try:
                    head = await self._read_request(reader, buf)
                    if head is None:
                        return
                    method, target, version, headers = head
                    body = await self._read_body(reader, writer, buf, headers)
                except (ValueError, ConnectionError):
                    return
                conn_hdr = headers.get("connection", "").lower()
                keep_alive = (conn_hdr != "close") if version == "HTTP/1.1" else (conn_hdr == "keep-alive")
                path = target.split("?", 1)[0]
                if path.endswith("/chat/completions"):
                    if method != "POST":
                        self._write(writer, 405, _dumps(_error_body(405)), {}, keep_alive)
                    elif not await self._serve_chat(reader, writer, buf, headers, body, keep_alive):
                        return
                elif path.endswith("/models") and method == "GET":
                    auth = headers.get("authorization")
                    if self.api_key is not None and auth != f"Bearer {self.api_key}":
                        self._write(writer, 401, _dumps(_error_body(401)), {}, keep_alive)
                    else:
                        data = {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                            "owned_by": "fake", "max_model_len":
                                                                self.context_window}]}
                        self._write(writer, 200, _dumps(data), {}, keep_alive)
                elif (api := await self.serve_api(method, target, headers, body)) is not None:
                    status, payload, ctype = api
                    data = payload if isinstance(payload, bytes) else _dumps(payload)
                    self._write(writer, status, data, {}, keep_alive, ctype)
                elif path == "/_fake/stats":
                    self._write(writer, 200, json.dumps(self.stats()).encode(), {}, keep_alive)
                elif path == "/_fake/reset":
                    self.reset()
                    self._write(writer, 200, b"{}", {}, keep_alive)
                else:
                    err = _error_body(404, f"no route {method} {path}")
                    self._write(writer, 404, _dumps(err), {}, keep_alive)
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def _serve_chat(self, reader, writer, buf, headers, body, keep_alive) -> bool:
        """Serve one chat request; False when the connection must be dropped."""
        key = None
        recorded = False
        try:
            try:
                delay, out, key = await self.chat(headers, body)
            except Exception as exc:  # noqa: BLE001 - a broken responder or script: answer 500, say why
                delay, out = 0.0, _Resp(500, _error_body(500, f"fake server error: {exc!r}"))
            if out is _HANG:
                self._record(key, "hang")
                recorded = True
                await self._wait_watch(reader, buf, None)
                return False
            if delay > 0 and not await self._wait_watch(reader, buf, delay):
                self._record(key, "client_closed")
                recorded = True
                return False
            # Count before answering, so a client that just got its answer reads settled counters.
            self._record(key, "disconnect" if out is _DISCONNECT else out.status)
            recorded = True
            self._done()
            key = None
            if out is _DISCONNECT:
                return False
            self._write(writer, out.status, out.body, out.headers, keep_alive)
            return True
        finally:
            if key is not None:
                if not recorded:
                    self._record(key, "client_closed")
                self._done()

    async def close_all(self):
        for t in list(self._conns) + list(self._batch_tasks):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2)


# ------------------------------------------------------------------------------------------- front end

_SERIALIZABLE = ("script", "latency", "capacity", "capacity_mode", "capacity_retry_after", "retry_after",
                 "api_key", "model", "max_context", "context_window", "record_requests", "batch_delay",
                 "batch_fail")


def _script_from_json(script):
    if isinstance(script, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() and len(k) < 64 else k): v
                for k, v in script.items()}
    return script


def _fix_stats(d: dict) -> dict:
    d["events"] = [tuple(e) for e in d.get("events", [])]
    d["by_status"] = {(int(k) if isinstance(k, str) and k.isdigit() else k): v
                      for k, v in d.get("by_status", {}).items()}
    return d


class FakeOpenAI:
    """A scripted OpenAI-compatible chat server on 127.0.0.1; starts on construction.

    Use as a context manager, or call ``stop()``. See the module docstring for script actions.
    """

    def __init__(self, *, responder: Callable[[dict], Any] | None = None, script: Any = None,
                 latency: float = 0.0, capacity: int | None = None, capacity_mode: str = "reject",
                 capacity_retry_after: float = 0, retry_after: float = 1, api_key: str | None = None,
                 model: str = "fake-model", max_context: int | None = None, context_window: int = 512,
                 record_requests: bool = False, batch_delay: float = 0.2, batch_fail: bool = False,
                 port: int = 0, subprocess: bool = False, startup_timeout: float = 30.0):
        self._kw = {"responder": responder, "script": script, "latency": latency, "capacity": capacity,
                    "capacity_mode": capacity_mode, "capacity_retry_after": capacity_retry_after,
                    "retry_after": retry_after, "api_key": api_key, "model": model,
                    "max_context": max_context, "context_window": context_window,
                    "record_requests": record_requests, "batch_delay": batch_delay,
                    "batch_fail": batch_fail}
        self.host = "127.0.0.1"
        self.port = port
        self._proc: _subprocess.Popen | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if subprocess:
            self._start_subprocess(startup_timeout)
        else:
            self._start_thread(startup_timeout)

    # -- lifecycle
    def _start_thread(self, timeout: float):
        self._server = _Server(**self._kw)
        ready = threading.Event()
        err: list = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                srv = loop.run_until_complete(
                    asyncio.start_server(self._server.handle_conn, self.host, self.port, backlog=4096))
            except BaseException as exc:  # noqa: BLE001
                err.append(exc)
                ready.set()
                loop.close()
                return
            self.port = srv.sockets[0].getsockname()[1]
            self._stop_evt = asyncio.Event()
            ready.set()

            async def main():
                await self._stop_evt.wait()
                srv.close()
                await self._server.close_all()
                with contextlib.suppress(asyncio.TimeoutError, OSError):
                    await asyncio.wait_for(srv.wait_closed(), 2)

            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("fake OpenAI server did not start")
        if err:
            raise err[0]

    def _start_subprocess(self, timeout: float):
        if self._kw["responder"] is not None or callable(self._kw["script"]):
            raise TypeError("subprocess mode takes no responder and no callable script (they must be JSON)")
        cfg = {k: self._kw[k] for k in _SERIALIZABLE}
        cmd = [sys.executable, os.path.abspath(__file__), "--port", str(self.port),
               "--config", json.dumps(cfg)]
        self._proc = _subprocess.Popen(cmd, stdout=_subprocess.PIPE, stderr=None, text=True)
        result: list = []
        t = threading.Thread(target=lambda: result.append(self._proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        line = result[0] if result else ""
        if not line.startswith("FAKE_OPENAI_READY"):
            self._proc.kill()
            raise RuntimeError(f"fake OpenAI subprocess did not start (said {line!r})")
        self.port = int(line.rsplit(":", 1)[1].split("/")[0])

    def stop(self):
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except _subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stdout:
                self._proc.stdout.close()
            self._proc = None
        if self._thread is not None:
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.call_soon_threadsafe(self._stop_evt.set)
                except RuntimeError:
                    pass
            self._thread.join(10)
            self._thread = None

    close = stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.stop()

    # -- addresses and clients
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, **kw):
        """An ``openai.OpenAI`` client for this server (api_key defaults to the server's, max_retries 0)."""
        import openai

        kw.setdefault("api_key", self._kw["api_key"] or "sk-fake")
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, **kw)

    def async_client(self, **kw):
        import openai

        kw.setdefault("api_key", self._kw["api_key"] or "sk-fake")
        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, **kw)

    # -- counters
    def stats(self) -> dict:
        """A consistent snapshot: total_requests, requests_per_key, inflight, max_inflight, by_status,
        events [(key, status)], last_authorization, last_request, requests, batches_created,
        batch_requests."""
        if self._server is not None:
            return self._server.stats()
        with urllib.request.urlopen(self.url + "/_fake/stats", timeout=10) as r:
            return _fix_stats(json.loads(r.read()))

    def reset_counters(self):
        if self._server is not None:
            self._server.reset()
        else:
            req = urllib.request.Request(self.url + "/_fake/reset", data=b"", method="POST")
            urllib.request.urlopen(req, timeout=10).read()

    total_requests = property(lambda self: self.stats()["total_requests"])
    requests_per_key = property(lambda self: self.stats()["requests_per_key"])
    inflight = property(lambda self: self.stats()["inflight"])
    max_inflight = property(lambda self: self.stats()["max_inflight"])
    by_status = property(lambda self: self.stats()["by_status"])
    events = property(lambda self: self.stats()["events"])
    last_authorization = property(lambda self: self.stats()["last_authorization"])
    last_request = property(lambda self: self.stats()["last_request"])
    requests = property(lambda self: self.stats()["requests"])
    batches_created = property(lambda self: self.stats()["batches_created"])
    batch_requests = property(lambda self: self.stats()["batch_requests"])

    key_of = staticmethod(key_of)

    def _live(self, name):
        if self._server is None:
            raise AttributeError(f"{name} can only be changed on an in-process server")
        return self._server

    @property
    def script(self):
        return self._kw["script"]

    @script.setter
    def script(self, value):
        """Swap the script of a running in-process server (counters are kept; reset them if needed)."""
        self._live("script").script = value
        self._kw["script"] = value

    @property
    def responder(self):
        return self._kw["responder"]

    @responder.setter
    def responder(self, value):
        self._live("responder").responder = value
        self._kw["responder"] = value

    @property
    def batch_delay(self) -> float:
        return self._kw["batch_delay"]

    @batch_delay.setter
    def batch_delay(self, value: float):
        """Change how long later batches take (in-process only; a running batch keeps its timing)."""
        self._live("batch_delay").batch_delay = float(value or 0.0)
        self._kw["batch_delay"] = value

    @property
    def batch_fail(self) -> bool:
        return self._kw["batch_fail"]

    @batch_fail.setter
    def batch_fail(self, value: bool):
        """Make batches that have not yet left ``validating`` end ``failed`` (in-process only)."""
        self._live("batch_fail").batch_fail = bool(value)
        self._kw["batch_fail"] = value


# ------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Scripted fake OpenAI-compatible chat server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--config", default=None, help="JSON object of FakeOpenAI keyword arguments")
    ap.add_argument("--script", default=None, help="JSON script (dict or list)")
    ap.add_argument("--latency", type=float, default=None)
    ap.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--capacity-mode", choices=["reject", "429", "queue"], default=None)
    ap.add_argument("--capacity-retry-after", type=float, default=None)
    ap.add_argument("--retry-after", type=float, default=None)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--batch-delay", type=float, default=None)
    ap.add_argument("--batch-fail", action="store_true", default=None)
    args = ap.parse_args(argv)
    cfg = json.loads(args.config) if args.config else {}
    for name in ("latency", "capacity", "capacity_mode", "capacity_retry_after", "retry_after", "api_key",
                 "model", "max_context", "batch_delay", "batch_fail"):
        v = getattr(args, name)
        if v is not None:
            cfg[name] = v
    if args.script:
        cfg["script"] = json.loads(args.script)
    cfg["script"] = _script_from_json(cfg.get("script"))
    server = _Server(**cfg)

    async def run():
        srv = await asyncio.start_server(server.handle_conn, args.host, args.port, backlog=4096)
        port = srv.sockets[0].getsockname()[1]
        print(f"FAKE_OPENAI_READY http://{args.host}:{port}/v1", flush=True)
        async with srv:
            await srv.serve_forever()

    try:
        import uvloop  # type: ignore

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

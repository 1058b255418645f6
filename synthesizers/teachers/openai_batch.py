"""``batch_api: true`` — one call's requests through an OpenAI-compatible Batch API.

The requests become one JSONL file (one line per request, ``custom_id`` = the request's cache key),
uploaded with ``files.create(purpose="batch")`` and submitted with ``batches.create`` on
``/v1/chat/completions``; the batch is then polled every ``batch_poll_s`` seconds until it ends. The
batch id is written to the shard's journal (the teacher cache) as soon as it exists, keyed by the set
of requests, so a run killed while waiting — hours, possibly — resumes polling the same batch instead
of paying for a second one; a batch that ended ``failed``, ``expired`` with nothing answered, or
``cancelled`` is forgotten and a new one submitted next time.

Each line's outcome becomes a :class:`~synthesizers.teachers.base.Reply`: answers from the output file;
from the error file, a refusal that says the prompt is too long is ``context_length``, 408/409/429/5xx
are ``transient`` (the shard stays incomplete and a rerun sends them again), other statuses ``fatal``;
a line the batch never answered is ``transient``. Latency is the batch's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from curate.secrets import redact
from synthesizers.teachers.base import Journal, Reply, digest, is_context_error

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_DONE = {"completed", "failed", "expired", "cancelled"}


def run_batch(client: Any, bodies: Sequence[dict[str, Any]], ids: Sequence[str], *, window: str,
              poll_s: float, journal: Journal | None, log) -> list[Reply]:
    """Replies for ``bodies`` (chat request bodies) answered by one batch; ``ids`` are their custom ids."""
    note = "batch:" + digest(sorted(ids))
    batch = None
    batch_id = journal.get_note(note) if journal is not None else None
    if batch_id:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("failed", "cancelled", "cancelling") or (
                batch.status == "expired" and not batch.output_file_id):
            log.info("batch %s ended %s; submitting a new one", batch_id, batch.status)
            batch = None
        else:
            log.info("resuming batch %s (%s)", batch_id, batch.status)
    started = time.monotonic()
    if batch is None:
        lines = b"".join(orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                       "body": body}) + b"\n" for cid, body in zip(ids, bodies, strict=True))
        upload = client.files.create(file=("curate-batch.jsonl", lines), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window=window, metadata={"curate": note[:64]})
        if journal is not None:
            journal.put_note(note, batch.id)
        log.info("submitted batch %s with %d request(s)", batch.id, len(bodies))
    while batch.status not in _DONE:
        time.sleep(poll_s)
        batch = client.batches.retrieve(batch.id)
    seconds = time.monotonic() - started
    replies = _read_results(client, batch, ids, seconds)
    if journal is not None:
        journal.put_note(note, None)  # the answers go to the cache; this batch is spent
    return replies


def _read_results(client: Any, batch: Any, ids: Sequence[str], seconds: float) -> list[Reply]:
    by_id: dict[str, Reply] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        for line in client.files.content(file_id).content.splitlines():
            if not line.strip():
                continue
            entry = orjson.loads(line)
            by_id[entry.get("custom_id")] = _reply(entry, seconds)
    why = f"the batch {batch.id} ended {batch.status} without answering this request"
    errors = getattr(batch, "errors", None)
    if errors is not None and getattr(errors, "data", None):
        why += ": " + "; ".join(redact(str(getattr(e, "message", e))) for e in errors.data[:3])
    return [by_id.get(cid) or Reply(error=why, error_kind="transient") for cid in ids]


def _reply(entry: dict[str, Any], seconds: float) -> Reply:
    response = entry.get("response") or {}
    status = response.get("status_code")
    body = response.get("body") or {}
    if status == 200 and isinstance(body, dict) and body.get("choices"):
        choice = body["choices"][0]
        text = (choice.get("message") or {}).get("content")
        usage = body.get("usage") or {}
        if isinstance(text, str) and text.strip():
            return Reply(text=text, finish_reason=choice.get("finish_reason"), latency_s=seconds,
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0))
        return Reply(error="empty completion in the batch output", error_kind="transient")
    error = entry.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    message = redact(str(error.get("message") if isinstance(error, dict) else error) or f"HTTP {status}")
    if is_context_error(status, message):
        return Reply(error=f"HTTP {status}: {message}", error_kind="context_length")
    kind = "transient" if status is None or status in _RETRY_STATUS else "fatal"
    return Reply(error=f"HTTP {status}: {message}", error_kind=kind)

"""The scripted fake OpenAI server (tests/fake_openai.py), driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from tests.fake_openai import FakeOpenAI, fail_first, key_of

MSG = [{"role": "user", "content": "hello fake world"}]


def _ask(client, text="hello fake world", **kw):
    return client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(api_key="sk-secret-123") as f:
        yield f


@pytest.fixture
def client(fake):
    fake.reset_counters()
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-secret-123", max_retries=0, timeout=5) as c:
        yield c


def test_ok_shape_auth_and_models(fake, client):
    r = _ask(client)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "teacher" and isinstance(r.created, int)
    assert r.choices[0].index == 0 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "answer: hello fake world"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    assert _ask(client).choices[0].message.content == r.choices[0].message.content  # deterministic
    assert fake.last_authorization == "Bearer sk-secret-123"
    assert [m.id for m in client.models.list().data] == ["fake-model"]
    with openai.OpenAI(base_url=fake.base_url, api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        _ask(bad)
    st = fake.stats()
    assert st["total_requests"] == 3 and st["by_status"] == {200: 2, 401: 1}
    assert st["events"][-1] == (key_of("hello fake world"), 401)


def test_json_schema_answers_validate(client):
    class Item(pydantic.BaseModel):
        name: str
        score: int = pydantic.Field(ge=1, le=5)

    class Answer(pydantic.BaseModel):
        title: str = pydantic.Field(max_length=12)
        year: int
        ratio: float
        ok: bool
        tags: list[str]
        ids: list[int]
        kind: str | None = None
        item: Item
        items: list[Item]

    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": Answer.model_json_schema(),
                                                  "strict": True}}
    a = _ask(client, "doc one", response_format=rf).choices[0].message.content
    b = _ask(client, "doc two", response_format=rf).choices[0].message.content
    pa, pb = Answer.model_validate_json(a), Answer.model_validate_json(b)
    assert pa != pb and pa.tags and pa.ids and 1 <= pa.item.score <= 5
    assert a == _ask(client, "doc one", response_format=rf).choices[0].message.content
    obj = _ask(client, "doc", response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(obj), dict)


def test_status_faults_and_retry_after(fake, client):
    fake.script = {key_of("a"): ["status 429 2", 503, "status 500"], key_of("b"): "malformed"}
    try:
        with pytest.raises(openai.RateLimitError) as ei:
            _ask(client, "a")
        assert ei.value.response.headers["retry-after"] == "2"
        with pytest.raises(openai.InternalServerError) as ei:
            _ask(client, "a")
        assert ei.value.status_code == 503
        with pytest.raises(openai.InternalServerError):
            _ask(client, "a")
        assert _ask(client, "a").choices[0].message.content == "answer: a"  # the script ran out: ok
        with pytest.raises((ValueError, openai.APIError)):  # a 200 whose body is not JSON
            _ask(client, "b")
    finally:
        fake.script = None
    assert fake.requests_per_key == {key_of("a"): 4, key_of("b"): 1}
    assert fake.by_status == {429: 1, 503: 1, 500: 1, 200: 2}


def test_content_faults_context_length_disconnect():
    script = {0: "empty", 1: "bad_json_content", 2: "context_length", 3: "disconnect",
              4: "delay 0.2 status 502", 5: "length"}
    with FakeOpenAI(script=script) as f, f.client(timeout=5) as c:
        rf = {"type": "json_object"}
        assert _ask(c, response_format=rf).choices[0].message.content == ""
        bad = _ask(c, response_format=rf).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(bad)
        with pytest.raises(openai.BadRequestError) as ei:
            _ask(c, max_tokens=100)
        body = ei.value.body
        assert body["object"] == "error" and body["type"] == "BadRequestError" and body["code"] == 400
        assert body["message"].startswith(
            "This model's maximum context length is 512 tokens. However, you requested")
        with pytest.raises(openai.APIConnectionError):
            _ask(c)
        t = time.monotonic()
        with pytest.raises(openai.APIStatusError) as ei:
            _ask(c)
        assert ei.value.status_code == 502 and time.monotonic() - t >= 0.2
        assert _ask(c).choices[0].finish_reason == "length"
        assert [e[1] for e in f.events] == [200, 200, 400, "disconnect", 502, 200]


def test_max_context_rejects_long_prompts():
    with FakeOpenAI(max_context=64) as f, f.client() as c:
        assert _ask(c, "short").choices[0].message.content == "answer: short"
        with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
            _ask(c, "word " * 100)


def test_hang_times_out_without_blocking_others():
    with FakeOpenAI(script={key_of("stuck"): "hang"}) as f, f.client(timeout=0.5) as c:
        t = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            _ask(c, "stuck")
        assert 0.4 < time.monotonic() - t < 3
        assert _ask(c, "free").choices[0].message.content == "answer: free"
        deadline = time.monotonic() + 2
        while f.inflight and time.monotonic() < deadline:  # the closed connection frees the request
            time.sleep(0.01)
        assert f.inflight == 0
        assert f.events == [(key_of("stuck"), "hang"), (key_of("free"), 200)]


def test_fail_first_per_key_with_client_retries():
    # openai retries 500s itself, waiting the Retry-After the fake sends (10 ms here).
    with FakeOpenAI(script=fail_first(2, "status 500 0.01")) as f, f.client(max_retries=2) as c:
        for text in ("x", "y"):
            assert _ask(c, text).choices[0].message.content == f"answer: {text}"
        assert f.requests_per_key == {key_of("x"): 3, key_of("y"): 3}
        assert [s for _, s in f.events] == [500, 500, 200] * 2
        f.reset_counters()
        assert f.total_requests == 0 and f.events == []


def test_async_max_inflight_and_callable_script():
    seen = []

    def script(n, key, attempt, req):
        seen.append((n, attempt))

    async def main(f):
        async with f.async_client() as ac:
            rs = await asyncio.gather(*(ac.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(40)))
        return [r.choices[0].message.content for r in rs]

    with FakeOpenAI(latency=0.5, script=script) as f:
        out = asyncio.run(main(f))
        assert out == [f"answer: q{i}" for i in range(40)]
        assert f.max_inflight == 40 and f.inflight == 0 and f.total_requests == 40
        assert sorted(n for n, _ in seen) == list(range(40)) and {a for _, a in seen} == {0}


def test_capacity_reject_and_queue():
    async def burst(f, n):
        async with f.async_client() as ac:
            async def one(i):
                t = time.monotonic()
                try:
                    await ac.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": f"c{i}"}])
                    return 200, time.monotonic() - t
                except openai.RateLimitError as e:
                    assert e.response.headers["retry-after"] == "0"
                    return 429, time.monotonic() - t
            return await asyncio.gather(*(one(i) for i in range(n)))

    with FakeOpenAI(latency=0.5, capacity=5) as f:
        res = asyncio.run(burst(f, 20))
        assert sum(s == 200 for s, _ in res) == 5 and sum(s == 429 for s, _ in res) == 15
        assert f.by_status == {200: 5, 429: 15} and f.max_inflight > 5

    with FakeOpenAI(latency=0.25, capacity=4, capacity_mode="queue") as f:
        res = asyncio.run(burst(f, 12))
        assert all(s == 200 for s, _ in res)
        # Over capacity, latency grows: latency x ceil(inflight / capacity), up to x3 here.
        assert max(t for _, t in res) >= 0.5 and min(t for _, t in res) < 0.5


def test_responder_override():
    def responder(req):
        text = req["messages"][-1]["content"]
        if text == "raw":
            return {"status": 418, "body": {"error": {"message": "teapot"}}, "headers": {"X-Fake": "1"}}
        return text.upper()

    with FakeOpenAI(responder=responder) as f, f.client() as c:
        assert _ask(c, "shout").choices[0].message.content == "SHOUT"
        with pytest.raises(openai.APIStatusError) as ei:
            _ask(c, "raw")
        assert ei.value.status_code == 418 and ei.value.response.headers["x-fake"] == "1"


def test_subprocess_mode():
    with FakeOpenAI(subprocess=True, script={"*": ["status 500"]}, latency=0.01) as f, f.client() as c:
        with pytest.raises(openai.InternalServerError):
            _ask(c, "s")
        assert _ask(c, "s").choices[0].message.content == "answer: s"
        assert f.events == [(key_of("s"), 500), (key_of("s"), 200)]
        assert f.by_status == {500: 1, 200: 1}
        f.reset_counters()
        assert f.total_requests == 0
        with urllib.request.urlopen(f.base_url + "/models") as r:
            assert json.loads(r.read())["object"] == "list"


def test_subprocess_mode_batches():
    with FakeOpenAI(subprocess=True, script={key_of("s1"): "status 500"}, batch_delay=0) as f, f.client() as c:
        b, _ = _wait(c, _batch(c, _jsonl(["s0", "s1"])).id)
        assert b.status == "completed" and b.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
        assert [e["custom_id"] for e in _lines(c, b.error_file_id)] == ["req-1"]
        st = f.stats()
        assert st["batches_created"] == 1 and st["batch_requests"] == 2 and st["by_status"] == {200: 1, 500: 1}


# ------------------------------------------------------------------------------------ files and batches

def _jsonl(texts, url="/v1/chat/completions", **body):
    rows = [{"custom_id": f"req-{i}", "method": "POST", "url": url,
             "body": {"model": "teacher", "messages": [{"role": "user", "content": t}], **body}}
            for i, t in enumerate(texts)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _batch(client, data, **kw):
    f = client.files.create(file=("requests.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", **kw)


def _wait(client, batch_id, until=("completed", "failed", "cancelled", "expired"), timeout=5.0):
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in until:
            return b, seen
        assert time.monotonic() < deadline, f"batch stuck in {b.status}"
        time.sleep(0.02)


def _lines(client, file_id):
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines()]


def test_files_upload_retrieve_content_list(fake, client):
    data = _jsonl(["one", "two"])
    f = client.files.create(file=("reqs.jsonl", data), purpose="batch")
    assert f.object == "file" and f.id.startswith("file-") and f.purpose == "batch"
    assert f.bytes == len(data) and f.filename == "reqs.jsonl" and isinstance(f.created_at, int)
    assert client.files.retrieve(f.id) == f
    assert client.files.content(f.id).content == data
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with openai.OpenAI(base_url=fake.base_url, api_key="wrong", max_retries=0) as bad, \
            pytest.raises(openai.AuthenticationError):
        bad.files.retrieve(f.id)
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    assert fake.total_requests == 0  # file traffic is no chat request


def test_batch_roundtrip_same_answers_and_counters(fake, client):
    texts = ["batch alpha", "batch beta", "batch gamma"]
    b = _batch(client, _jsonl(texts), metadata={"job": "t1"})
    assert b.object == "batch" and b.status == "validating" and b.endpoint == "/v1/chat/completions"
    assert b.output_file_id is None and b.metadata == {"job": "t1"} and b.completion_window == "24h"
    b, seen = _wait(client, b.id)
    assert seen[0] == "validating" and seen[-1] == "completed" and b.completed_at and b.in_progress_at
    assert b.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert b.error_file_id is None and b.errors is None and b.model == "teacher"
    assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens > 0
    out = _lines(client, b.output_file_id)
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-1", "req-2"]
    for o, text in zip(out, texts):
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["response"]["request_id"]
        comp = openai.types.chat.ChatCompletion.model_validate(o["response"]["body"])
        assert comp.choices[0].message.content == f"answer: {text}"
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert b.id in [x.id for x in client.batches.list()]
    st = fake.stats()
    assert st["batches_created"] == 1 and st["batch_requests"] == 3 and st["total_requests"] == 3
    assert st["requests_per_key"] == {key_of(t): 1 for t in texts} and st["by_status"] == {200: 3}
    assert st["last_authorization"] == "Bearer sk-secret-123"
    fake.reset_counters()
    assert fake.batches_created == 0 and fake.batch_requests == 0
    assert client.batches.retrieve(b.id).status == "completed"  # stored objects survive a reset


def test_batch_json_schema_lines_validate(client):
    class Answer(pydantic.BaseModel):
        title: str
        year: int

    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": Answer.model_json_schema()}}
    b, _ = _wait(client, _batch(client, _jsonl(["doc x", "doc y"], response_format=rf)).id)
    out = _lines(client, b.output_file_id)
    got = [o["response"]["body"]["choices"][0]["message"]["content"] for o in out]
    assert got == [_ask(client, t, response_format=rf).choices[0].message.content for t in ("doc x", "doc y")]
    assert all(Answer.model_validate_json(g) for g in got)


def test_batch_script_failures_go_to_error_file():
    script = {key_of("bad"): "status 500", key_of("stuck"): "hang", key_of("retry"): ["status 503"]}
    with FakeOpenAI(script=script, batch_delay=0.05) as f, f.client() as c:
        b, _ = _wait(c, _batch(c, _jsonl(["fine", "bad", "stuck", "retry"])).id)
        assert b.status == "completed"
        assert b.request_counts.model_dump() == {"total": 4, "completed": 1, "failed": 3}
        assert [o["custom_id"] for o in _lines(c, b.output_file_id)] == ["req-0"]
        errs = {e["custom_id"]: e for e in _lines(c, b.error_file_id)}
        assert sorted(errs) == ["req-1", "req-2", "req-3"]
        assert errs["req-1"]["response"]["status_code"] == 500 and errs["req-3"]["response"]["status_code"] == 503
        assert all(isinstance(e["response"]["body"]["error"]["message"], str) for e in errs.values())
        assert "hung" in errs["req-2"]["response"]["body"]["error"]["message"]
        assert f.by_status == {200: 1, 500: 1, "hang": 1, 503: 1} and f.inflight == 0
        # The per-key attempt count spans batch lines and plain requests: "retry" is now past its 503.
        assert _ask(c, "retry").choices[0].message.content == "answer: retry"
        assert f.requests_per_key[key_of("retry")] == 2 and f.batch_requests == 4


def test_batch_cancel_fail_and_validation():
    with FakeOpenAI(batch_delay=5) as f, f.client() as c:
        b = _batch(c, _jsonl(["slow"]))
        t = time.monotonic()
        cb = c.batches.cancel(b.id)
        assert cb.status == "cancelling" and cb.cancelling_at
        b, _ = _wait(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at and time.monotonic() - t < 2
        assert b.output_file_id is None and f.batch_requests == 0
        with pytest.raises(openai.ConflictError):
            c.batches.cancel(b.id)
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_nope")
        with pytest.raises(openai.NotFoundError):
            c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
        f.batch_delay = 0
        f.batch_fail = True
        b, _ = _wait(c, _batch(c, _jsonl(["x"])).id)
        assert b.status == "failed" and b.failed_at and b.errors.data[0].code == "batch_failed"
        f.batch_fail = False
        bad = _jsonl(["ok"]) + b"{not json\n" + _jsonl(["ok"])  # line 2 bad, line 3 a duplicate custom_id
        b, _ = _wait(c, _batch(c, bad).id)
        assert b.status == "failed"
        assert [(e.code, e.line) for e in b.errors.data] == [("invalid_json_line", 2), ("duplicate_custom_id", 3)]
        assert f.total_requests == 0 and f.batches_created == 3  # the 404 made none

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

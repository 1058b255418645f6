"""The real-vLLM test fixture (tests/vllm_cpu.py): a tiny Llama served by the CPU build of vLLM.

Skips, saying how to create it, when the vllm-cpu venv is missing (``.ci/run`` creates it).
"""

from __future__ import annotations

import json

import pytest

from tests import vllm_cpu

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    reason = vllm_cpu.skip_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("transformers", reason="the `text` extra is not installed")
    return vllm_cpu.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(tiny_llama):
    with vllm_cpu.VllmServer(tiny_llama) as srv:
        yield srv


def test_chat_and_json_schema(server):
    openai = pytest.importorskip("openai", reason="the `llm` extra is not installed")
    client = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    reply = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert 0 < usage.completion_tokens <= 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    schema = {"type": "object", "additionalProperties": False, "required": ["score", "label"],
              "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 5},
                             "label": {"type": "string", "enum": ["good", "bad"]}}}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Rate this."}], max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "rating", "schema": schema}})
    data = json.loads(reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "stop"
    assert data["label"] in ("good", "bad") and 0 <= data["score"] <= 5


def test_prompt_longer_than_context_is_a_400(server):
    openai = pytest.importorskip("openai", reason="the `llm` extra is not installed")
    client = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=60, max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", max_tokens=4,
                                       messages=[{"role": "user", "content": "def f(x): return x\n" * 200}])
    assert err.value.status_code == 400
    assert "maximum context length" in err.value.message

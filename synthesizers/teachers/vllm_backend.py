"""``backend: vllm`` — vLLM's offline engine (``vllm.LLM``) in the worker process, for GPU machines.

vLLM is not a dependency of this package: install it yourself where it runs (``pip install vllm`` on
a CUDA machine). The engine loads once per process with ``engine_args`` (``tensor_parallel_size``,
``max_model_len``, ``gpu_memory_utilization``, ``dtype`` …). Each :meth:`stream` call is **one**
``LLM.chat`` call over all its requests, so vLLM's scheduler batches them continuously; every request
has its own ``SamplingParams`` (its seed; a JSON schema as structured output when ``guided_json``).
Chat templates come from the model's tokenizer; image parts (``image_url`` data URLs) go to
vision-language models as they are. Prompts longer than the engine's ``max_model_len`` are counted
with the engine's tokenizer first and answered ``context_length`` (vLLM would refuse the whole call).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from curate.errors import MissingDependency
from synthesizers.teachers.base import Reply, Request, Teacher
from synthesizers.teachers.spec import TeacherSpec


def structured_params(schema: dict[str, Any]) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments constraining the answer to ``schema``, for the installed
    vLLM (``structured_outputs`` in current releases, ``guided_decoding`` in older ones)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}


class VllmTeacher(Teacher):
    backend = "vllm"

    def __init__(self, spec: TeacherSpec):
        try:
            import vllm
        except ImportError:
            raise MissingDependency("vllm", "vllm") from None
        self.spec = spec
        self.vllm = vllm
        self.llm = vllm.LLM(model=spec.model, **spec.engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = int(self.llm.llm_engine.model_config.max_model_len)
        if spec.max_context_tokens is not None:
            self.max_len = min(self.max_len, spec.max_context_tokens)

    def count_tokens(self, messages: Sequence[dict[str, Any]]) -> int | None:
        try:
            ids = self.tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - multimodal parts a text tokenizer cannot render: let vLLM count
            return None
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _sampling(self, req: Request):
        s = self.spec.sampling
        kwargs: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p,
                                  "max_tokens": req.max_tokens or s.max_tokens, "seed": req.seed}
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if req.schema is not None and self.spec.guided_json:
            kwargs.update(structured_params(req.schema))
        return self.vllm.SamplingParams(**kwargs)

    def stream(self, requests: Sequence[Request], journal=None) -> Iterator[tuple[int, Reply]]:
        send = []
        for i, req in enumerate(requests):
            n = self.count_tokens(req.messages)
            if n is not None and n >= self.max_len:
                yield i, Reply(error=f"the prompt has {n} tokens; the engine's max_model_len is {self.max_len}",
                               error_kind="context_length", prompt_tokens=n)
            else:
                send.append(i)
        if not send:
            return
        t0 = time.monotonic()
        outputs = self.llm.chat([list(requests[i].messages) for i in send],
                                sampling_params=[self._sampling(requests[i]) for i in send], use_tqdm=False)
        latency = (time.monotonic() - t0) / max(len(send), 1)
        for i, out in zip(send, outputs, strict=True):
            completion = out.outputs[0] if out.outputs else None
            text = completion.text if completion is not None else ""
            yield i, Reply(text=text, prompt_tokens=len(out.prompt_token_ids or []),
                           completion_tokens=len(completion.token_ids) if completion is not None else 0,
                           latency_s=latency, finish_reason=getattr(completion, "finish_reason", None))

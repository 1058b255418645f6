"""``backend: transformers`` — a local causal LM (or VLM) through ``transformers``, on CPU or GPU.

For small teachers, CPU-only users and tests. The model and tokenizer load once per process
(``AutoModelForCausalLM`` / ``AutoTokenizer``, ``engine_args`` passed to ``from_pretrained``); prompts
are rendered with the tokenizer's chat template (a plain ``role: content`` layout when it has none)
and generated one at a time, shortest first. Sampling follows ``teacher.sampling``; each request is
seeded from its own ``seed``, so an answer does not depend on what else was asked with it. A JSON schema is not enforced while decoding here (the answer is validated and repaired after).
Prompts longer than the model's context (``max_position_embeddings``, or ``max_context_tokens``) are
``context_length``. Image parts are not supported by this backend (a clear error).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from curate.errors import ConfigError, MissingDependency
from synthesizers.teachers.base import Reply, Request, Teacher
from synthesizers.teachers.local_tokens import text_of
from synthesizers.teachers.spec import TeacherSpec


class TransformersTeacher(Teacher):
    backend = "transformers"

    def __init__(self, spec: TeacherSpec):
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise MissingDependency("transformers", "llm") from None
        self.spec = spec
        self.torch = torch
        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
            self.model = AutoModelForCausalLM.from_pretrained(spec.model, **spec.engine_args).to(device).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"teacher.model: cannot load {spec.model!r}: {e}") from None
        self.device = device
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.context = min(x for x in (limit, spec.max_context_tokens) if x) if (limit or spec.max_context_tokens) else None

    def _ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        for m in messages:
            if isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"]):
                raise ConfigError("teacher.backend transformers does not take images; use vllm or openai "
                                  "with a vision-language model")
        plain = [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
        return self.tokenizer(text)["input_ids"]

    def count_tokens(self, messages: Sequence[dict[str, Any]]) -> int | None:
        return len(self._ids(messages))

    def stream(self, requests: Sequence[Request], journal=None) -> Iterator[tuple[int, Reply]]:
        prompts = [self._ids(r.messages) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        todo = []
        for i in order:
            n = len(prompts[i])
            budget = requests[i].max_tokens or self.spec.sampling.max_tokens
            if self.context is not None and n + 1 > self.context:
                yield i, Reply(error=f"the prompt has {n} tokens; the model's context is {self.context}",
                               error_kind="context_length", prompt_tokens=n)
            else:
                todo.append((i, budget if self.context is None else min(budget, self.context - n)))
        for i, budget in todo:
            yield i, self._generate(prompts[i], requests[i], budget)

    def _generate(self, ids: list[int], req: Request, budget: int) -> Reply:
        torch, s = self.torch, self.spec.sampling
        t0 = time.monotonic()
        if req.seed is not None:
            torch.manual_seed(req.seed)
        inputs = torch.tensor([ids], device=self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "pad_token_id": self.tokenizer.pad_token_id,
                                  "attention_mask": torch.ones_like(inputs)}
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs.update(do_sample=False)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(inputs, **kwargs)
        new = out[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "stop" if eos is not None and eos in new else "length"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Reply(text=text, prompt_tokens=len(ids), completion_tokens=len(new),
                     latency_s=time.monotonic() - t0, finish_reason=finish)

"""``teacher:`` — which model writes a task's outputs, where it runs, how it samples and what it costs.

One block shared by every teacher task (``segment_qa``, ``long_doc_qa``, ``summarize``, ``caption``,
``caption_fuse``, ``verify``)::

    teacher:
      backend: openai                 # openai | vllm | transformers
      model: meta-llama/Llama-3.1-70B-Instruct
      base_url: http://gpu-node:8000/v1
      api_key: ${OPENAI_API_KEY}      # a ${VAR} secret: expanded in memory, never written
      max_concurrency: 64             # ceiling; the client adapts below it
      sampling: {temperature: 0.7, max_tokens: 1024}
      price: {input_per_million: 0.5, output_per_million: 1.5}

Everything that changes what the teacher answers (backend, model, sampling, the task's prompt template)
is part of each request's cache key; what only changes how requests are sent (concurrency, timeouts,
retries, the URL) is not, so a run resumed against another server replica still hits its cache.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from curate.stage import StageParams


class Sampling(StageParams):
    """Sampling parameters sent with every request (and part of its cache key)."""

    temperature: float = Field(0.7, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(1024, gt=0, description="most tokens the teacher writes per answer")
    seed: int | None = Field(None, description="per-request seed sent to backends that take one "
                             "(null: derived from the run seed and the request)")
    stop: tuple[str, ...] = Field((), description="stop strings")


class Price(StageParams):
    """What the provider charges, for the ``cost_usd`` figure in ``stats.json``."""

    input_per_million: float = Field(0.0, ge=0, description="US dollars per million prompt tokens")
    output_per_million: float = Field(0.0, ge=0, description="US dollars per million completion tokens")


class TeacherSpec(StageParams):
    """The ``teacher:`` block of a teacher task."""

    backend: Literal["openai", "vllm", "transformers"] = Field(
        "openai", description="openai: any OpenAI-compatible server; vllm: vLLM's offline engine in this "
        "process; transformers: a local model (small models, CPU)")
    model: str = Field(description="model name the server serves (openai) or a local folder / Hub name")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://host:8000/v1 "
                                 "(openai; null: the OPENAI_BASE_URL variable or api.openai.com)")
    api_key: str | None = Field(None, description="API key, best given as ${VAR} (null: OPENAI_API_KEY, or "
                                "'EMPTY' for local servers)")
    sampling: Sampling = Field(default_factory=Sampling, description="sampling parameters")
    guided_json: bool = Field(True, description="ask the backend to constrain JSON answers to the task's "
                              "schema (response_format json_schema / vLLM structured outputs)")
    max_concurrency: int = Field(32, ge=1, description="most requests in flight (openai); the client "
                                 "adapts below this ceiling")
    min_concurrency: int = Field(1, ge=1, description="fewest requests in flight the client backs off to")
    adaptive: bool = Field(True, description="grow concurrency while the server keeps up, back off on "
                           "429/503 and rising latency (false: always max_concurrency)")
    timeout_s: float = Field(600.0, gt=0, description="seconds one request may take before it is retried")
    max_retries: int = Field(6, ge=0, description="retries of one request on 429, 5xx, timeouts, "
                             "dropped connections and malformed or empty answers")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per retry, with jitter, "
                             "capped at max_backoff_s (a server's Retry-After wins when longer)")
    max_backoff_s: float = Field(60.0, ge=0, description="longest delay between two retries")
    max_context_tokens: int | None = Field(None, gt=0, description="the teacher's context length: prompts "
                                           "longer than this (counted by the teacher's tokenizer where "
                                           "it is local) are skipped and counted, never sent")
    tokenizer: str | None = Field(None, description="the teacher's tokenizer (folder or Hub name), to "
                                  "count prompt tokens for max_context_tokens before sending (openai; "
                                  "vllm and transformers use the model's own)")
    batch_api: bool = Field(False, description="openai: send each batch of requests through the provider's "
                            "Batch API (/v1/files + /v1/batches: about half the price, answers within "
                            "batch_window); the batch id is kept in the cache, so a rerun resumes it")
    batch_window: str = Field("24h", description="the Batch API's completion_window")
    batch_poll_s: float = Field(30.0, gt=0, description="seconds between Batch API status checks")
    price: Price | None = Field(None, description="prices per million tokens, for cost_usd in stats.json")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="extra arguments of vllm.LLM(...) "
                                        "or transformers from_pretrained(...) (dtype, max_model_len, "
                                        "tensor_parallel_size, device_map …)")
    device: str | None = Field(None, description="transformers: cpu, cuda, cuda:1 … (null: cuda if "
                               "available, else cpu)")

    @model_validator(mode="after")
    def _bounds(self) -> TeacherSpec:
        if self.min_concurrency > self.max_concurrency:
            raise ValueError("min_concurrency is larger than max_concurrency")
        return self

    def identity(self) -> dict[str, Any]:
        """What makes two answers comparable: part of every cache key and of each row's lineage."""
        return {"backend": self.backend, "model": self.model,
                "sampling": self.sampling.model_dump(mode="json")}

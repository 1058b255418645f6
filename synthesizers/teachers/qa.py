"""The answer models of QA tasks: a question, its answer and the numbered pieces it rests on."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, create_model, field_validator


class SingleQA(BaseModel):
    """A question about one passage and its answer."""

    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class EvidenceQA(SingleQA):
    """A question that needs several numbered pieces, its answer, and the pieces (at least two)."""

    evidence: list[int] = Field(min_length=2)

    @field_validator("evidence")
    @classmethod
    def _two(cls, v: list[int]) -> list[int]:
        if len(set(v)) < 2:
            raise ValueError("list at least two different numbers")
        return sorted(set(v))


@lru_cache(maxsize=256)
def evidence_model(allowed: tuple[int, ...]) -> type[EvidenceQA]:
    """:class:`EvidenceQA` whose evidence numbers must be among ``allowed`` — in the JSON schema too, so
    guided decoding cannot name a piece that was not shown."""
    return create_model("EvidenceQA_" + "_".join(map(str, allowed)), __base__=EvidenceQA,
                        evidence=(list[Literal[allowed]], Field(min_length=2)))

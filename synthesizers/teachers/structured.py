"""JSON answers: the schema sent to the teacher, parsing what comes back, and the repair turn.

A task declares its answer as a pydantic model. :func:`json_schema` gives the schema the backend
constrains decoding with (closed objects, every field required, as strict structured-output modes
want). :func:`parse` accepts the JSON object alone, inside a Markdown code fence, or surrounded by
prose (the first ``{`` to its matching ``}``), then validates it; a task may add its own checks by
raising ``ValueError`` in the model's validators. What fails gets one more turn
(:func:`repair_messages`): the teacher sees its answer and the exact error and is asked for the JSON
object alone. Bounded by the task's ``repair_attempts``.
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


@lru_cache(maxsize=512)
def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with every object closed and every property required (computed once
    per model; callers must not change the dict)."""
    schema = copy.deepcopy(model.model_json_schema())

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def extract_json(text: str) -> str:
    """The JSON object in ``text``: the whole text, a fenced block, or the first balanced ``{…}``."""
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        return stripped
    fence = _FENCE.search(text)
    if fence and fence.group(1).strip().startswith("{"):
        return fence.group(1).strip()
    start = text.find("{")
    if start < 0:
        raise ValueError("the answer has no JSON object")
    depth, in_string, escape = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    raise ValueError("the answer's JSON object is not closed (cut off?)")


def parse(model: type[M], text: str) -> M:
    """The validated answer; raises ``ValueError`` with a short, teacher-readable reason."""
    raw = extract_json(text)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at character {e.pos}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'answer'}: {err['msg']}"
                             for err in e.errors()[:5])
        raise ValueError(problems) from None


def repair_messages(messages: tuple[dict[str, Any], ...], answer: str, error: str,
                    schema: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The conversation plus the failed answer and one user turn naming the problem."""
    return (*messages, {"role": "assistant", "content": answer},
            {"role": "user", "content": (
                f"That answer cannot be used: {error}. Reply again with one JSON object only, no other "
                f"text, matching this JSON schema: {json.dumps(schema, separators=(',', ':'))}")})

"""Counting a chat prompt's tokens with the teacher's own tokenizer and chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from curate.errors import ConfigError, MissingDependency


class ChatTokenCounter:
    """``count(messages)``: tokens of the rendered chat prompt (with the generation prompt), by the
    tokenizer at ``path`` (loaded once). Image parts count as nothing here: the server counts them."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise MissingDependency("transformers", "llm") from None
        try:
            self.tk = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"teacher.tokenizer: cannot load {path!r}: {e}") from None

    def count(self, messages: Sequence[dict[str, Any]]) -> int:
        plain = [{"role": m["role"], "content": text_of(m.get("content"))} for m in messages]
        if getattr(self.tk, "chat_template", None):
            ids = self.tk.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return len(ids)
        return sum(len(self.tk(m["content"])["input_ids"]) + 4 for m in plain)


def text_of(content: Any) -> str:
    """The text of a message's content (a string, or the text parts of a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""

"""``chat_tokens``: chat rows (``messages``) → token rows with loss only on the assistant's turns.

The output is the unit ``pack`` takes (``input_ids``, ``loss_mask``, ``n_tokens``, ``lineage``), so
teacher-written SFT data packs into long sequences like any other corpus, each conversation one
attention unit. ``loss_mask`` is 1 exactly on the tokens of assistant turns and on the end-of-turn
token that closes each of them (the model must learn to stop); prompts, system and user turns,
contexts and role markers are 0.

Templates:

- ``plain`` (default): every turn is ``<|role|>`` (a special token of the run tokenizer, one per role
  seen) followed by the content and ``<|end|>``; the assistant's content and its ``<|end|>`` are trained.
- a Jinja chat template file (``template: path/to/chat_template.jinja``, e.g. the ``chat_template`` of
  the model being trained, saved to a file; needs ``jinja2``): the conversation is rendered with each
  message's content replaced by a placeholder, so the template's own text (``<|im_start|>``, ``[INST]``
  …) is encoded with the tokenizer's special tokens recognized, and message contents are encoded as
  plain text — a literal ``<|im_start|>`` inside a document never becomes a control token. The first
  token after an assistant content is trained too when the template puts a special token there.

Message contents are encoded one by one, so a token never spans a turn boundary. Conversations longer
than ``max_tokens`` are dropped as ``too_long``; rows without an assistant turn as ``no_assistant``; a
conversation the template refuses (its ``raise_exception``, e.g. for an unknown role) as
``template_refused``, recorded in ``failures/`` with the template's message. Null turns are skipped;
roles other than system, user, assistant and tool are written as user turns by the plain template.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import int_lists, numeric, string_lists
from curate.errors import ConfigError
from curate.registry import register_stage
from curate.stage import Stage, StageParams

ROLES = ("system", "user", "assistant", "tool")
END = "<|end|>"
_PLACEHOLDER = "\x00curate-content-{}\x00"
_SPLIT = re.compile("\x00curate-content-(\\d+)\x00")


@register_stage("chat_tokens")
class ChatTokens(Stage):
    """``messages`` → ``input_ids`` / ``loss_mask`` (see the module docstring)."""

    class Params(StageParams):
        template: str = Field("plain", description="plain, or a Jinja chat-template file")
        max_tokens: int | None = Field(None, gt=0, description="drop conversations with more tokens (too_long)")
        keep_messages: bool = Field(False, description="keep the messages column beside the tokens")

    requires = ("messages",)
    provides = ("input_ids", "loss_mask", "doc_offsets", "n_tokens", "n_image_tokens", "lineage")
    needs_tokenizer = True

    def __init__(self, params, label=None):
        super().__init__(params, label)
        self._jinja = None
        if params.template != "plain":
            path = Path(params.template).expanduser()
            try:
                source = path.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"template: cannot read {path}: {e.strerror or e}") from None
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                raise ConfigError("template: a Jinja chat template needs jinja2: pip install jinja2") from None
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._jinja = env.from_string(source)

    def special_tokens(self) -> list[str]:
        return [f"<|{r}|>" for r in ROLES] + [END] if self._jinja is None else []

    def columns_out(self, columns_in: list[str]) -> list[str]:
        cols = super().columns_out(columns_in)
        return cols if self.params.keep_messages else [c for c in cols if c != "messages"]

    def run(self, batches, ctx):
        tok = ctx.tokenizer
        st = ctx.stats[self.label]
        template_tk = None
        if self._jinja is not None:
            from tokenizers import Tokenizer

            template_tk = Tokenizer.from_str(tok.tk.to_str())
            template_tk.encode_special_tokens = False
        for batch in batches:
            ids_rows, mask_rows, keep, lineage = [], [], [], []
            row_ids = batch.column("id").to_pylist() if "id" in batch.schema.names else [None] * batch.num_rows
            for r, msgs in enumerate(batch.column("messages").to_pylist()):
                msgs = [m for m in msgs or [] if m]  # a null turn is no turn
                if not any(m.get("role") == "assistant" for m in msgs):
                    st.drop("no_assistant")
                    continue
                if template_tk is None:
                    ids, mask = self._plain(tok, msgs)
                else:
                    try:
                        ids, mask = self._templated(tok, template_tk, msgs)
                    except TemplateRefused as e:  # the template's raise_exception: this row only
                        ctx.failure("template_refused", f"stage {self.label}, row {row_ids[r]!r}: {e}",
                                    record=row_ids[r], stage=self.label, dropped=True)
                        continue
                if self.params.max_tokens is not None and len(ids) > self.params.max_tokens:
                    st.drop("too_long")
                    continue
                ids_rows.append(ids)
                mask_rows.append(mask)
                keep.append(r)
                lineage.append([row_ids[r]] if row_ids[r] is not None else [])
            if not keep:
                continue
            out = batch.take(pa.array(keep, pa.int64()))
            if not self.params.keep_messages:
                out = out.drop_columns(["messages"])
            for name in ("input_ids", "loss_mask", "doc_offsets", "n_tokens", "n_image_tokens", "lineage"):
                if name in out.schema.names:
                    out = out.drop_columns([name])
            n = np.fromiter((len(x) for x in ids_rows), dtype=np.int32, count=len(ids_rows))
            out = (out.append_column("input_ids", int_lists(ids_rows))
                   .append_column("loss_mask", int_lists(mask_rows, dtype=np.uint8))
                   .append_column("doc_offsets", int_lists([[0, int(k)] for k in n]))
                   .append_column("n_tokens", numeric(n))
                   .append_column("n_image_tokens", numeric(np.zeros(len(n), np.int32)))
                   .append_column("lineage", string_lists(lineage)))
            st.tokens_out += int(n.sum())
            yield out

    @staticmethod
    def _plain(tok, msgs) -> tuple[np.ndarray, np.ndarray]:
        contents = [m.get("content") or "" for m in msgs]
        encoded = tok.encode_arrays(contents)
        end = tok.special_id(END)
        ids, mask = [], []
        for m, body in zip(msgs, encoded, strict=True):
            role = m.get("role") if m.get("role") in ROLES else "user"
            train = 1 if role == "assistant" else 0
            ids += [tok.special_id(f"<|{role}|>"), *body.tolist(), end]
            mask += [0] + [train] * len(body) + [train]
        return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)

    def _templated(self, tok, template_tk, msgs) -> tuple[np.ndarray, np.ndarray]:
        masked = [{"role": m.get("role"), "content": _PLACEHOLDER.format(k)} for k, m in enumerate(msgs)]
        rendered = self._jinja.render(messages=masked, add_generation_prompt=False,
                                      bos_token="", eos_token="")
        pieces = _SPLIT.split(rendered)  # text, index, text, index, …, text
        contents = [msgs[int(pieces[j])].get("content") or "" for j in range(1, len(pieces), 2)]
        encoded = tok.encode_arrays(contents)
        ids, mask = [], []
        prev_assistant = False
        for j in range(0, len(pieces), 2):
            text_ids = template_tk.encode(pieces[j], add_special_tokens=False).ids if pieces[j] else []
            ids += text_ids
            first_special = bool(prev_assistant and text_ids and _is_special(template_tk, text_ids[0]))
            mask += [1 if (k == 0 and first_special) else 0 for k in range(len(text_ids))]
            if j + 1 < len(pieces):
                m = msgs[int(pieces[j + 1])]
                body = encoded[j // 2]
                train = 1 if m.get("role") == "assistant" else 0
                ids += body.tolist()
                mask += [train] * len(body)
                prev_assistant = bool(train)
        return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def _is_special(tk, token_id: int) -> bool:
    added = tk.get_added_tokens_decoder()
    tok = added.get(token_id)
    return bool(tok is not None and tok.special)


class TemplateRefused(Exception):
    """The chat template called ``raise_exception`` for a conversation (e.g. an unknown role)."""


def _raise(message: str):
    raise TemplateRefused(message)

"""``long_multimodal``: interleaved rows composed into long multimodal samples of exact token budgets.

Input rows are interleaved documents or image–caption pairs (``texts`` and ``images`` aligned). Each
output sample gets one budget from ``targets`` (in turn, or drawn with ``target_weights``) and is
filled in stream order: its length counts every text position encoded with the run tokenizer, every
image at what the target vision-language model charges for it (the ``image_tokens`` section), and the
question and answer when one is added. A sample is filled like this:

1. queued items (the texts and images of the input rows, in order) are taken whole while they fit;
2. the first text that does not fit is cut at a token boundary (encode, keep ``k`` tokens, decode,
   check the piece is a prefix of the text that re-encodes to at most ``k`` tokens) so the sample
   reaches its budget exactly; the rest of that text starts the next sample;
3. an image that does not fit waits, in order, for the next sample, and the search for a text to cut
   goes on past it (at most ``lookahead`` items), unless the sample is already within ``tolerance``.

Every kept sample is within ``tolerance`` of its target. A sample that cannot get there (the end of a
shard, or a long run of images that do not fit) is dropped (``short_sample``) or kept
(``remainder: keep``, metric ``short_kept``).

With an ``insert`` section a share of the samples gets one *needle* at a chosen depth, with a question
and its answer (their tokens count toward the budget):

- ``image``: an image held back from an image–caption pair of the same shard; the question gives the
  caption and asks which image of the sample (numbered from 1 in order of appearance) it describes;
  the answer is that number. Images with the same bytes are kept out of that sample.
- ``text``: a short note carrying a random access code; the question asks for the code.

The needle is placed so that ``depth`` of the other tokens of the sample come before it (a text
position is split at a token boundary to get there; an image is never split: the nearer side wins).

Images whose size is missing (null or not positive) are measured from their header, never decoded;
an image whose header cannot be read is left out (``undecodable_image``), one that costs more than the
largest target is left out (``image_over_target``), an image at a position that also holds a text is
left out (the text is kept: ``image_beside_text``), and an empty row is dropped (``empty_row``): each
is counted and listed in ``failures/``. A text is re-encoded after each cut only near the cut (see
``_tail_ids``), so a long text costs about linear time however many samples it fills (one without
whitespace is re-encoded whole after each cut). Randomness comes from ``(seed, stage, shard, sample
number)``, and a shard is processed alone, so the output does not depend on the number of workers or
on batching.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import orjson
import pyarrow as pa
from pydantic import Field, model_validator

from curate import seeds
from curate.arrays import binaries, numeric, strings
from curate.image_tokens import ImageTokenParams
from curate.registry import register_stage
from curate.schema import IMAGE
from curate.stage import StageParams, Synthesizer

TEXT, PICTURE = 0, 1
NOTE = "A detail worth remembering: the access code is {code}."
NOTE_QUESTION = "Somewhere in this sequence an access code was given. What is it? Reply with the code only."
IMAGE_QUESTION = ("Count the images in this sequence from 1 in the order they appear. Which number is the image "
                  "that fits this description: {caption} Reply with the number only.")
#: Tries of the encode–decode cut before the character search.
_CUT_TRIES = 8
#: A cut text's tail up to this many characters is re-encoded whole; a longer one only up to a verified
#: cut point about ``_TAIL_WINDOW`` characters in (see ``LongMultimodal._tail_ids``).
_TAIL_WHOLE, _TAIL_WINDOW = 32_768, 4_096
#: Output rows per batch, and the byte size at which a batch leaves early.
_BATCH_ROWS, _BATCH_BYTES = 16, 256 << 20
_DROPPED = object()


class InsertParams(StageParams):
    """The ``insert:`` section: needles with a question and answer in a share of the samples."""

    fraction: float = Field(0.5, ge=0, le=1, description="share of samples that get a needle")
    kinds: list[Literal["image", "text"]] = Field(["image", "text"], description="needle kinds to draw from")
    kind_weights: list[float] | None = Field(None, description="probabilities of `kinds` (default uniform)")
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="where the needle goes: share of the "
                                "sample's other tokens before it, drawn uniformly from this list")
    pool: int = Field(16, ge=1, le=4096, description="image–caption pairs held back as image needles")
    caption_max_tokens: int = Field(128, ge=1, description="a pair whose caption is longer is not a needle")
    code_digits: int = Field(6, ge=1, le=18, description="digits of a text needle's access code")

    @model_validator(mode="after")
    def _check(self):
        if not self.kinds:
            raise ValueError("kinds must name at least one needle kind")
        if self.kind_weights is not None:
            if len(self.kind_weights) != len(self.kinds):
                raise ValueError("kind_weights needs one weight per entry of kinds")
            if min(self.kind_weights) < 0 or not sum(self.kind_weights) > 0:
                raise ValueError("kind_weights must be non-negative with a positive sum")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError("depths must be fractions between 0 and 1")
        return self


@dataclass(eq=False)
class _Item:
    """One text or image position waiting to be placed."""

    kind: int
    tokens: int
    row: str | None
    source: str | None = None
    text: str | None = None
    ids: np.ndarray | None = None
    image: dict | None = None
    sha: str | None = None


@dataclass(eq=False)
class _Pair:
    """An image–caption pair held back as a possible image needle."""

    items: list[_Item]
    image: _Item
    caption: str
    row: str


@dataclass
class _Draw:
    target: int
    insert: bool
    kind: str
    depth: float
    code: str


@dataclass
class _Needle:
    item: _Item | None = None
    pair: _Pair | None = None
    question: str | None = None
    answer: str | None = None
    q_tokens: int = 0
    a_tokens: int = 0
    skipped: bool = False
    no_image: bool = False


@dataclass
class _Plan:
    draw: _Draw
    needle: _Item | None
    pair: _Pair | None
    question: str | None
    answer: str | None
    taken: list[int]
    stop: int
    cut: tuple | None = None  # (queue index, head item, tail item or None)
    skipped_insert: bool = False
    no_image: bool = False


@dataclass
class _Shard:
    """Everything that belongs to one shard (never kept on the stage)."""

    seed: int
    key: str
    name: str
    queue: list[_Item] = field(default_factory=list)
    queued: int = 0
    pool: list[_Pair] = field(default_factory=list)
    k: int = 0
    next_try: int = 0
    draws: dict = field(default_factory=dict)


@register_stage("long_multimodal")
class LongMultimodal(Synthesizer):
    """Interleaved rows composed into long multimodal samples at token budgets, with optional needles."""

    class Params(StageParams):
        targets: list[int] = Field([32768], description="token budgets; each sample gets one")
        target_weights: list[float] | None = Field(None, description="draw each sample's target with these "
                                                   "probabilities (default: the targets in turn)")
        tolerance: float = Field(0.01, ge=0, le=0.25, description="a kept sample is within this share of its target")
        remainder: Literal["drop", "keep"] = Field("drop", description="samples that cannot reach target − "
                                                   "tolerance (end of shard): drop or keep, counted either way")
        lookahead: int = Field(256, ge=0, description="items searched past images that do not fit, for a text "
                                                      "to cut")
        image_tokens: ImageTokenParams = Field(default_factory=ImageTokenParams,
                                               description="how many tokens an image costs the target model")
        insert: InsertParams | None = Field(None, description="needles at controlled depths with a question "
                                            "and answer (off when absent)")

        @model_validator(mode="after")
        def _check(self):
            if not self.targets or min(self.targets) < 16:
                raise ValueError("targets must be token budgets of at least 16")
            if self.target_weights is not None:
                if len(self.target_weights) != len(self.targets):
                    raise ValueError("target_weights needs one weight per entry of targets")
                if min(self.target_weights) < 0 or not sum(self.target_weights) > 0:
                    raise ValueError("target_weights must be non-negative with a positive sum")
            return self

    requires = ("id", "texts", "images")
    provides = ("id", "texts", "images", "source", "meta", "n_tokens", "n_image_tokens", "target_tokens",
                "question", "answer")
    needs_tokenizer = True

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return list(self.provides)

    def setup(self, ctx) -> None:
        self.tok = ctx.tokenizer
        self.counter = self.params.image_tokens.counter()

    # ------------------------------------------------------------------ the shard
    def run(self, batches, ctx):
        s = _Shard(ctx.seed, ctx.shard.key, ctx.shard.name)
        st = ctx.stats[self.label]
        out: list[dict] = []
        size = 0
        for batch in batches:
            for _ in self._feed(batch, s, ctx):
                for row in self._compose(s, ctx, final=False):
                    out.append(row)
                    size += _row_bytes(row)
                    if len(out) >= _BATCH_ROWS or size >= _BATCH_BYTES:
                        yield self._batch(out)
                        out, size = [], 0
        # full samples first, while the held-back pairs can still be needles; then everything left
        s.next_try = 0
        tail = list(self._compose(s, ctx, final=True, full_only=True))
        for pair in s.pool:
            s.queue += pair.items
            s.queued += sum(it.tokens for it in pair.items)
        s.pool = []
        tail += list(self._compose(s, ctx, final=True))
        out += tail
        for start in range(0, len(out), _BATCH_ROWS):
            yield self._batch(out[start:start + _BATCH_ROWS])
        st.count("samples_composed", s.k)

    # ------------------------------------------------------------------ input rows → queued items
    def _feed(self, batch: pa.RecordBatch, s: _Shard, ctx):
        """Queue each row's items (or hold a pair back as a needle); yields after each row."""
        st = ctx.stats[self.label]
        ids = batch.column("id").to_pylist()
        texts = batch.column("texts").to_pylist()
        images = batch.column("images").to_pylist()
        sources = batch.column("source").to_pylist() if "source" in batch.schema.names else [None] * len(ids)
        wanted = [t for row in texts for t in (row or []) if t is not None and t.strip()]
        encoded = iter(self.tok.encode_arrays(wanted)) if wanted else iter(())
        largest = max(self.params.targets)
        for row_id, row_texts, row_images, source in zip(ids, texts, images, sources):
            row_texts, row_images = row_texts or [], row_images or []
            if len(row_texts) != len(row_images):
                for t in row_texts:  # keep the encoded texts in step
                    if t is not None and t.strip():
                        next(encoded)
                ctx.failure("misaligned_row", f"row {row_id!r}: {len(row_texts)} texts, {len(row_images)} images",
                            record=row_id, stage=self.label, dropped=True)
                continue
            items: list[_Item] = []
            for j, (text, image) in enumerate(zip(row_texts, row_images)):
                if text is not None and image is not None:  # not the interleaved convention: the text is kept
                    ctx.failure("image_beside_text", f"row {row_id!r}, position {j}: an image beside a text is "
                                "left out", record=row_id, stage=self.label)
                if text is not None:
                    if not text.strip():
                        st.count("blank_texts")
                        continue
                    tok_ids = next(encoded)
                    if len(tok_ids) > largest:
                        st.count("texts_over_target")
                    items.append(_Item(TEXT, len(tok_ids), row_id, source, text=text, ids=tok_ids))
                elif image is not None:
                    item = self._image_item(image, row_id, source, j, ctx, largest)
                    if item is not None:
                        items.append(item)
                else:
                    st.count("empty_positions")
            if not items:
                ctx.failure("empty_row", f"row {row_id!r} has no text or readable image", record=row_id,
                            stage=self.label, dropped=True)
                yield
                continue
            pair = self._as_pair(items, row_id)
            if pair is not None and len(s.pool) < self.params.insert.pool:
                s.pool.append(pair)
            else:
                s.queue += items
                s.queued += sum(it.tokens for it in items)
            yield

    def _image_item(self, image: dict, row_id, source, j: int, ctx, largest: int) -> _Item | None:
        data = image.get("bytes")
        w, h = image.get("width"), image.get("height")
        if not data:
            ctx.failure("undecodable_image", f"row {row_id!r}, position {j}: the image has no bytes",
                        record=row_id, stage=self.label)
            return None
        if not ((w or 0) > 0 and (h or 0) > 0):  # null, 0 or negative: not a size
            w, h = header_size(data)
            if not (w and h):
                ctx.failure("undecodable_image", f"row {row_id!r}, position {j}: the image header cannot be "
                            "read", record=row_id, stage=self.label)
                return None
            image = {**image, "width": w, "height": h}
        cost = self.counter.count_image(image)
        if cost > largest:
            ctx.failure("image_over_target", f"row {row_id!r}, position {j}: a {w}x{h} image costs {cost} tokens, "
                        f"more than the largest target {largest}", record=row_id, stage=self.label)
            return None
        sha = image.get("sha256") or hashlib.sha256(data).hexdigest()
        return _Item(PICTURE, cost, row_id, source, image=image, sha=sha)

    def _as_pair(self, items: list[_Item], row_id: str) -> _Pair | None:
        ins = self.params.insert
        if ins is None or ins.fraction == 0 or "image" not in ins.kinds or _weight(ins, "image") == 0:
            return None
        pictures = [it for it in items if it.kind == PICTURE]
        if len(pictures) != 1 or len(items) < 2:
            return None
        caption = " ".join(it.text.strip() for it in items if it.kind == TEXT)
        if not caption.endswith((".", "!", "?", "…")):
            caption += "."  # the question reads on after it
        if sum(it.tokens for it in items if it.kind == TEXT) > ins.caption_max_tokens:
            return None
        return _Pair(items, pictures[0], caption, row_id)

    # ------------------------------------------------------------------ per-sample draws
    def _draw(self, s: _Shard) -> _Draw:
        if s.k not in s.draws:
            p, ins = self.params, self.params.insert
            rng = seeds.Stream(s.seed, self.label, s.key, s.k)
            if p.target_weights is None:
                target = p.targets[s.k % len(p.targets)]
                rng.random()  # the same draws either way
            else:
                target = p.targets[seeds.pick_weighted(rng.random(), _normalized(p.target_weights))]
            u_insert, u_kind, u_depth = rng.random(), rng.random(), rng.random()
            digits = ins.code_digits if ins is not None else 6
            code = str(1 + rng.below(9)) + "".join(str(rng.below(10)) for _ in range(digits - 1))
            if ins is None:
                draw = _Draw(target, False, "text", 0.0, code)
            else:
                kind = ins.kinds[seeds.pick_weighted(u_kind, _normalized(ins.kind_weights or [1.0] * len(ins.kinds)))]
                depth = ins.depths[min(int(u_depth * len(ins.depths)), len(ins.depths) - 1)]
                draw = _Draw(target, u_insert < ins.fraction, kind, depth, code)
            s.draws = {s.k: draw}
        return s.draws[s.k]

    def _window(self, target: int) -> tuple[int, int]:
        tol = self.params.tolerance
        return math.ceil(target * (1 - tol) - 1e-9), math.floor(target * (1 + tol) + 1e-9)

    # ------------------------------------------------------------------ samples
    def _compose(self, s: _Shard, ctx, final: bool, full_only: bool = False):
        """Yield the samples the queue can make now (all of them when ``final``)."""
        while s.queue:
            target = self._draw(s).target
            if (not final or full_only) and s.queued < max(target, s.next_try):
                return
            plan = self._attempt(s, final, ctx)
            if plan is None:  # ran out of queued items: wait for more input
                s.next_try = s.queued + max(target // 8, 1)
                return
            if plan is _DROPPED:
                continue
            s.next_try = 0
            row = self._commit(s, plan, ctx)
            if row is not None:
                yield row

    def _attempt(self, s: _Shard, final: bool, ctx):
        """The next sample's plan, without changing the queue (None: need more input; _DROPPED: the front
        item could go nowhere and was left out)."""
        draw = self._draw(s)
        needle = self._needle(s, draw)
        qa = needle.q_tokens + needle.a_tokens if needle.item is not None else 0
        answer = needle.answer
        for _ in range(3):  # an image needle's answer (its number) is known once the body is
            budget = draw.target - qa - (needle.item.tokens if needle.item is not None else 0)
            filled = self._fill(s, final, budget, needle.item, draw.target, ctx)
            if filled is None or filled is _DROPPED:
                return filled
            taken, stop, cut = filled
            if needle.item is None or needle.item.kind != PICTURE:
                break
            body = [s.queue[j] for j in taken] + ([cut[1]] if cut is not None else [])
            answer = str(_image_number(body, draw.depth))
            now = needle.q_tokens + self._count(answer)
            if now == qa:
                break
            qa = now
        return _Plan(draw, needle.item, needle.pair, needle.question, answer, taken, stop, cut,
                     needle.skipped, needle.no_image)

    def _fill(self, s: _Shard, final: bool, budget: int, needle: _Item | None, target: int, ctx):
        """(taken queue indices, where the scan stopped, the cut text or None) for a body of ``budget``."""
        lo, _ = self._window(target)
        slack = target - lo
        taken: list[int] = []
        used, skipped, i = 0, 0, 0
        q = s.queue
        cut = None
        while used < budget:
            if i >= len(q):
                if not final:
                    return None
                break
            it = q[i]
            clash = it.kind == PICTURE and needle is not None and needle.sha == it.sha
            if not clash and used + it.tokens <= budget:
                taken.append(i)
                used += it.tokens
                i += 1
                continue
            if not clash and it.kind == TEXT:
                piece = self._cut(it, budget - used)
                if piece is not None:
                    cut = (i, *piece)
                    used += piece[0].tokens
                    break
            if budget - used <= slack:
                break
            skipped += 1
            i += 1
            if skipped > self.params.lookahead:
                break
        if not taken and cut is None:
            self._drop_front(s, needle, budget, ctx)
            return _DROPPED
        return taken, i, cut

    def _drop_front(self, s: _Shard, needle: _Item | None, budget: int, ctx) -> None:
        """The sample could take nothing: the front item can never go into it; leave it out, counted."""
        it = s.queue.pop(0)
        s.queued -= it.tokens
        if it.kind == PICTURE and needle is not None and needle.sha == it.sha:
            reason, detail = "duplicate_image", "the same image bytes as the sample's needle"
        elif it.kind == PICTURE:
            reason, detail = "image_over_target", f"an image of {it.tokens} tokens exceeds a sample budget of {budget}"
        else:
            reason, detail = "uncuttable_text", f"no prefix of a {it.tokens}-token text fits {budget} tokens"
        ctx.failure(reason, f"row {it.row!r}: {detail}", record=it.row, stage=self.label)

    def _needle(self, s: _Shard, draw: _Draw) -> _Needle:
        """The needle a sample with ``draw`` gets now (``item`` None when it gets none)."""
        if not draw.insert:
            return _Needle()
        kind, no_image = draw.kind, False
        if kind == "image" and not s.pool:
            kind, no_image = "text", True
        if kind == "image":
            pair = s.pool[0]
            out = _Needle(pair.image, pair, IMAGE_QUESTION.format(caption=pair.caption), "1")
        else:
            note = NOTE.format(code=draw.code)
            ids = self.tok.encode_arrays([note])[0]
            out = _Needle(_Item(TEXT, len(ids), None, text=note, ids=ids), None, NOTE_QUESTION, draw.code)
        out.no_image = no_image
        out.q_tokens, out.a_tokens = self._count(out.question), self._count(out.answer)
        if out.item.tokens + out.q_tokens + out.a_tokens > draw.target // 2:  # at most half the sample
            return _Needle(skipped=True, no_image=no_image)
        return out

    def _count(self, text: str) -> int:
        return len(self.tok.encode_arrays([text])[0])

    def _cut(self, it: _Item, k: int):
        """(head item of at most ``k`` tokens, tail item or None) of text item ``it``; None if none fits.

        The head is a prefix of the text: the first ``j`` tokens decoded (``j`` from ``k`` down a few),
        kept when the text starts with it and it encodes back to at most ``k`` tokens. When no such
        prefix has exactly ``k`` tokens, prefixes near it are searched by characters.
        """
        if k <= 0:
            return None
        text, ids = it.text, it.ids
        best = None  # (characters, ids of text[:characters])
        for j in range(min(k, len(ids)), max(0, k - _CUT_TRIES), -1):
            at = _prefix_end(text, self.tok.tk.decode(ids[:j].tolist(), skip_special_tokens=False))
            if not at or at >= len(text):
                continue
            head_ids = self.tok.encode_arrays([text[:at]])[0]
            if len(head_ids) <= k and (best is None or len(head_ids) > len(best[1])):
                best = (at, head_ids)
                if len(head_ids) == k:
                    break
        if best is None or len(best[1]) < k:
            found = self._search(text, ids, k, best[0] if best is not None else 0)
            if found is not None and (best is None or len(found[1]) > len(best[1])):
                best = found
        if best is None:
            return None
        at, head_ids = best
        head, rest = text[:at], text[at:]
        head_item = _Item(TEXT, len(head_ids), it.row, it.source, text=head, ids=head_ids)
        if not rest.strip():
            return head_item, None
        rest_ids = self._tail_ids(it, at)
        return head_item, _Item(TEXT, len(rest_ids), it.row, it.source, text=rest, ids=rest_ids)

    def _tail_ids(self, it: _Item, at: int) -> np.ndarray:
        """The ids of ``it.text[at:]``. A long tail is not re-encoded whole (a text cut into many samples
        would cost time quadratic in its length): past a cut point ``c`` a little after ``at``, verified
        as the run tokenizer verifies its own split points (the text encodes as its two sides do), the
        ids are the item's own from ``c`` on, and only ``text[at:c]`` is encoded. Without such a point
        (no whitespace) the tail is encoded whole."""
        text = it.text
        if len(text) - at <= _TAIL_WHOLE:
            return self.tok.encode_arrays([text[at:]])[0]
        c = self.tok._safe_cut(text, at + _TAIL_WINDOW, at)
        if c is None:
            return self.tok.encode_arrays([text[at:]])[0]
        skip = len(self.tok.encode_arrays([text[:c]])[0])
        return np.concatenate([self.tok.encode_arrays([text[at:c]])[0], it.ids[skip:]]).astype(np.int32)

    def _search(self, text: str, ids: np.ndarray, k: int, lo: int):
        """The longest prefix (at least ``lo`` characters) that encodes to at most ``k`` tokens, by
        bisection over characters up to a little past what ``k`` + a few tokens decode to."""
        reach = len(self.tok.tk.decode(ids[:k + _CUT_TRIES].tolist(), skip_special_tokens=False))
        hi = min(len(text) - 1, max(reach + 16, lo))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.tok.encode_arrays([text[:mid]])[0]) <= k:
                lo = mid
            else:
                hi = mid - 1
        if lo <= 0:
            return None
        head_ids = self.tok.encode_arrays([text[:lo]])[0]
        return (lo, head_ids) if 0 < len(head_ids) <= k else None

    def _commit(self, s: _Shard, plan: _Plan, ctx) -> dict | None:
        """Take the planned items off the queue and finish the sample (None when it is dropped)."""
        st = ctx.stats[self.label]
        q = s.queue
        taken = set(plan.taken)
        body = [q[j] for j in plan.taken]
        if plan.cut is not None:
            at, head, tail = plan.cut
            body.append(head)
            st.count("texts_cut")
            rest = [q[j] for j in range(at) if j not in taken] + ([tail] if tail is not None else []) + q[at + 1:]
        else:
            rest = [q[j] for j in range(plan.stop) if j not in taken] + q[plan.stop:]
        s.queue = rest
        s.queued = sum(it.tokens for it in rest)
        if plan.pair is not None:
            s.pool.remove(plan.pair)
        k = s.k
        s.k += 1
        s.draws = {}
        return self._finish(s, k, plan, body, ctx)

    def _finish(self, s: _Shard, k: int, plan: _Plan, body: list[_Item], ctx) -> dict | None:
        st = ctx.stats[self.label]
        draw = plan.draw
        insert = None
        question, answer = plan.question, plan.answer
        qa = self._count(question) + self._count(answer) if question is not None else 0
        lo, hi = self._window(draw.target)
        if plan.needle is not None:
            placed = self._place(body, plan.needle, draw.depth, split=True)
            if not lo <= _tokens(placed[0]) + qa <= hi:  # the split text re-encoded to another length
                placed = self._place(body, plan.needle, draw.depth, split=False)
            body, position, offset = placed
            others = _tokens(body) - plan.needle.tokens
            insert = {"kind": "image" if plan.needle.kind == PICTURE else "text", "depth": draw.depth,
                      "position": position, "offset": offset, "needle_tokens": plan.needle.tokens,
                      "depth_actual": round(offset / others, 4) if others else 0.0}
            if plan.needle.kind == PICTURE:
                number = 1 + sum(1 for it in body[:position] if it.kind == PICTURE)
                if str(number) != answer:  # _image_number mirrors _place: never happens
                    raise AssertionError(f"image needle numbered {number}, planned {answer}")
                insert.update(image_index=number, source=plan.pair.row)
        n_image = sum(it.tokens for it in body if it.kind == PICTURE)
        n_text = sum(it.tokens for it in body if it.kind == TEXT)
        total = n_text + n_image + qa
        short = total < lo
        if total > hi:  # only a depth split that re-encodes longer could do this
            st.drop("over_target")
            return None
        if short and self.params.remainder == "drop":
            st.drop("short_sample")
            return None
        if short:
            st.count("short_kept")
        # what the kept samples got, counted on them alone
        if insert is not None:
            st.count(f"insert_{insert['kind']}")
        if plan.skipped_insert:
            st.count("insert_skipped")
        if plan.no_image:
            st.count("no_image_needle")
        lineage: list[str] = []
        for it in body:
            if it.row is not None and it.row not in lineage:
                lineage.append(it.row)
        sources = {it.source for it in body if it.row is not None}
        meta = {"lineage": lineage, "target": draw.target, "insert": insert}
        if short:
            meta["short"] = True
        return {"id": f"lmm-{s.name}-{k}",
                "texts": [it.text if it.kind == TEXT else None for it in body],
                "images": [it.image if it.kind == PICTURE else None for it in body],
                "source": sources.pop() if len(sources) == 1 else None,
                "meta": orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode(),
                "n_tokens": total, "n_image_tokens": n_image, "target_tokens": draw.target,
                "question": question, "answer": answer}

    def _place(self, body: list[_Item], needle: _Item, depth: float, split: bool) -> tuple[list[_Item], int, int]:
        """Insert ``needle`` so that ``depth`` of the body's tokens precede it: (body, position, offset).
        With ``split``, a text it falls inside is cut in two there; else the nearer side of the item wins."""
        total = sum(it.tokens for it in body)
        want = round(depth * total)
        acc = 0
        for idx, it in enumerate(body):
            if acc >= want:
                return body[:idx] + [needle] + body[idx:], idx, acc
            if acc + it.tokens > want:
                inside = want - acc
                if split and it.kind == TEXT:
                    piece = self._cut(it, inside)
                    if piece is not None and piece[1] is not None:
                        head, tail = piece
                        return body[:idx] + [head, needle, tail] + body[idx + 1:], idx + 1, acc + head.tokens
                if inside * 2 <= it.tokens:
                    return body[:idx] + [needle] + body[idx:], idx, acc
                return body[:idx + 1] + [needle] + body[idx + 1:], idx + 1, acc + it.tokens
            acc += it.tokens
        return body + [needle], len(body), acc

    # ------------------------------------------------------------------ output
    def _batch(self, rows: list[dict]) -> pa.RecordBatch:
        lengths = np.fromiter((len(r["texts"]) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat_texts = [t for r in rows for t in r["texts"]]
        flat_images = [im for r in rows for im in r["images"]]
        present = np.fromiter((im is not None for im in flat_images), dtype=bool, count=len(flat_images))
        ints = {name: numeric(np.fromiter(((im or {}).get(name) or 0 for im in flat_images), dtype=np.int32,
                                          count=len(flat_images))) for name in ("width", "height")}
        children = [binaries([im["bytes"] if im is not None else None for im in flat_images]),
                    strings([im.get("mime") if im is not None else None for im in flat_images]),
                    strings([im.get("sha256") if im is not None else None for im in flat_images]),
                    ints["width"], ints["height"]]
        structs = pa.StructArray.from_arrays(children, fields=list(IMAGE), mask=numeric(~present))
        arrays = {
            "id": strings([r["id"] for r in rows]),
            "texts": pa.ListArray.from_arrays(numeric(offsets), strings(flat_texts)),
            "images": pa.ListArray.from_arrays(numeric(offsets), structs),
            "source": strings([r["source"] for r in rows]),
            "meta": strings([r["meta"] for r in rows]),
            "n_tokens": numeric(np.array([r["n_tokens"] for r in rows], np.int32)),
            "n_image_tokens": numeric(np.array([r["n_image_tokens"] for r in rows], np.int32)),
            "target_tokens": numeric(np.array([r["target_tokens"] for r in rows], np.int32)),
            "question": strings([r["question"] for r in rows]),
            "answer": strings([r["answer"] for r in rows]),
        }
        return pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))


def header_size(data: bytes) -> tuple[int | None, int | None]:
    """``(width, height)`` as displayed (EXIF orientation applied) from the header alone; ``(None, None)``
    when the header cannot be read. Pixels are never decoded. This is :func:`curate.images.image_size`,
    the size every other image stage and ``count_tokens`` read (a copy kept here swapped the sides of an
    EXIF-rotated TIFF, which Pillow already reports upright, so its token count differed)."""
    from curate.images import image_size

    return image_size(data)


def _prefix_end(text: str, head: str) -> int | None:
    """Where ``head`` (decoded tokens) ends in ``text`` when it is a prefix of it, allowing for leading
    whitespace a decoder drops (SentencePiece's word marker on the first token); else None."""
    if not head:
        return None
    if text.startswith(head):
        return len(head)
    lead = len(text) - len(text.lstrip())
    bare = head.lstrip()
    if lead and bare and text.startswith(bare, lead):
        return lead + len(bare)
    return None


def _tokens(items: list[_Item]) -> int:
    return sum(it.tokens for it in items)


def _image_number(body: list[_Item], depth: float) -> int:
    """The 1-based number among the images of the needle that :meth:`LongMultimodal._place` puts at ``depth``."""
    want = round(depth * sum(it.tokens for it in body))
    acc, n = 0, 0
    for it in body:
        if acc >= want:
            break
        if acc + it.tokens > want:
            if it.kind == PICTURE and (want - acc) * 2 > it.tokens:
                n += 1
            break
        n += it.kind == PICTURE
        acc += it.tokens
    return n + 1


def _row_bytes(row: dict) -> int:
    return sum(len(t) for t in row["texts"] if t) + sum(len(im["bytes"]) for im in row["images"] if im)


def _normalized(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def _weight(ins: InsertParams, kind: str) -> float:
    weights = _normalized(ins.kind_weights or [1.0] * len(ins.kinds))
    return sum(w for k, w in zip(ins.kinds, weights) if k == kind)

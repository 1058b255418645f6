"""``utk``: Untie the Knots chunk-shuffle augmentation (Tian et al., ACL 2025), on packed windows.

Tokenized documents are grouped, in stream order, into windows of at most ``seq_len`` tokens
*including* the tokens the augmentation adds, so no original token is ever truncated (the multiset of
tokens is preserved). A document longer than one window is first cut into window-sized pieces.

Per window, following the authors' ``denoise_text_multi_hop``:

1. with probability ``augment_fraction`` the window is augmented (else its documents are concatenated
   unchanged, with document boundaries in ``doc_offsets``);
2. each document is split into ``n`` chunks, ``n`` drawn from ``chunks`` (weights ``chunk_weights``);
   split points are random (``split: random``), equal, or fixed ``span``-token pieces; a document
   shorter than ``n`` tokens stays whole;
3. the boundary ``b`` between chunks ``b-1`` and ``b`` gets its own pair of knot tokens: chunk ``b-1``
   ends with ``<|knot_b_tail|>`` and chunk ``b`` starts with ``<|knot_b_head|>``. With fixed spans the
   knots carry the chunk's own 0-based number, as the reference numbers them: chunk ``j`` starts with
   ``<|knot_head|> j <|knot_head_end|>`` and ends with ``<|knot_tail|> j <|knot_tail_end|>`` (so the
   boundary between chunks ``j`` and ``j+1`` reads ``… tail j`` / ``head j+1 …``);
4. all chunks of all documents are shuffled jointly, except the last chunk of the last document, which
   stays at the end; with ``preserve_order`` (default) each document keeps its own chunk order;
5. with ``backtrace``, each chunk of a split document is prefixed ``<D> id </D>`` (a random 6-character
   id per chunk) and the document's last-appearing chunk is followed by ``<S> id0 <s> id1 … </S>``, the
   ids in original order;
6. ``loss_mask`` (aligned with ``input_ids``: 1 where the token is a training target, predicted from
   the tokens before it) is 0 exactly where the reference masks: a target whose input (the token
   before) or itself is a knot, whose input lies in a ``<D> … </D>`` span, that is ``<D>`` or ``<S>``,
   or whose input is ``</S>``; and, as the reference's end-of-document masking does (every document
   there ends with EOD and the target after an EOD is masked), the first token of every chunk, of
   every document and of the window: no trained target ever has its input in another chunk, so none
   crosses from one document to another, augmented or not.

An augmented window is one attention unit (``doc_offsets = [0, n]``): its chunks must see each other.
Randomness is derived from ``(seed, stage, first document id)`` per window and ``(seed, stage, id)``
per document, so the output does not depend on batching or on the number of workers.

Parameters that can never be satisfied (chunk counts or spans no window can hold once augmented, ids
that never encode to ``id_max_tokens`` tokens, weights that select nothing) are refused with a
:class:`~curate.errors.ConfigError` naming the parameter: statically by the ``Params`` validator, and in
:meth:`ChunkShuffle.setup` where the answer depends on the run tokenizer. Every loop is bounded.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate import seeds
from curate.arrays import int_lists, numeric, string_lists, strings, struct_lists
from curate.errors import ConfigError
from curate.registry import register_stage
from curate.stage import StageParams, Synthesizer
from curate.stages.tokenize import id_lists, list_parts

D_OPEN, D_CLOSE, S_OPEN, S_SEP, S_CLOSE = "<D>", "</D>", "<S>", "<s>", "</S>"
FIXED_KNOTS = ("<|knot_head|>", "<|knot_head_end|>", "<|knot_tail|>", "<|knot_tail_end|>")
_ALPHABET_STR = string.ascii_letters + string.digits
#: Random ids drawn at setup to check that ``id_max_tokens`` can be met, and the share that must fit.
_ID_PROBES, _ID_MIN_FIT = 256, 0.01
#: Most id draws for one document before giving up (only reachable if the probe was badly unlucky).
_ID_MAX_DRAWS = 100_000


def knot_pair(boundary: int) -> tuple[str, str]:
    """The (tail, head) knot strings of boundary ``boundary`` (1-based)."""
    return f"<|knot_{boundary}_tail|>", f"<|knot_{boundary}_head|>"


@dataclass
class _Doc:
    """One document (or piece) planned for a window: its chunks with knots, ids and overhead."""

    id: str
    blocks: list[np.ndarray]  # per chunk: [<D> id </D>] + [head] + tokens + [tail]
    kinds: list[np.ndarray]  # per chunk, per position: 0 text, 1 knot, 2 inside <D> … </D>
    trailer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # <S> id0 <s> id1 … </S>
    length: int = 0


@register_stage("utk")
class ChunkShuffle(Synthesizer):
    """UtK: chunk, knot, shuffle and backtrace documents inside packed windows."""

    class Params(StageParams):
        seq_len: int = Field(32768, ge=64, description="window length, augmentation tokens included")
        chunks: list[int] = Field([2, 3], description="chunk counts a document may be split into")
        chunk_weights: list[float] | None = Field(None, description="probabilities of `chunks` (default uniform)")
        augment_fraction: float = Field(0.8, ge=0, le=1, description="share of windows augmented")
        split: Literal["random", "equal", "fixed"] = Field("random", description="where chunk boundaries fall")
        span: int = Field(1024, ge=1, description="chunk length for split: fixed")
        preserve_order: bool = Field(True, description="each document keeps its own chunk order")
        backtrace: bool = Field(True, description="add <D> id </D> prefixes and the <S> … </S> order target")
        id_chars: int = Field(6, ge=1, le=32, description="length of the random chunk ids")
        id_max_tokens: int = Field(8, ge=1, description="redraw an id that encodes to more tokens")
        render_text: bool = Field(False, description="add a `text` column with the window decoded")

        @model_validator(mode="after")
        def _check(self):
            """Refuse what no window could ever satisfy (what depends on the tokenizer: ``setup``)."""
            if not self.chunks or min(self.chunks) < 1:
                raise ValueError("chunks must be positive counts")
            if max(self.chunks) > self.seq_len:
                raise ValueError(f"chunks: a document split into {max(self.chunks)} chunks can never fit "
                                 f"a window of seq_len {self.seq_len}")
            if self.chunk_weights is not None:
                if len(self.chunk_weights) != len(self.chunks):
                    raise ValueError("chunk_weights needs one weight per entry of chunks")
                if min(self.chunk_weights) < 0 or not sum(self.chunk_weights) > 0:
                    raise ValueError("chunk_weights must be non-negative with a positive sum")
            if self.split == "fixed" and self.span >= self.seq_len:
                raise ValueError(f"span: fixed chunks of {self.span} tokens leave nothing to split in a window "
                                 f"of seq_len {self.seq_len} (span must be below seq_len)")
            return self

    requires = ("id", "input_ids")
    provides = ("input_ids", "loss_mask", "doc_offsets", "n_tokens", "n_image_tokens", "lineage", "utk_chunks")
    needs_tokenizer = True

    def special_tokens(self) -> list[str]:
        if self.params.split == "fixed":
            knots = list(FIXED_KNOTS)
        else:
            knots = [k for b in range(1, max(self.params.chunks)) for k in knot_pair(b)]
        return knots + ([D_OPEN, D_CLOSE, S_OPEN, S_SEP, S_CLOSE] if self.params.backtrace else [])

    def columns_out(self, columns_in: list[str]) -> list[str]:
        keep = [c for c in ("id",) if c in columns_in]
        return keep + [c for c in self.provides if c != "id"] + (["text"] if self.params.render_text else [])

    def setup(self, ctx) -> None:
        """Load the marker ids and check, against the run tokenizer, that the parameters can be met.

        Raises :class:`ConfigError` naming the parameter when: two markers (or a marker and the
        end-of-text token) share an id; ``id_max_tokens`` is (almost) never met by ``id_chars``-character
        ids; or no document piece that fits a window once augmented is long enough to be split into the
        smallest chunk count (``chunks``) or into more than one ``span`` (``split: fixed``).
        """
        tok = ctx.tokenizer
        self.tok = tok
        self._weights = _weights(self.params)
        self._digits: dict[int, list[int]] = {}
        self._knot_prefix: list[int] = [0]  # fixed split: knot tokens by chunk count (_knots_length)
        self._id_cache: dict[tuple[str, int], list[list[int]]] = {}  # this batch's chunk ids (_batch_chunk_ids)
        augments = self.params.augment_fraction > 0  # with 0, nothing is ever split: nothing to check
        if augments and self.params.backtrace:
            self._check_ids()
        self.piece_size = self._piece_size(self.params.seq_len)
        if augments:
            self._check_splittable()
        self.sp = {t: tok.special_id(t) for t in self.special_tokens()}
        ids = list(self.sp.values())
        if len(set(ids)) != len(ids) or (tok.eos_id is not None and tok.eos_id in ids):
            raise ConfigError(f"{self.label}: the run tokenizer gives UtK markers shared ids {self.sp} "
                              f"(end-of-text {tok.eos_id}); prepare the run tokenizer again (--restart)")

    def _check_ids(self) -> None:
        p = self.params
        rng = seeds.Stream(0, self.label, "id-probe")
        lengths = [len(x) for x in self.tok.encode_batch([_id_text(rng, p.id_chars) for _ in range(_ID_PROBES)])]
        fit = sum(n <= p.id_max_tokens for n in lengths) / len(lengths)
        if fit < _ID_MIN_FIT:
            need = sorted(lengths)[int(0.99 * len(lengths))]
            raise ConfigError(f"{self.label}.id_max_tokens: {p.id_max_tokens} is (almost) never enough: "
                              f"{fit:.1%} of random {p.id_chars}-character ids encode to that few tokens with "
                              f"this tokenizer; use id_max_tokens >= {need} or fewer id_chars")

    def _check_splittable(self) -> None:
        p = self.params
        if p.split == "fixed":
            if self.piece_size <= p.span:
                raise ConfigError(f"{self.label}.span: a window of seq_len {p.seq_len} holds at most "
                                  f"{self.piece_size} document tokens once augmented, never more than one "
                                  f"span of {p.span}; lower span or raise seq_len")
            return
        counts = [n for n, w in zip(p.chunks, _weights(p), strict=True) if n >= 2 and w > 0]
        if counts and self.piece_size < min(counts):
            raise ConfigError(f"{self.label}.chunks: a window of seq_len {p.seq_len} holds at most "
                              f"{self.piece_size} document tokens once augmented, too few to split a document "
                              f"into {min(counts)} chunks with its knots"
                              f"{' and backtrace (id_max_tokens ' + str(p.id_max_tokens) + ')' if p.backtrace else ''}"
                              "; raise seq_len or lower chunks")

    # ------------------------------------------------------------------ stream → windows
    def run(self, batches, ctx):
        p = self.params
        piece_size = self.piece_size
        window: list[tuple[str, np.ndarray]] = []
        planned: list[_Doc] = []
        used, aug = 0, False
        rows: list[dict] = []
        for batch in batches:
            ids = batch.column("id").to_pylist()
            offsets, values = list_parts(batch.column("input_ids"))
            pieces = [piece for i, doc_id in enumerate(ids)
                      for piece in self._pieces(doc_id, values[offsets[i]:offsets[i + 1]], piece_size)]
            # where each piece would be cut if its window is augmented: with backtrace, drawn for every piece
            # now (their chunk ids are encoded together) and used again by _plan; else drawn by _plan
            # for the pieces of augmented windows only
            if p.backtrace and p.augment_fraction:
                cuts = [self._cuts(seeds.Stream(ctx.seed, self.label, piece_id), len(piece))
                        for piece_id, piece in pieces]
                self._id_cache = self._batch_chunk_ids(ctx.seed, pieces, cuts)
            else:
                cuts, self._id_cache = [None] * len(pieces), {}
            for (piece_id, piece), piece_cuts in zip(pieces, cuts, strict=True):
                if not window:
                    aug = self._augmented(ctx.seed, piece_id)
                doc = self._plan(ctx.seed, piece_id, piece, aug, piece_cuts)
                if window and used + doc.length > p.seq_len:
                    rows.append(self._emit(ctx.seed, window, planned, aug))
                    window, planned, used = [], [], 0
                    was, aug = aug, self._augmented(ctx.seed, piece_id)
                    if aug != was:  # else the plan is the same
                        doc = self._plan(ctx.seed, piece_id, piece, aug, piece_cuts)
                if doc.length > p.seq_len:  # _overhead_bound guarantees this never happens
                    raise AssertionError(f"{piece_id}: {doc.length} tokens once augmented > seq_len")
                window.append((piece_id, piece))
                planned.append(doc)
                used += doc.length
            if rows:
                yield self._batch(rows)
                rows = []
        self._id_cache = {}  # the stage object serves the next shard: keep nothing of this one
        if window:
            rows.append(self._emit(ctx.seed, window, planned, aug))
        if rows:
            yield self._batch(rows)

    def _pieces(self, doc_id: str, tokens: np.ndarray, size: int):
        if len(tokens) <= size:
            yield doc_id, tokens
            return
        for k, start in enumerate(range(0, len(tokens), size)):
            yield f"{doc_id}#{k}", tokens[start:start + size]

    def _augmented(self, seed: int, first_id: str) -> bool:
        return bool(seeds.doc_uniform(seed, f"{self.label}/window", [first_id])[0] < self.params.augment_fraction)

    # ------------------------------------------------------------------ one document
    def _plan(self, seed: int, doc_id: str, tokens: np.ndarray, aug: bool, cuts: list[int] | None = None) -> _Doc:
        """The chunks of one piece; ``cuts``: where it is cut when augmented (drawn here when None)."""
        p = self.params
        if not aug:
            cuts = []
        elif cuts is None:
            cuts = self._cuts(seeds.Stream(seed, self.label, doc_id), len(tokens))
        bounds = [0, *cuts, len(tokens)]
        n = len(bounds) - 1
        if n == 1:  # not augmented (or too short to split): the document as it is
            return _Doc(doc_id, [tokens], [np.zeros(len(tokens), np.int8)], length=len(tokens))
        blocks, kinds = [], []
        chunk_ids = None
        if p.backtrace:
            chunk_ids = self._id_cache.get((doc_id, n)) or self._chunk_ids(seed, doc_id, n)
        for j in range(n):
            pre = [self.sp[D_OPEN], *chunk_ids[j], self.sp[D_CLOSE]] if chunk_ids is not None else []
            head = self._head(j) if j > 0 else []
            tail = self._tail(j) if j < n - 1 else []
            body = tokens[bounds[j]:bounds[j + 1]]
            blocks.append(np.concatenate([np.array(pre + head, np.int64), body, np.array(tail, np.int64)]))
            kinds.append(np.repeat(np.array([2, 1, 0, 1], np.int8), [len(pre), len(head), len(body), len(tail)]))
        trailer: list[int] = []
        if chunk_ids is not None:
            trailer = [self.sp[S_OPEN]]
            for j, cid in enumerate(chunk_ids):
                trailer += ([self.sp[S_SEP]] if j else []) + cid
            trailer.append(self.sp[S_CLOSE])
        trail = np.array(trailer, np.int64)
        return _Doc(doc_id, blocks, kinds, trail, sum(map(len, blocks)) + len(trail))

    def _cuts(self, rng: seeds.Stream, length: int) -> list[int]:
        p = self.params
        if p.split == "fixed":
            return list(range(p.span, length, p.span))
        n = p.chunks[seeds.pick_weighted(rng.random(), self._weights)]
        if n < 2 or length < n:
            return []
        if p.split == "equal":
            return [length // n * k for k in range(1, n)]
        return [c + 1 for c in rng.distinct(length - 1, n - 1)]

    def _chunk_ids(self, seed: int, doc_id: str, n: int) -> list[list[int]]:
        """``n`` random ids (``id_chars`` letters/digits each), encoded; ids too long to encode are redrawn.

        Ids come from their own stream per document, so they do not depend on how the document was split.
        Redraws are bounded (``setup`` checked that ids fit often enough); running out raises ConfigError.
        """
        return self._draw_ids(seed, [(doc_id, n)])[(doc_id, n)]

    def _batch_chunk_ids(self, seed: int, pieces: list[tuple[str, np.ndarray]],
                         cuts: list[list[int]]) -> dict[tuple[str, int], list]:
        """The chunk ids of every piece of a batch that augmentation would split, encoded together.

        One ``encode_batch`` call per round for the whole batch instead of one per document (the ids are
        the same: each piece draws from its own stream, in the same order). Pieces of windows that end up
        not augmented get ids they never use: encoding a few short strings costs less than a call.
        """
        wanted = [(piece_id, len(piece_cuts) + 1) for (piece_id, _), piece_cuts in zip(pieces, cuts, strict=True)
                  if piece_cuts]
        return self._draw_ids(seed, wanted) if wanted else {}

    def _draw_ids(self, seed: int, wanted: list[tuple[str, int]]) -> dict[tuple[str, int], list[list[int]]]:
        """``n`` encoded ids for each ``(doc_id, n)``; a round draws what every document still lacks."""
        p = self.params
        streams = {key: seeds.Stream(seed, f"{self.label}/ids", key[0]) for key in wanted}
        out: dict[tuple[str, int], list[list[int]]] = {key: [] for key in streams}
        drawn = dict.fromkeys(streams, 0)
        short = list(streams)
        while short:
            owners, texts = [], []
            for key in short:
                if drawn[key] >= _ID_MAX_DRAWS:
                    raise ConfigError(f"{self.label}.id_max_tokens: {drawn[key]} random ids drawn for {key[0]!r} "
                                      f"and too few encode to {p.id_max_tokens} tokens or fewer; raise it")
                missing = key[1] - len(out[key])
                texts += [_id_text(streams[key], p.id_chars) for _ in range(missing)]
                owners += [key] * missing
                drawn[key] += missing
            for key, ids in zip(owners, self.tok.encode_batch(texts), strict=True):
                if len(ids) <= p.id_max_tokens:
                    out[key].append(ids)
            short = [key for key in short if len(out[key]) < key[1]]
        return out

    def _number(self, j: int) -> list[int]:
        if j not in self._digits:
            self._digits[j] = self.tok.encode_batch([str(j)])[0]
        return self._digits[j]

    def _head(self, j: int) -> list[int]:
        """The knot that starts chunk ``j`` (j ≥ 1)."""
        if self.params.split != "fixed":
            return [self.sp[knot_pair(j)[1]]]
        return [self.sp[FIXED_KNOTS[0]], *self._number(j), self.sp[FIXED_KNOTS[1]]]

    def _tail(self, j: int) -> list[int]:
        """The knot that ends chunk ``j`` (not the last chunk)."""
        if self.params.split != "fixed":
            return [self.sp[knot_pair(j + 1)[0]]]
        return [self.sp[FIXED_KNOTS[2]], *self._number(j), self.sp[FIXED_KNOTS[3]]]

    def _knots_length(self, n: int) -> int:
        """Tokens of all knots of a document split into ``n`` chunks."""
        if self.params.split != "fixed":
            return 2 * (n - 1)
        prefix = self._knot_prefix  # prefix[k]: knot tokens of a document of k + 1 chunks
        if len(prefix) < n:
            missing = [j for j in range(n) if j not in self._digits]
            for j, digits in zip(missing, self.tok.encode_batch([str(j) for j in missing]), strict=True):
                self._digits[j] = digits
            for k in range(len(prefix), n):  # the boundary between chunks k-1 and k: tail k-1, head k
                prefix.append(prefix[-1] + 4 + len(self._digits[k - 1]) + len(self._digits[k]))
        return prefix[n - 1]

    def _piece_size(self, seq_len: int) -> int:
        """The longest piece that still fits a window alone once augmented (binary search).

        Valid because :meth:`_overhead_bound` never decreases with the length. At least 1: a piece too
        short to be split gets no overhead.
        """
        lo, hi = 1, seq_len
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid + self._overhead_bound(mid) <= seq_len:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _overhead_bound(self, length: int) -> int:
        """Most tokens augmentation can add to a document of ``length`` tokens (non-decreasing in length).

        The largest chunk count that can apply: ``ceil(length / span)`` with fixed spans, else the largest
        entry of ``chunks`` (of positive weight) that is at most ``length`` (shorter documents stay whole).
        """
        p = self.params
        if p.split == "fixed":
            n = -(-length // p.span)
        else:
            n = max((c for c, w in zip(p.chunks, _weights(p), strict=True) if c <= length and w > 0), default=1)
        if n < 2:
            return 0
        back = (n * (2 + p.id_max_tokens) + 2 + n * p.id_max_tokens + (n - 1)) if p.backtrace else 0
        return self._knots_length(n) + back

    # ------------------------------------------------------------------ one window
    def _emit(self, seed: int, window, planned: list[_Doc], aug: bool) -> dict:
        p = self.params
        parts = [(d, j) for d, doc in enumerate(planned) for j in range(len(doc.blocks))]
        if aug and len(parts) > 1:
            rng = seeds.rng(seed, f"{self.label}/shuffle", planned[0].id)
            head, last = parts[:-1], parts[-1]
            order = [head[i] for i in rng.permutation(len(head))]
            if p.preserve_order:
                order = _keep_document_order(order)
            parts = order + [last]
        last_seen = {d: k for k, (d, _) in enumerate(parts)}
        pieces: list[np.ndarray] = []
        kinds: list[np.ndarray] = []
        chunks = []
        at = 0
        for k, (d, j) in enumerate(parts):
            doc = planned[d]
            start = at
            pieces.append(doc.blocks[j])
            kinds.append(doc.kinds[j])
            at += len(doc.blocks[j])
            if len(doc.trailer) and last_seen[d] == k:
                pieces.append(doc.trailer)
                kinds.append(np.zeros(len(doc.trailer), np.int8))
                at += len(doc.trailer)
            chunks.append({"doc": d, "part": j, "start": start, "end": at})
        tokens = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
        ids = tokens
        loss = self._loss_mask(tokens, np.concatenate(kinds) if kinds else np.zeros(0, np.int8),
                               [c["start"] for c in chunks])
        if aug:
            offsets = [0, int(len(ids))]
        else:
            offsets = [0, *np.cumsum([doc.length for doc in planned]).tolist()]
        lineage = [doc.id for doc in planned]
        return {"id": "utk:" + seeds.digest(*lineage, size=8).hex(), "input_ids": ids, "loss_mask": loss,
                "doc_offsets": offsets, "lineage": lineage, "chunks": chunks}

    def _loss_mask(self, tokens: np.ndarray, kinds: np.ndarray, starts: list[int]) -> np.ndarray:
        """1 where token t is a target; 0 where the reference masks the (input t-1, label t) pair.

        ``starts`` are the positions where a chunk (or an unsplit document) begins. The target there has
        its input in the previous chunk: after a tail knot (masked as a knot), after ``</S>`` (masked),
        or after the end of a document, where the reference has an EOD and masks the target after it.
        All of them, and position 0 (no input in the window), are 0.
        """
        knot, d_span = kinds == 1, kinds == 2
        masked = knot.copy()  # the label is a knot
        starts_in = [s for s in starts if s < len(tokens)]
        masked[starts_in] = True  # the target after a chunk or document end, and position 0
        masked[1:] |= knot[:-1] | d_span[:-1]  # the input is a knot or inside <D> … </D>
        if self.params.backtrace:
            masked |= (tokens == self.sp[D_OPEN]) | (tokens == self.sp[S_OPEN])  # label <D> or <S>
            masked[1:] |= tokens[:-1] == self.sp[S_CLOSE]  # input </S>
        return (~masked).astype(np.uint8)

    def _batch(self, rows: list[dict]) -> pa.RecordBatch:
        ids = id_lists([r["input_ids"] for r in rows])
        n = pc.list_value_length(ids).cast(pa.int32())
        arrays = {
            "id": strings([r["id"] for r in rows]),
            "input_ids": ids,
            "loss_mask": pa.ListArray.from_arrays(ids.offsets, numeric(np.concatenate([r["loss_mask"] for r in rows]))),
            "doc_offsets": int_lists([r["doc_offsets"] for r in rows]),
            "n_tokens": n,
            "n_image_tokens": numeric(np.zeros(len(rows), np.int32)),
            "lineage": string_lists([r["lineage"] for r in rows]),
            "utk_chunks": struct_lists([r["chunks"] for r in rows], {k: np.int32 for k in ("doc", "part", "start", "end")}),
        }
        if self.params.render_text:
            arrays["text"] = strings([self.tok.decode(r["input_ids"].tolist()) for r in rows])
        return pa.RecordBatch.from_pydict(arrays)


def _weights(p) -> list[float]:
    weights = p.chunk_weights or [1.0] * len(p.chunks)
    total = sum(weights)
    return [w / total for w in weights]


def _id_text(rng: seeds.Stream, chars: int) -> str:
    """``chars`` letters/digits from one or more 64-bit draws (base 62)."""
    out = []
    while len(out) < chars:
        x = rng.next64()
        for _ in range(min(10, chars - len(out))):  # 62^10 < 2^64
            x, r = divmod(x, 62)
            out.append(_ALPHABET_STR[r])
    return "".join(out)


def _keep_document_order(order: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Give each document's slots in ``order`` to its chunks in their original order."""
    by_doc: dict[int, list[int]] = {}
    for d, j in order:
        by_doc.setdefault(d, []).append(j)
    for js in by_doc.values():
        js.sort()
    cursor = {d: 0 for d in by_doc}
    out = []
    for d, _ in order:
        out.append((d, by_doc[d][cursor[d]]))
        cursor[d] += 1
    return out

"""``pack``: token rows → training sequences of ``seq_len``, with document offsets for masked attention.

Each input row is a *unit* (a tokenized document, or a UtK window whose chunks must stay together);
its ``loss_mask``, internal ``doc_offsets`` and ``lineage`` are carried into the packed row.

- ``best_fit``: best-fit decreasing over a bounded buffer (``buffer_tokens``). A unit is never split
  unless it is longer than ``seq_len`` (then it is cut into ``seq_len`` pieces: the full ones are rows at
  once, the remainder is packed, so a unit's pieces leave in their order). Rows that are not yet
  ``fill_target`` full stay open into the next buffer — at most ``buffer_tokens // seq_len`` of them, the
  emptiest; the fullest others are closed, so memory does not grow with the shard — and everything is
  flushed at the end of the shard.
- ``concat_chunk``: the classic baseline: concatenate units and cut every ``seq_len`` tokens (units
  cross row boundaries; the last row of a shard may be short).
- ``decompose``: Dataset Decomposition (Pouransari et al., 2024): each unit is cut into pieces of
  ``2^k (+1)`` tokens, largest first; when ``k > max_log2`` a smaller ``k`` is drawn with odds
  ``1 : 2 : 4 …`` from ``max_log2`` down to ``min_log2`` (``randomize``); a remainder shorter than
  ``2^min_log2 (+1)`` is dropped and counted (``tokens_dropped`` metric). Rows carry ``bucket = k``; a
  sink with ``partition_by: bucket`` writes one folder per bucket. As the authors' ``make_dd_buckets``
  does, each bucket is shuffled on its way out (``shuffle``): its pieces collect in a pool of
  ``shuffle_pool × R`` rows (``R = shuffle_rows``, default ``min(2^(20−k), 65536)``, the authors' shard
  size); when the pool is full it is shuffled and its first ``R`` rows leave; at the end of the shard
  what is left is shuffled and leaves (the authors drop a last partial shard; here every row is kept).
  The shuffle of bucket ``k`` is seeded from ``(run seed, stage, k, shard key)``, so a rerun, or a run
  with any number of workers, writes the same bytes.

Every row has ``doc_offsets`` (cu_seqlens: 0, end of unit 1, …, n_tokens), ``n_tokens`` and ``lineage``.
``loss_mask`` is the units' own (all ones for a plain tokenized document), except that the first token
of every span of ``doc_offsets`` is 0: it would be predicted across a document boundary (ProLong gives
each document's first token label −100), and at the start of a row it has nothing before it.
``repeat`` upsamples long units (ProLong-style length mixing): a unit with at least ``min_tokens`` tokens
is packed ``times`` times.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate import seeds
from curate.arrays import int_lists, numeric, string_lists, strings
from curate.registry import register_stage
from curate.stage import Stage, StageParams
from curate.stages.tokenize import list_parts


class Repeat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min_tokens: int = Field(gt=0, description="units with at least this many tokens …")
    times: int = Field(ge=1, description="… are packed this many times")


@dataclass
class Unit:
    tokens: np.ndarray
    loss: np.ndarray
    offsets: list[int]  # internal boundaries, 0 … len
    lineage: list[str]

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, a: int, b: int) -> Unit:
        inner = [o - a for o in self.offsets if a < o < b]
        return Unit(self.tokens[a:b], self.loss[a:b], [0, *inner, b - a], self.lineage)


@register_stage("pack")
class Pack(Stage):
    """Pack token rows into `seq_len` sequences (best fit, concat-and-chunk, or decomposition)."""

    class Params(StageParams):
        seq_len: int = Field(32768, ge=2, description="tokens per packed row")
        strategy: Literal["best_fit", "concat_chunk", "decompose"] = Field("best_fit", description="how units are packed")
        buffer_tokens: int | None = Field(None, ge=1, description="best_fit buffer (default 32 × seq_len)")
        fill_target: float = Field(0.99, gt=0, le=1, description="best_fit keeps rows below this fill open")
        min_log2: int = Field(8, ge=1, description="decompose: smallest bucket 2^k")
        max_log2: int = Field(13, ge=1, description="decompose: largest bucket 2^k")
        plus_one: bool = Field(True, description="decompose: pieces of 2^k + 1 tokens (the +1 is the last label)")
        randomize: bool = Field(True, description="decompose: draw k below max_log2 with odds 1:2:4…")
        shuffle: bool = Field(True, description="decompose: shuffle each bucket through a pool as it is written")
        shuffle_pool: int = Field(20, ge=1, description="decompose: the pool holds shuffle_pool × shuffle_rows rows per bucket")
        shuffle_rows: int | None = Field(None, ge=1, description="decompose: rows leaving a full pool at once (default min(2^(20−k), 65536))")
        repeat: list[Repeat] = Field(default_factory=list, description="upsample long units")

        @model_validator(mode="after")
        def _check(self):
            if self.min_log2 > self.max_log2:
                raise ValueError("min_log2 must not exceed max_log2")
            return self

    requires = ("input_ids",)
    provides = ("id", "input_ids", "loss_mask", "doc_offsets", "n_tokens", "n_image_tokens", "lineage")

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return list(self.provides) + (["bucket"] if self.params.strategy == "decompose" else [])

    def run(self, batches, ctx):
        packer = {"best_fit": self._best_fit, "concat_chunk": self._concat_chunk,
                  "decompose": self._decompose}[self.params.strategy]
        rows: list[tuple[Unit, int | None]] = []
        emitted = 0  # row numbers name the rows; no state outlives the shard
        for unit_rows in packer(self._units(batches), ctx):
            rows += unit_rows
            if len(rows) >= 64:
                yield self._batch(rows, ctx, emitted)
                emitted += len(rows)
                rows = []
        if rows:
            yield self._batch(rows, ctx, emitted)

    # ------------------------------------------------------------------ input units
    def _units(self, batches):
        for batch in batches:
            names = batch.schema.names
            offs, values = list_parts(batch.column("input_ids"))
            loss = list_parts(batch.column("loss_mask"))[1] if "loss_mask" in names else None
            inner = batch.column("doc_offsets").to_pylist() if "doc_offsets" in names else None
            lineage = batch.column("lineage").to_pylist() if "lineage" in names else None
            ids = batch.column("id").to_pylist() if "id" in names else [None] * batch.num_rows
            for i in range(batch.num_rows):
                a, b = offs[i], offs[i + 1]
                n = b - a
                unit = Unit(values[a:b], loss[a:b] if loss is not None else np.ones(n, np.uint8),
                            inner[i] if inner is not None and inner[i] else [0, n],
                            lineage[i] if lineage is not None else [ids[i] or f"row{i}"])
                for _ in range(self._times(n)):
                    yield unit

    def _times(self, n: int) -> int:
        times = 1
        for rule in self.params.repeat:
            if n >= rule.min_tokens:
                times = max(times, rule.times)
        return times

    # ------------------------------------------------------------------ strategies
    def _best_fit(self, units, ctx):
        seq_len = self.params.seq_len
        budget = self.params.buffer_tokens or 32 * seq_len
        open_bins: list[list[Unit]] = []
        buffer: list[Unit] = []
        held = 0
        for unit in units:
            if len(unit) > seq_len:  # full pieces are full rows now, so the remainder's row comes after them
                whole = len(unit) // seq_len * seq_len
                yield [(unit.slice(a, a + seq_len), None) for a in range(0, whole, seq_len)]
                unit = unit.slice(whole, len(unit))
            if len(unit):
                buffer.append(unit)
                held += len(unit)
            if held >= budget:
                open_bins, full = self._fit(buffer, open_bins)
                open_bins, closed = self._bounded(open_bins, budget)
                yield [(_join(b), None) for b in full + closed]
                buffer, held = [], 0
        open_bins, full = self._fit(buffer, open_bins)
        yield [(_join(b), None) for b in full + open_bins]

    def _bounded(self, bins: list[list[Unit]], budget: int) -> tuple[list[list[Unit]], list[list[Unit]]]:
        """Keep at most ``budget // seq_len`` open rows (the emptiest); close the fullest others now.

        Without a bound, rows that never reach ``fill_target`` (UtK windows a little short of
        ``seq_len``, followed only by more such windows) would stay open to the end of the shard, and a
        worker's memory would grow with its shard. Ties keep the older row open; order is by input only.
        """
        keep = max(1, budget // self.params.seq_len)
        if len(bins) <= keep:
            return [_owned(b) for b in bins], []
        seq_len = self.params.seq_len
        by_room = sorted(range(len(bins)), key=lambda i: (seq_len - sum(map(len, bins[i])), -i), reverse=True)
        stay = set(by_room[:keep])
        return [_owned(b) for i, b in enumerate(bins) if i in stay], [b for i, b in enumerate(bins) if i not in stay]

    def _fit(self, units: list[Unit], bins: list[list[Unit]]) -> tuple[list[list[Unit]], list[list[Unit]]]:
        """Best-fit decreasing of ``units`` into ``bins`` (kept in order); return (open, full) bins."""
        seq_len = self.params.seq_len
        space = [(seq_len - sum(map(len, b)), i) for i, b in enumerate(bins)]
        space.sort()
        order = sorted(range(len(units)), key=lambda i: (-len(units[i]), i))
        for i in order:
            unit = units[i]
            k = bisect.bisect_left(space, (len(unit), -1))
            if k < len(space):
                room, b = space.pop(k)
            else:
                bins.append([])
                room, b = seq_len, len(bins) - 1
            bins[b].append(unit)
            bisect.insort(space, (room - len(unit), b))
        limit = seq_len * (1 - self.params.fill_target)
        left = {b: room for room, b in space}
        full = [b for i, b in enumerate(bins) if left.get(i, 0) <= limit]
        still = [b for i, b in enumerate(bins) if left.get(i, 0) > limit]
        return still, full

    def _concat_chunk(self, units, ctx):
        seq_len = self.params.seq_len
        pending: list[Unit] = []
        held = 0
        for unit in units:
            pending.append(unit)
            held += len(unit)
            out = []
            while held >= seq_len:
                row, pending, held = _take(pending, seq_len)
                out.append((row, None))
            if out:
                yield out
        if held:
            yield [(_join(pending), None)]

    def _decompose(self, units, ctx):
        """Cut each unit into ``2^k (+1)``-token pieces; yield them bucket by bucket through the shuffle pools."""
        p = self.params
        stats = ctx.stats[self.label]
        extra = 1 if p.plus_one else 0
        pools: dict[int, _Pool] = {}
        for unit in units:
            rng = seeds.rng(ctx.seed, self.label, unit.lineage[0] if unit.lineage else "")
            out, start, n = [], 0, len(unit)
            while n - start > extra:
                left = n - start
                k = int(np.floor(np.log2(left - extra))) if left - extra > 0 else -1
                if k < p.min_log2:
                    break
                if k > p.max_log2:
                    k = _draw_k(rng, p) if p.randomize else p.max_log2
                size = (1 << k) + extra
                out.append((unit.slice(start, start + size), k))
                start += size
            if n - start:
                stats.metric("tokens_dropped").add_many(1, n - start, n - start, n - start)
            if not p.shuffle:
                if out:
                    yield out
                continue
            leaving = []
            for piece, k in out:
                if k not in pools:
                    pools[k] = _Pool(ctx.rng(f"{self.label}/bucket_{k}"), p.shuffle_pool, self._shuffle_rows(k))
                leaving += [(row, k) for row in pools[k].add(_own(piece))]
            if leaving:
                yield leaving
        for k in sorted(pools):
            rest = pools[k].drain()
            if rest:
                yield [(row, k) for row in rest]

    def _shuffle_rows(self, k: int) -> int:
        """Rows that leave a full pool of bucket ``k`` (the authors' shard size by default)."""
        if self.params.shuffle_rows is not None:
            return self.params.shuffle_rows
        return min(1 << (20 - k), 65536) if k < 20 else 1

    # ------------------------------------------------------------------ output
    def _batch(self, rows: list[tuple[Unit, int | None]], ctx, first: int) -> pa.RecordBatch:
        from curate.stages.tokenize import id_lists

        ids = id_lists([u.tokens for u, _ in rows])
        loss = np.concatenate([u.loss for u, _ in rows]).astype(np.uint8)
        # the first token of every document in a row is never a target: it would be predicted from the
        # previous document's last token (ProLong gives it label -100); at a row's start it has no context
        bases = np.asarray(ids.offsets)[:-1]
        loss[[int(b) + o for b, (u, _) in zip(bases, rows) for o in u.offsets[:-1] if o < len(u)]] = 0
        arrays = {
            "id": strings([f"{self.label}:{ctx.shard.name}:{first + i:07d}" for i in range(len(rows))]),
            "input_ids": ids,
            "loss_mask": pa.ListArray.from_arrays(ids.offsets, numeric(loss)),
            "doc_offsets": int_lists([u.offsets for u, _ in rows]),
            "n_tokens": pc.list_value_length(ids).cast(pa.int32()),
            "n_image_tokens": numeric(np.zeros(len(rows), np.int32)),
            "lineage": string_lists([list(dict.fromkeys(u.lineage)) for u, _ in rows]),
        }
        if self.params.strategy == "decompose":
            arrays["bucket"] = numeric([k for _, k in rows], np.int16)
        return pa.RecordBatch.from_pydict(arrays)


def _owned(units: list[Unit]) -> list[Unit]:
    """``units`` with tokens and loss copied out of the batches they view.

    A unit is a slice of its input batch's token array, and a slice keeps the whole array alive. Rows
    that stay open across buffers would otherwise pin one input batch each (megabytes, for a few
    kilobytes of tokens), and a worker's memory would grow with its shard.
    """
    return [u if u.tokens.base is None else Unit(u.tokens.copy(), u.loss.copy(), u.offsets, u.lineage) for u in units]


def _join(units: list[Unit]) -> Unit:
    """Concatenate units into one row, shifting their internal offsets."""
    offsets, base = [0], 0
    for u in units:
        offsets += [base + o for o in u.offsets[1:]]
        base += len(u)
    tokens = np.concatenate([u.tokens for u in units]) if units else np.zeros(0, np.int32)
    loss = np.concatenate([u.loss for u in units]) if units else np.zeros(0, np.uint8)
    return Unit(tokens, loss, offsets, [x for u in units for x in u.lineage])


def _take(pending: list[Unit], size: int) -> tuple[Unit, list[Unit], int]:
    """The first ``size`` tokens of ``pending`` as a row, and what is left."""
    row_units, got, rest = [], 0, []
    for i, u in enumerate(pending):
        if got + len(u) <= size:
            row_units.append(u)
            got += len(u)
            continue
        cut = size - got
        if cut:
            row_units.append(u.slice(0, cut))
        rest = [u.slice(cut, len(u))] + pending[i + 1:]
        break
    return _join(row_units), rest, sum(map(len, rest))


class _Pool:
    """One bucket's shuffle pool: holds up to ``factor × rows`` pieces; when full, shuffles and lets ``rows`` go.

    The same sequence of pieces and the same generator give the same output order (no clocks, no hashes).
    """

    def __init__(self, rng: np.random.Generator, factor: int, rows: int):
        self.rng, self.rows, self.cap = rng, rows, factor * rows
        self.items: list[Unit] = []

    def add(self, unit: Unit) -> list[Unit]:
        self.items.append(unit)
        if len(self.items) < self.cap:
            return []
        self._shuffle()
        out, self.items = self.items[:self.rows], self.items[self.rows:]
        return out

    def drain(self) -> list[Unit]:
        self._shuffle()
        out, self.items = self.items, []
        return out

    def _shuffle(self) -> None:
        order = self.rng.permutation(len(self.items))
        self.items = [self.items[i] for i in order]


def _own(unit: Unit) -> Unit:
    """``unit`` with its own copies of the arrays, so a pooled piece does not pin its whole input batch."""
    return Unit(np.array(unit.tokens), np.array(unit.loss), unit.offsets, unit.lineage)


def _draw_k(rng: np.random.Generator, p) -> int:
    ks = np.arange(p.max_log2, p.min_log2 - 1, -1)
    odds = 2.0 ** np.arange(len(ks))
    return int(rng.choice(ks, p=odds / odds.sum()))

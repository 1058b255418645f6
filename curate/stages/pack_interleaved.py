"""``pack_interleaved``: multimodal rows packed into training sequences of ``seq_len`` tokens.

Input: interleaved rows with ``n_tokens`` — text and image tokens together, as ``count_tokens`` (or
``long_multimodal`` / ``mm_needle``) writes them. Rows are packed whole, best-fit decreasing over a
buffer of ``buffer_rows`` rows: each row goes to the open sequence with the least room that still holds
it, a sequence at least ``fill_target`` full leaves at once, the others stay open into the next buffer,
and everything left leaves at the end of the shard. A row is never cut (an image cannot be), so a row
longer than ``seq_len`` is dropped and counted (``longer_than_seq_len``), or with ``oversize: alone``
written as a sequence of its own.

Output rows keep the interleaved schema — the packed rows' ``texts`` and ``images`` concatenated in
their input order — plus ``doc_offsets`` (cu_seqlens in tokens: 0, end of row 1, …, ``n_tokens``, for
document-masked attention), ``n_tokens``, ``n_image_tokens`` (when the input has it) and ``lineage``
(the packed rows' ids). Ids are ``<stage>-<shard>-<k>``. Packing depends only on the shard's rows and
order, so reruns and any worker count give the same bytes.
"""

from __future__ import annotations

import bisect
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.registry import register_stage
from curate.schema import IMAGE
from curate.stage import Stage, StageParams


@register_stage("pack_interleaved")
class PackInterleaved(Stage):
    """Pack interleaved rows (text + image tokens) into ``seq_len`` sequences, rows never cut."""

    class Params(StageParams):
        seq_len: int = Field(32768, ge=2, description="tokens per packed sequence (text and image tokens)")
        buffer_rows: int = Field(4096, ge=1, description="rows sorted and placed together")
        fill_target: float = Field(0.99, gt=0, le=1, description="sequences at least this full leave at once")
        oversize: Literal["drop", "alone"] = Field("drop", description="rows longer than seq_len: drop "
                                                   "(counted) or write each as its own sequence")

    requires = ("texts", "images", "n_tokens")
    provides = ("doc_offsets", "lineage")

    def run(self, batches, ctx):
        p, st = self.params, ctx.stats[self.label]
        open_bins: list[_Bin] = []
        buffer: list[dict] = []
        counter = [0]
        seq = 0  # input order, restored inside each packed sequence
        has_image_tokens = None
        for batch in batches:
            if has_image_tokens is None:
                has_image_tokens = "n_image_tokens" in batch.schema.names
            cols = ["id", "texts", "images", "n_tokens"] + (["n_image_tokens"] if has_image_tokens else [])
            for row in batch.select(cols).to_pylist():
                n = row["n_tokens"]
                if n is None or n <= 0:
                    st.drop("no_tokens")
                    continue
                if n > p.seq_len:
                    if p.oversize == "drop":
                        st.drop("longer_than_seq_len")
                        continue
                    st.count("oversize_alone")
                    yield self._batch([_Bin(p.seq_len, [row])], ctx, counter, has_image_tokens)
                    continue
                row["_order"] = seq
                seq += 1
                buffer.append(row)
                if len(buffer) >= p.buffer_rows:
                    done, open_bins = self._place(buffer, open_bins)
                    buffer = []
                    if done:
                        yield self._batch(done, ctx, counter, has_image_tokens)
        done, open_bins = self._place(buffer, open_bins)
        done += open_bins
        if done:
            yield self._batch(done, ctx, counter, has_image_tokens)

    def _place(self, rows: list[dict], bins: list[_Bin]) -> tuple[list[_Bin], list[_Bin]]:
        """Best-fit decreasing of ``rows`` into ``bins`` (and new ones); ``(full, still open)``."""
        p = self.params
        order = sorted(range(len(rows)), key=lambda i: (-rows[i]["n_tokens"], i))
        rooms = sorted((b.room, k) for k, b in enumerate(bins))  # (room, bin index)
        for i in order:
            n = rows[i]["n_tokens"]
            at = bisect.bisect_left(rooms, (n, -1))
            if at < len(rooms):
                _, k = rooms.pop(at)
            else:
                bins.append(_Bin(p.seq_len, []))
                k = len(bins) - 1
            bins[k].add(rows[i])
            bisect.insort(rooms, (bins[k].room, k))
        full = [b for b in bins if b.used >= p.fill_target * p.seq_len]
        still = [b for b in bins if b.used < p.fill_target * p.seq_len]
        return full, still

    def _batch(self, bins: list[_Bin], ctx, counter: list[int], has_image_tokens: bool) -> pa.RecordBatch:
        ids, texts, images, offsets, n_tokens, n_image, lineage = [], [], [], [], [], [], []
        st = ctx.stats[self.label]
        for b in bins:
            rows = sorted(b.rows, key=lambda r: r.get("_order", 0))
            ids.append(f"{self.label}-{ctx.shard.name}-{counter[0]:07d}")
            counter[0] += 1
            t, im, off = [], [], [0]
            for r in rows:
                t += r["texts"]
                im += r["images"]
                off.append(off[-1] + r["n_tokens"])
            texts.append(t)
            images.append(im)
            offsets.append(off)
            n_tokens.append(off[-1])
            n_image.append(sum(r.get("n_image_tokens") or 0 for r in rows))
            lineage.append([r["id"] for r in rows])
            st.count("sequences")
            st.metric("fill").add_many(1, off[-1] / self.params.seq_len, off[-1] / self.params.seq_len,
                                       off[-1] / self.params.seq_len)
        arrays = {
            "id": pa.array(ids, pa.string()),
            "texts": pa.array(texts, pa.list_(pa.string())),
            "images": pa.array(images, pa.list_(IMAGE)),
            "source": pa.nulls(len(ids), pa.string()),
            "meta": pa.nulls(len(ids), pa.string()),
            "doc_offsets": pa.array(offsets, pa.list_(pa.int32())),
            "n_tokens": pa.array(np.asarray(n_tokens, np.int32)),
            "lineage": pa.array(lineage, pa.list_(pa.string())),
        }
        if has_image_tokens:
            arrays["n_image_tokens"] = pa.array(np.asarray(n_image, np.int32))
        return pa.RecordBatch.from_pydict(arrays)


class _Bin:
    """An open sequence: its rows (in input order once written) and the tokens they use."""

    __slots__ = ("rows", "seq_len", "used")

    def __init__(self, seq_len: int, rows: list[dict]):
        self.seq_len, self.rows = seq_len, []
        self.used = 0
        for r in rows:
            self.add(r)

    @property
    def room(self) -> int:
        return self.seq_len - self.used

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.used += row["n_tokens"]

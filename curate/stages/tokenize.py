"""``tokenize``: documents → token ids with the run tokenizer (Rust ``encode_batch``, all cores).

The next batch is encoded in a thread while the stages after this one use the current batch.

Adds ``input_ids`` (``list<int32>``) and ``n_tokens``; drops ``text`` unless ``keep_text``. With
``append_eos`` each document ends with the tokenizer's end-of-text token (Dataset Decomposition and
concat-and-chunk packing want a separator). Documents that encode to fewer than ``min_tokens`` are
dropped with the reason ``too_few_tokens``.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import int_lists, numeric
from curate.registry import register_stage
from curate.stage import Stage, StageParams


def id_lists(ids) -> pa.ListArray:
    """A ``list<int32>`` array of token ids (see :func:`curate.arrays.int_lists`)."""
    return int_lists(ids, np.int32)


def list_parts(arr: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, values)`` of a (possibly sliced) list array, offsets starting at 0."""
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


@register_stage("tokenize")
class Tokenize(Stage):
    """Documents → ``input_ids`` and ``n_tokens`` with the run tokenizer."""

    class Params(StageParams):
        text_column: str = Field("text", description="the column to encode")
        append_eos: bool = Field(False, description="end every document with the end-of-text token")
        keep_text: bool = Field(False, description="keep the text column beside the ids")
        min_tokens: int = Field(1, ge=0, description="drop documents with fewer tokens (reason too_few_tokens)")

    requires = ("text",)
    provides = ("input_ids", "n_tokens")
    needs_tokenizer = True

    def columns_out(self, columns_in: list[str]) -> list[str]:
        cols = super().columns_out(columns_in)
        return cols if self.params.keep_text else [c for c in cols if c != self.params.text_column]

    def run(self, batches, ctx):
        tok = ctx.tokenizer
        eos = tok.eos_id if self.params.append_eos else None
        if self.params.append_eos and eos is None:
            raise ValueError("append_eos: the tokenizer has no end-of-text token")
        stats = ctx.stats[self.label]

        def encode(batch: pa.RecordBatch) -> pa.ListArray:
            return self._encode(tok, batch.column(self.params.text_column), eos)

        pairs = _encoded_ahead(batches, encode) if _encode_ahead(tok) else ((b, encode(b)) for b in batches)
        for batch, arr in pairs:
            lengths = np.diff(arr.offsets.to_numpy()).astype(np.int32)
            out = batch if self.params.keep_text else batch.drop_columns([self.params.text_column])
            out = out.append_column("input_ids", arr).append_column("n_tokens", numeric(lengths))
            short = lengths < self.params.min_tokens
            dropped = int(short.sum())
            if dropped:
                stats.drop("too_few_tokens", dropped)
                out = out.filter(numeric(~short))
            yield out

    @staticmethod
    def _encode(tok, texts: pa.Array, eos: int | None) -> pa.ListArray:
        return tok.encode_column(texts, eos)


def _encode_ahead(tok) -> bool:
    """Whether to encode the next batch in a thread while this one goes on.

    Yes when the Rust encoder does the work (it is the slow part, and it releases the GIL). With the
    word memo (:mod:`curate.word_memo`) encoding is mostly numpy and Python and a small share of the job:
    where this process has one core's share (a worker among several), running it ahead saves no time
    and holds one more batch (measured: 2 workers on 2 cores, ~70 MB more peak PSS, same wall time); with
    more cores than that it still overlaps usefully.
    """
    if tok.word_memo is None:
        return True
    try:
        threads = int(os.environ.get("RAYON_NUM_THREADS", "0"))  # what a local worker's share was set to
    except ValueError:
        threads = 0
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return threads > 1


def _encoded_ahead(batches, encode):
    """``(batch, encode(batch))`` in order, the next batch encoding in a thread while this one is used.

    ``encode_batch`` releases the GIL and runs on Rust threads, so while the stages after this one
    (UtK, packing, the writer) work on batch k in Python, batch k + 1 is already being encoded: the
    encoder is never idle waiting for them. At most one batch is encoded ahead (bounded memory); an
    error while encoding is raised here, for the batch it belongs to.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="curate-encode") as pool:
        pending = None
        for batch in batches:
            ahead = (batch, pool.submit(encode, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = ahead
        if pending is not None:
            yield pending[0], pending[1].result()

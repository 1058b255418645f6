"""The global dedup protocol shared by ``exact_dedup`` and ``minhash_dedup``.

Phase before the stage (per shard, ``observe``): each row contributes a key record (its ``id``, its
length and whatever the subclass hashes). Driver (``combine``, once): the subclass reduces each record
to ``b`` 64-bit keys; rows sharing a key in the same position are duplicates (and, with a pair check,
only the pairs it accepts), clusters being the connected components — computed by
:mod:`filters.band_groups` with the keys spilled to disk, so the driver's memory does not grow with the
rows (spill folder: ``$CURATE_SPILL_DIR``, else the system's temporary folder). One member of each
cluster is kept — the first in input order (shard order,
then row order) or, with ``keep: longest``, the longest (ties: the first) — so the choice does not depend
on the number of workers. Next phase (``run``, per shard): every row gets ``scores.<label>.cluster_size``
(1 for a unique row) and ``scores.<label>.cluster`` (null for a unique row); the other members are
dropped with the reason ``duplicate`` (or kept and only scored, with ``drop: false``).

The report: ``global/<label>/state.json`` (rows, clusters, duplicates, a cluster-size histogram and the
largest clusters) — copied into ``stats.json`` under ``global`` — and ``global/<label>/members.arrow``
(``id``, ``cluster``, ``cluster_size``, ``kept``, one row per member of a cluster of two or more).
Row ids must be unique across the input (every reader makes them so); a repeated id is an error.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.arrays import numeric
from curate.stage import Filter
from filters.band_groups import Clustering, PairCheck, Rows, cluster_rows, spill_folder


class GlobalDedup(Filter):
    """Base of the dedup stages: subclasses implement ``keys`` and ``cluster``."""

    class Params(Filter.Params):
        text_column: str = Field("text", description="the column compared")
        keep: Literal["first", "longest"] = Field("first", description="which member of a cluster stays")
        drop: bool = Field(True, description="drop the other members (false: only score them)")

    requires = ("text",)
    provides = ("scores",)

    @property
    def is_global(self) -> bool:
        return True

    # ---------------------------------------------------------------- subclass hooks
    @abstractmethod
    def keys(self, texts: list[str], ids: list[str]) -> dict[str, pa.Array]:
        """Columns (beside ``id`` and ``n_chars``) that ``cluster`` needs, one value per row."""

    @abstractmethod
    def band_keys(self, table: pa.Table) -> np.ndarray:
        """The ``(rows, bands)`` uint64 keys of a slice of the partials; equal keys in a column join rows."""

    @property
    def bands(self) -> int:
        """How many keys :meth:`band_keys` gives per row."""
        return 1

    def pair_check(self, rows: Rows) -> PairCheck | None:
        """A test that candidate pairs (row numbers) must also pass, or None (every candidate joins)."""
        return None

    # ---------------------------------------------------------------- global protocol
    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        texts = [t or "" for t in batch.column(self.params.text_column).to_pylist()]
        cols = {"id": batch.column("id"), "n_chars": numeric([len(t) for t in texts], np.int64)}
        cols.update(self.keys(texts, batch.column("id").to_pylist()))
        partial.add(pa.table(cols))

    #: where the driver's spill folder goes (None: ``$CURATE_SPILL_DIR``, else the temporary folder)
    spill_dir: str | None = None

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        """The clusters of all partials; ``_members_at[k]:_members_at[k + 1]`` are partial ``k``'s members."""
        sizes = [p.num_rows for p in partials]
        partials = [p for p in partials if p.num_rows]
        if not partials:
            return {"rows": 0, "clusters": 0, "duplicates": 0, "size_histogram": {}, "largest": []}
        with spill_folder(self.spill_dir) as folder:
            rows = Rows(partials)
            how = Clustering(keys=self.band_keys, bands=self.bands, keep=self.params.keep,
                             check=self.pair_check(rows), label=self.label)
            state = cluster_rows(rows, how, folder)
        counts, at = iter(state.pop("_members_per_partial")), [0]
        for size in sizes:
            at.append(at[-1] + (next(counts) if size else 0))
        state["_members_at"] = at
        return state

    # ---------------------------------------------------------------- per row
    def score(self, batch: pa.RecordBatch, ctx) -> dict[str, pa.Array]:
        members = self._members(ctx)
        n = batch.num_rows
        if members is None:
            return {"cluster_size": numeric(np.ones(n, np.int32)), "cluster": pa.nulls(n, pa.int64())}
        at = pc.index_in(batch.column("id"), value_set=members["id"])
        found = at.is_valid()
        size = pc.if_else(found, pc.take(members["cluster_size"], at), 1).cast(pa.int32())
        cluster = pc.take(members["cluster"], at)
        dup = pc.and_(found, pc.invert(pc.fill_null(pc.take(members["kept"], at), True)))
        return {"cluster_size": size, "cluster": cluster, "_duplicate": dup}

    def _members(self, ctx) -> dict[str, pa.Array] | None:
        """This shard's rows of the members table, as contiguous arrays (None when none of its rows repeat).

        The members table lists rows in input order, so a shard's members are one slice of it
        (``_members_at``, by the order of ``_partials``): a worker reads its own shard's members, never
        the whole table — memory stays bounded by a shard whatever the corpus size.
        """
        state = ctx.global_state(self.label)
        if not state["clusters"]:
            return None
        at, names = state.get("_members_at"), state.get("_partials")
        if at is None or names is None or len(at) != len(names) + 1:  # combined by an older version
            return ctx.global_columns(self.label, "members")
        if "_partial_of" not in state:  # the state is this process's cached copy: index it once
            state["_partial_of"] = {name: k for k, name in enumerate(names)}
        k = state["_partial_of"].get(ctx.shard.name)
        if k is None:  # no partial from this shard: none of its rows was seen, none repeats
            return None
        if at[k] == at[k + 1]:
            return None
        return ctx.global_columns(self.label, "members", rows=(at[k], at[k + 1]))

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        dup = scores.get("_duplicate")
        if dup is None or not self.params.drop:
            return pa.nulls(batch.num_rows, pa.string())
        return pc.if_else(dup, pa.scalar("duplicate"), pa.scalar(None, pa.string()))


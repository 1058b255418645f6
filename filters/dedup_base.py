"""The global dedup protocol shared by ``exact_dedup`` and ``minhash_dedup``.

Phase before the stage (per shard, ``observe``): each row contributes a key record (its ``id``, its
length and whatever the subclass hashes). Driver (``combine``, once): the subclass turns all records
into clusters of duplicates; one member of each cluster is kept — the first in input order (shard order,
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
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.arrays import numeric
from curate.errors import BadRecord
from curate.stage import Filter, concat_partials


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
    def cluster(self, table: pa.Table) -> np.ndarray:
        """A cluster label per row of ``table`` (rows in input order); equal labels are duplicates."""

    # ---------------------------------------------------------------- global protocol
    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        texts = [t or "" for t in batch.column(self.params.text_column).to_pylist()]
        cols = {"id": batch.column("id"), "n_chars": numeric([len(t) for t in texts], np.int64)}
        cols.update(self.keys(texts, batch.column("id").to_pylist()))
        partial.add(pa.table(cols))

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        table = concat_partials(partials)
        if table is None:
            return {"rows": 0, "clusters": 0, "duplicates": 0, "size_histogram": {}, "largest": []}
        ids = table.column("id")
        if pc.count_distinct(ids).as_py() != table.num_rows:
            counts = pc.value_counts(ids)
            repeated = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:3]
            raise BadRecord(f"{self.label}: row ids repeat across the input ({', '.join(map(repr, repeated))}); "
                            "dedup needs unique ids")
        labels = self.cluster(table)
        return _members(table, labels, self.params.keep)

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
        """The members table as contiguous arrays (None when nothing repeats)."""
        if not ctx.global_state(self.label)["clusters"]:
            return None
        return ctx.global_columns(self.label, "members")

    def decide(self, batch: pa.RecordBatch, scores, ctx) -> pa.Array:
        dup = scores.get("_duplicate")
        if dup is None or not self.params.drop:
            return pa.nulls(batch.num_rows, pa.string())
        return pc.if_else(dup, pa.scalar("duplicate"), pa.scalar(None, pa.string()))


def _members(table: pa.Table, labels: np.ndarray, keep: str) -> dict[str, Any]:
    """The combined state: cluster statistics and, as a table, every member of a non-trivial cluster."""
    n = table.num_rows
    uniq, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    size = sizes[inverse]
    multi = np.flatnonzero(size > 1)
    order = np.arange(n)
    if keep == "longest":  # longest first, then input order
        chars = table.column("n_chars").to_numpy()
        rank = np.lexsort((order, -chars))
    else:
        rank = order
    # the kept member of each cluster is the first in `rank` order
    position = np.empty(n, np.int64)
    position[rank] = np.arange(n)
    first = np.full(len(uniq), n, np.int64)
    np.minimum.at(first, inverse, position)
    kept = position == first[inverse]
    # clusters are numbered by the input position of their kept member: stable across runs
    cluster_no = rank[first][inverse]
    ids = table.column("id")
    members = pa.table({
        "id": pc.take(ids, pa.array(multi)),
        "cluster": numeric(cluster_no[multi], np.int64),
        "cluster_size": numeric(size[multi], np.int32),
        "kept": pa.array(kept[multi]),
    })
    hist = Counter(int(s) for s in sizes if s > 1)
    big = np.argsort(-sizes, kind="stable")[:10]
    largest = [{"kept_id": ids[int(rank[first[c]])].as_py(), "size": int(sizes[c])} for c in big if sizes[c] > 1]
    return {"rows": n, "clusters": int((sizes > 1).sum()), "duplicates": int(len(multi) - (sizes > 1).sum()),
            "size_histogram": {str(k): hist[k] for k in sorted(hist)}, "largest": largest,
            "_tables": {"members": members}}



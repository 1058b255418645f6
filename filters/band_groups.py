"""Clusters of rows that share a key, in memory that does not grow with the number of rows.

The dedup stages reduce every row to ``b`` 64-bit keys ("bands": ``minhash_dedup``'s LSH band hashes,
``exact_dedup``'s one text hash). Two rows are joined when they share a key in the same band (and, with
a pair check, when the check accepts the pair); clusters are the connected components. This module
computes them from the shards' partials without ever holding all rows:

1. **Spill**: the partials (memory-mapped Arrow tables, in input order) are read in chunks of rows; each
   (key, band, row) becomes a 16-byte entry, appended to one of up to 256 partition files by the key's
   top bits. One more "band" holds a hash of the row's id, so repeated ids are found the same way.
2. **Group**: each partition file small enough (``target_entries``) is loaded and grouped by (key, band)
   with a sort; a larger one is split again by the next 8 bits, and one whose entries all share one key
   (a very common text) is streamed. Every group gives the edges (first row, other row) — the first row in
   input order, as the in-memory version did.
3. **Join**: a union-find over dense row numbers lives in a sparse memory-mapped file (8 bytes per row,
   only pages of joined rows are ever touched); unions are applied a whole batch of edges at a time, each
   root hooked under the smallest root offered, so a component's root is its first row.
4. **Report**: the parent file is scanned in row order (cluster sizes, the kept member, then one
   ``members`` record batch per scanned range), the ids of members are gathered from the partials.

The driver's anonymous memory is bounded by ``target_entries`` and ``chunk_rows`` (not by the rows);
the disk holds the entries (16 bytes × (b + 1) per row, freed partition by partition), the parent and
size files (sparse, 16 bytes per joined row) and, with ``keep: longest``, 24 bytes per row more.
The result — clusters, kept member, ``members`` table, report — is the in-memory algorithm's exactly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curate.arrays import numeric
from curate.errors import BadRecord

ENTRY = np.dtype([("key", "<u8"), ("tag", "<u8")])  # tag = band * rows + row
TARGET_ENTRIES = 1 << 22  # entries grouped in memory at once (64 MiB of entries)
CHUNK_ROWS = 1 << 18  # rows read or scanned at once
SPILL_ENV = "CURATE_SPILL_DIR"

#: ``(rows_a, rows_b) -> keep`` for candidate pairs (``minhash_dedup``'s ``threshold``), or None.
PairCheck = Callable[[np.ndarray, np.ndarray], np.ndarray]


@contextmanager
def spill_folder(root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh folder for the spilled entries, removed afterwards (``root``, else ``$CURATE_SPILL_DIR``,
    else the system's temporary folder)."""
    base = root or os.environ.get(SPILL_ENV) or tempfile.gettempdir()
    Path(base).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="curate-dedup-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Rows:
    """The partials' rows addressed by dense row number (input order), read in place (never copied whole).

    Only 8 bytes per Arrow batch of the partials are held (where each batch starts), not per row.
    """

    def __init__(self, partials: list[pa.Table]):
        self.tables = [t for t in partials if t.num_rows]
        schema = pa.unify_schemas([t.schema for t in self.tables], promote_options="default")
        self.id_type = schema.field("id").type
        lengths, owner = [], []
        for k, t in enumerate(self.tables):
            sizes = [len(c) for c in t.column(0).chunks]
            lengths.append(np.array(sizes, np.int64))
            owner.append(np.full(len(sizes), k, np.int32))
        lengths = np.concatenate(lengths)
        self.owner = np.concatenate(owner)  # batch -> table
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # batch -> first row
        self.first_batch = np.concatenate([[0], np.cumsum([t.column(0).num_chunks for t in self.tables])])
        self.n = int(self.starts[-1])

    def ranges(self, chunk_rows: int) -> Iterator[tuple[int, pa.Table]]:
        """Consecutive slices of at most ``chunk_rows`` rows (never across partials): (first row, slice)."""
        first = 0
        for t in self.tables:
            for off in range(0, t.num_rows, chunk_rows):
                part = t.slice(off, chunk_rows)
                yield first + off, part
            first += t.num_rows

    def _chunk(self, batch: int, column: str) -> pa.Array:
        k = int(self.owner[batch])
        return self.tables[k].column(column).chunk(batch - int(self.first_batch[k]))

    def take(self, column: str, rows: np.ndarray) -> pa.Array:
        """``column`` at ``rows`` (ascending row numbers), as one array."""
        if len(rows) == 0:
            return pa.array([], self.id_type if column == "id" else None)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        parts = []
        for sel in np.split(np.arange(len(rows)), cuts):
            b = int(which[sel[0]])
            col = self._chunk(b, column)
            if column == "id" and col.type != self.id_type:
                col = col.cast(self.id_type)
            parts.append(col.take(numeric(rows[sel] - self.starts[b], np.int64)))
        return pa.concat_arrays(parts)

    def matrix(self, column: str, rows: np.ndarray) -> np.ndarray:
        """A fixed-size-list column of uint64 at ``rows`` (any order) as an ``(len(rows), width)`` array."""
        width = self.tables[0].schema.field(column).type.list_size
        out = np.empty((len(rows), width), np.uint64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for b in np.unique(which):
            at = np.flatnonzero(which == b)
            values = self._chunk(int(b), column).flatten().to_numpy().reshape(-1, width)
            out[at] = values[rows[at] - self.starts[b]]
        return out


@dataclass
class Clustering:
    """What :func:`cluster_rows` needs from the stage."""

    keys: Callable[[pa.Table], np.ndarray]  # (n, b) uint64 keys of a slice of partial rows
    bands: int
    keep: str = "first"
    check: PairCheck | None = None
    label: str = "dedup"
    target_entries: int = field(default_factory=lambda: TARGET_ENTRIES)
    chunk_rows: int = field(default_factory=lambda: CHUNK_ROWS)


def cluster_rows(rows: Rows, how: Clustering, folder: Path) -> dict[str, Any]:
    """The dedup report and ``members`` table of ``rows`` (see the module docstring); ``folder`` is scratch."""
    join = _Joiner(rows, how, folder)
    join.spill()
    join.group_all()
    if join.repeated:
        shown = ", ".join(map(repr, join.repeated))
        raise BadRecord(f"{how.label}: row ids repeat across the input ({shown}); dedup needs unique ids")
    return join.report()


class _Joiner:
    def __init__(self, rows: Rows, how: Clustering, folder: Path):
        self.rows, self.how, self.folder = rows, how, folder
        self.n = rows.n
        self.parent = _sparse(folder / "parent.u64", self.n)  # 0: a root, else parent row + 1
        self.repeated: dict[str, int] = {}  # repeated id -> its first row (the first few in input order)
        self.files = 0

    # ------------------------------------------------------------------ 1. spill
    def spill(self) -> None:
        how, n = self.how, self.n
        total = n * (how.bands + 1)
        self.bits0 = min(8, max(0, int(np.ceil(np.log2(max(total / how.target_entries, 1))))))
        self.level0 = [self.folder / f"p-{i:03d}" for i in range(1 << self.bits0)]
        chars = _dense(self.folder / "chars.i64", n, np.int64) if how.keep == "longest" else None
        handles = [open(p, "wb") for p in self.level0]
        try:
            for first, part in self.rows.ranges(how.chunk_rows):
                ids = part.column("id").cast(self.rows.id_type)
                keys = np.concatenate([how.keys(part), _id_hashes(ids)[:, None]], axis=1)
                count = len(keys)
                band = np.arange(how.bands + 1, dtype=np.uint64)[None, :]
                row = np.arange(first, first + count, dtype=np.uint64)[:, None]
                entries = np.empty(keys.shape, ENTRY)
                entries["key"] = keys
                entries["tag"] = band * np.uint64(n) + row
                self._append(entries.reshape(-1), handles, 0, self.bits0)
                if chars is not None:
                    chars[first:first + count] = part.column("n_chars").to_numpy()
        finally:
            for h in handles:
                h.close()
        if chars is not None:
            chars.flush()
            self.chars = chars

    @staticmethod
    def _append(entries: np.ndarray, handles: list, shift: int, bits: int) -> None:
        """Append ``entries`` to ``handles[k]`` by the ``bits`` key bits below the top ``shift``."""
        if bits == 0:
            entries.tofile(handles[0])
            return
        part = (entries["key"] << np.uint64(shift)) >> np.uint64(64 - bits) if shift else \
            entries["key"] >> np.uint64(64 - bits)
        part = part.astype(np.uint8)  # bits <= 8: a stable sort of bytes is a radix sort
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(len(handles) + 1))
        for k, h in enumerate(handles):
            if bounds[k + 1] > bounds[k]:
                entries[order[bounds[k]:bounds[k + 1]]].tofile(h)

    # ------------------------------------------------------------------ 2. group
    def group_all(self) -> None:
        for path in self.level0:
            self._group_file(path, self.bits0)

    def _group_file(self, path: Path, shift: int) -> None:
        size = path.stat().st_size // ENTRY.itemsize
        target = self.how.target_entries
        if size <= target:
            if size > 1:
                self._group(np.fromfile(path, ENTRY))
            path.unlink()
            return
        data = np.memmap(path, ENTRY, mode="r")
        lo, hi = _key_range(data, target)
        if lo == hi or shift >= 64:
            self._group_one_key(data)
        else:
            bits = min(8, 64 - shift, max(1, int(np.ceil(np.log2(size / target)))))
            subs = [path.with_name(f"{path.name}-{k:03d}") for k in range(1 << bits)]
            handles = [open(p, "wb") for p in subs]
            try:
                for start in range(0, size, target):
                    self._append(np.array(data[start:start + target]), handles, shift, bits)
            finally:
                for h in handles:
                    h.close()
            del data
            path.unlink()
            for sub in subs:
                self._group_file(sub, shift + bits)
            return
        del data
        path.unlink()

    def _group(self, entries: np.ndarray) -> None:
        """Edges of every (key, band) group of loaded entries: (its first row, each other row)."""
        keys = entries["key"]
        ordered = np.sort(keys)
        same = ordered[1:] == ordered[:-1]
        if not same.any():
            return
        shared = np.unique(ordered[1:][same])
        # a 2^24-slot filter on the low bits picks the few candidates; only those are looked up exactly
        low = np.uint64((1 << 24) - 1)
        seen = np.zeros(1 << 24, bool)
        seen[(shared & low).astype(np.int64)] = True
        maybe = np.flatnonzero(seen[(keys & low).astype(np.int64)])
        at = np.minimum(np.searchsorted(shared, keys[maybe]), len(shared) - 1)
        sub = entries[maybe[shared[at] == keys[maybe]]]
        sub = sub[np.lexsort((sub["tag"], sub["key"]))]
        band, row = np.divmod(sub["tag"], np.uint64(self.n))
        starts = np.ones(len(sub), bool)
        starts[1:] = (sub["key"][1:] != sub["key"][:-1]) | (band[1:] != band[:-1])
        head = row[starts][np.cumsum(starts) - 1]
        rest = ~starts
        self._edges(head[rest], row[rest], band[rest])

    def _group_one_key(self, data: np.memmap) -> None:
        """A file whose entries all share one key: each band's group streamed in chunks."""
        n, step = np.uint64(self.n), self.how.target_entries
        heads = np.full(self.how.bands + 1, np.iinfo(np.uint64).max, np.uint64)
        for start in range(0, len(data), step):
            band, row = np.divmod(np.array(data["tag"][start:start + step]), n)
            np.minimum.at(heads, band.astype(np.int64), row)
        for start in range(0, len(data), step):
            band, row = np.divmod(np.array(data["tag"][start:start + step]), n)
            head = heads[band.astype(np.int64)]
            other = row != head
            self._edges(head[other], row[other], band[other])

    def _edges(self, a: np.ndarray, b: np.ndarray, band: np.ndarray) -> None:
        """Join rows ``a[i]`` and ``b[i]`` (``a`` first in input order); the id band finds repeated ids."""
        ids = band == self.how.bands
        if ids.any():
            self._repeated_ids(a[ids], b[ids])
            keep = ~ids
            a, b = a[keep], b[keep]
        if len(a) and self.how.check is not None:
            ok = self.how.check(a.astype(np.int64), b.astype(np.int64))
            a, b = a[ok], b[ok]
        if len(a):
            _union(self.parent, a.astype(np.int64), b.astype(np.int64))

    def _repeated_ids(self, a: np.ndarray, b: np.ndarray) -> None:
        """Pairs whose id hashes agree: keep (first row, id) of those whose ids really are equal."""
        rows = np.unique(np.concatenate([a, b])).astype(np.int64)
        ids = self.rows.take("id", rows).to_pylist()
        text = dict(zip(rows.tolist(), ids, strict=True))
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            if text[x] == text[y]:
                self.repeated[text[x]] = min(self.repeated.get(text[x], x), x)
        self.repeated = dict(sorted(self.repeated.items(), key=lambda item: item[1])[:3])

    # ------------------------------------------------------------------ 4. report
    def report(self) -> dict[str, Any]:
        n, step = self.n, self.how.chunk_rows
        size = _sparse(self.folder / "size.u64", n)  # a root's number of other members
        longest = self.how.keep == "longest"
        best = _sparse(self.folder / "best.u64", n) if longest else None  # longest n_chars + 1
        for start in range(0, n, step):  # sizes (and the longest length) per root
            child, root = self._children(start, min(n, start + step))
            np.add.at(size, root, 1)
            if longest:
                np.maximum.at(best, root, self.chars[child].astype(np.uint64) + np.uint64(1))
                np.maximum.at(best, root, self.chars[root].astype(np.uint64) + np.uint64(1))
        kept = None
        if longest:  # the first row of each root's cluster with the longest length, stored as n - row
            kept = _sparse(self.folder / "kept.u64", n)
            for start in range(0, n, step):
                child, root = self._children(start, min(n, start + step))
                for member in (root, child):
                    hit = self.chars[member].astype(np.uint64) + np.uint64(1) == best[root]
                    np.maximum.at(kept, root[hit], np.uint64(n) - member[hit].astype(np.uint64))
        return self._members(size, kept)

    def _children(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows in ``[start, stop)`` that are not roots, and their roots."""
        child = np.flatnonzero(self.parent[start:stop]).astype(np.int64) + start
        return child, _find(self.parent, child)

    def _members(self, size: np.memmap, kept: np.memmap | None) -> dict[str, Any]:
        n, step = self.n, self.how.chunk_rows
        schema = pa.schema([("id", self.rows.id_type), ("cluster", pa.int64()), ("cluster_size", pa.int32()),
                            ("kept", pa.bool_())])
        path = self.folder / "members.arrow"
        hist: Counter = Counter()
        largest = np.zeros((0, 2), np.int64)  # (size, root) of the biggest clusters so far
        members = clusters = 0
        table_starts = np.cumsum([0] + [t.num_rows for t in self.rows.tables])
        per_table = np.zeros(len(self.rows.tables), np.int64)  # members of each partial (rows are in order)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as out:
            for start in range(0, n, step):
                stop = min(n, start + step)
                is_root = np.asarray(size[start:stop]) > 0
                is_child = np.asarray(self.parent[start:stop]) > 0
                rows = np.flatnonzero(is_root | is_child).astype(np.int64) + start
                if len(rows) == 0:
                    continue
                root = rows.copy()
                child = is_child[rows - start]
                root[child] = _find(self.parent, rows[child])
                cluster_size = size[root].astype(np.int64) + 1
                keeper = root if kept is None else (np.int64(n) - kept[root].astype(np.int64))
                out.write_batch(pa.record_batch([
                    self.rows.take("id", rows), numeric(keeper, np.int64), numeric(cluster_size, np.int32),
                    numeric(rows == keeper)], schema=schema))
                roots = rows[is_root[rows - start]]
                sizes = size[roots].astype(np.int64) + 1
                hist.update(sizes.tolist())
                members += len(rows)
                clusters += len(roots)
                per_table += np.bincount(np.searchsorted(table_starts, rows, side="right") - 1,
                                         minlength=len(per_table))
                both = np.concatenate([largest, np.stack([sizes, roots], axis=1)])
                largest = both[np.lexsort((both[:, 1], -both[:, 0]))][:10]
        keepers = largest[:, 1] if kept is None or not len(largest) else \
            np.int64(n) - kept[largest[:, 1]].astype(np.int64)
        order = np.argsort(keepers, kind="stable")
        ids = self.rows.take("id", keepers[order]).to_pylist()
        names = dict(zip(keepers[order].tolist(), ids, strict=True))
        with pa.memory_map(str(path)) as src:  # stays readable after the folder is removed (POSIX)
            table = pa.ipc.open_file(src).read_all()
        return {"rows": n, "clusters": clusters, "duplicates": members - clusters,
                "size_histogram": {str(k): hist[k] for k in sorted(hist)},
                "largest": [{"kept_id": names[int(k)], "size": int(s)} for k, (s, _) in zip(keepers, largest, strict=True)],
                "_tables": {"members": table}, "_members_per_partial": per_table.tolist()}


# ---------------------------------------------------------------------- union-find on a memory map
def _find(parent: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The root of each of ``rows``; every row passed then points at its root directly."""
    root = rows.copy()
    active = np.arange(len(root))
    while len(active):
        up = parent[root[active]]
        moving = up != 0
        active = active[moving]
        root[active] = up[moving].astype(np.int64) - 1
    moved = root != rows
    parent[rows[moved]] = root[moved].astype(np.uint64) + np.uint64(1)
    return root


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join each pair ``(a[i], b[i])``; a root always hooks under a smaller one, so roots are first rows."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        lo, hi = np.minimum(ra[apart], rb[apart]), np.maximum(ra[apart], rb[apart])
        order = np.lexsort((lo, hi))
        lo, hi = lo[order], hi[order]
        first = np.ones(len(hi), bool)
        first[1:] = hi[1:] != hi[:-1]
        parent[hi[first]] = lo[first].astype(np.uint64) + np.uint64(1)
        a, b = lo, hi  # pairs hooked elsewhere are joined on the next round


# ---------------------------------------------------------------------- helpers
def _sparse(path: Path, n: int) -> np.memmap:
    """A zero-filled uint64 array on disk; pages never written take no disk and no memory."""
    return _dense(path, n, np.uint64)


def _dense(path: Path, n: int, dtype) -> np.memmap:
    with open(path, "wb") as f:
        f.truncate(max(n, 1) * np.dtype(dtype).itemsize)
    return np.memmap(path, dtype, mode="r+", shape=(max(n, 1),))


def _key_range(data: np.memmap, step: int) -> tuple[int, int]:
    lo, hi = np.iinfo(np.uint64).max, 0
    for start in range(0, len(data), step):
        keys = np.array(data["key"][start:start + step])
        lo, hi = min(lo, int(keys.min())), max(hi, int(keys.max()))
    return lo, hi


def _id_hashes(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash per id (polars' string hash: stable within a process, which is all grouping needs)."""
    import polars as pl

    return pl.from_arrow(ids).hash(seed=0).to_numpy().astype(np.uint64, copy=False)

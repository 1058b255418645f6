"""``image_dedup``: remove near-duplicate images from interleaved rows by perceptual hash.

Each image is decoded with :func:`curate.images.decode_rgb` and hashed with imagehash
(``hash: phash`` by default; ``dhash``, ``ahash``, ``whash``) into ``hash_size²`` bits (64 at the
default 8), read row-major from imagehash's bit matrix, first bit most significant — the integer whose
hex is imagehash's own ``str(hash)``. Two images are near-duplicates when the Hamming distance of
their hashes is at most ``max_distance`` (default 5, MMC4's threshold). Near-duplicate *clusters* are
the connected components of that relation (as the text dedup stages cluster with union-find), so a
removed image is linked to the kept one by a chain of near-duplicates.

Which images go (each removed with its position, so ``texts`` and ``images`` stay aligned, and each
counted as a stage metric under its reason):

* ``scope: document`` (default): within one row, every image of a cluster but the first —
  ``duplicate_image_in_document``. A per-row step, not global.
* ``scope: corpus``: over the whole input, every image of a cluster but the first in the stable order
  (shard name, row, position) — ``duplicate_image_in_document`` when the kept image is in the same
  row, ``duplicate_image_in_corpus`` otherwise. The result does not depend on the number of workers.
* ``max_copies`` (optional, either scope): every image of a cluster with more than ``max_copies``
  images across the corpus is removed everywhere — ``too_many_copies`` (MMC4 drops images with more
  than 10 duplicates: logos, icons, buttons).
* ``undecodable_image`` / ``image_too_large`` (above ``max_image_pixels``, not decoded): recorded in
  ``failures/`` and removed, since they cannot be hashed.

Rows left with fewer than ``min_images`` images are dropped (``too_few_images``); misaligned rows are
dropped as ``misaligned_row`` (see :mod:`filters.image_size`). No scores are written.

With ``scope: corpus`` or ``max_copies`` the stage is global: in the phase before it, ``observe``
hashes each shard's images into a partial (one record per row: shard, row number, id, image positions,
hashes; problems are recorded in ``failures/`` and counted there); ``combine`` sorts all records by
(shard, row), finds near-duplicate pairs among the distinct hashes with a multi-index
(:func:`near_pairs`), clusters them (scipy's connected components) and writes
``global/<label>/removed.arrow`` (shard, row, id, pos, reason, counted) plus ``state.json`` (images,
unusable, clusters, removed by reason, a cluster-size histogram, the ten largest clusters with their
kept image); ``run`` removes this shard's listed images without decoding anything. Rows are matched
by (shard, row number) and their ids are checked, so ids need not be unique.

Within a row (``scope: document``, global or not) images are compared all pairs at once
(:func:`row_duplicates`; rows of equal size together, rows above 512 images through the multi-index),
so a row's result is the same whether or not ``max_copies`` makes the stage global. Across rows the
work is the multi-index's candidate pairs: about ``n² / 2^11`` per band for ``n`` distinct, evenly
spread 64-bit hashes at the default ``max_distance`` — measured on 2 shared cores, ``combine`` takes
6.7 s for 400,000 images (320,000 distinct) and :func:`near_pairs` 34 s for 1,000,000 distinct hashes.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.errors import MissingDependency
from curate.images import MAX_PIXELS, ImageProblem, decode_rgb
from curate.registry import register_stage
from curate.stage import concat_partials
from filters.image_size import ImageFilter, where

IN_DOCUMENT = "duplicate_image_in_document"
IN_CORPUS = "duplicate_image_in_corpus"
TOO_MANY = "too_many_copies"
_HASHERS = {"phash": "phash", "dhash": "dhash", "ahash": "average_hash", "whash": "whash"}


# ------------------------------------------------------------------------------------------ matching
def band_edges(bits: int, max_distance: int) -> list[int]:
    """Bit boundaries of ``max_distance + 1`` contiguous bands covering ``bits`` bits (sizes differ by
    at most one). Two hashes within ``max_distance`` agree exactly on at least one band (pigeonhole)."""
    bands = max_distance + 1
    return [bits * k // bands for k in range(bands + 1)]


_BYTE_BITS = np.array([b.bit_count() for b in range(256)], np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64, as uint8 (``np.bitwise_count`` on numpy 2, a byte table before it)."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_BITS[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, max_distance: int, bits: int = 64, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of ``hashes`` (uint64 holding ``bits`` bits) with Hamming distance at most
    ``max_distance``, as two index arrays sorted by (i, j).

    Multi-index hashing: the bits are cut into ``max_distance + 1`` bands; candidates are hashes equal
    on a band (grouped by sorting on that band's value), verified by their full distance, and a pair
    is reported by the first band it agrees on only. The work is the candidate pairs — about
    ``n² / 2^(bits / (max_distance + 1))`` per band for evenly spread hashes — never the ``n²`` of a scan.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    edges = band_edges(bits, max_distance)
    masks = [np.uint64(((1 << (hi - lo)) - 1) << lo) for lo, hi in itertools.pairwise(edges)]
    for b, (lo, mask) in enumerate(zip(edges, masks)):
        key = (h & mask) >> np.uint64(lo)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        starts = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]])) if n else np.zeros(0, np.int64)
        ends = np.concatenate([starts[1:], [n]]).astype(np.int64)
        many = ends - starts > 1
        for s, e in zip(starts[many], ends[many]):
            members = np.sort(order[s:e])
            hm = h[members]
            for a in range(0, len(members) - 1, block):  # the upper triangle, a block of rows at a time
                x = hm[a:a + block, None] ^ hm[None, a:]
                ii, jj = np.nonzero(popcount(x) <= max_distance)
                up = ii < jj
                ii, jj = ii[up] + a, jj[up] + a
                if not len(ii):
                    continue
                if b:  # keep the pairs no earlier band found
                    diff = hm[ii] ^ hm[jj]
                    first = np.ones(len(ii), bool)
                    for earlier in masks[:b]:
                        first &= (diff & earlier) != 0
                    ii, jj = ii[first], jj[first]
                out_i.append(members[ii])
                out_j.append(members[jj])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64)


def clusters(hashes: np.ndarray, max_distance: int, bits: int) -> np.ndarray:
    """A cluster label per hash: connected components of the within-``max_distance`` relation."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int64)
    i, j = near_pairs(hashes, max_distance, bits)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


#: Rows with more images than this are matched by :func:`near_pairs` instead of all pairs at once.
_DENSE_ROW = 512


def row_duplicates(hashes: np.ndarray, rows: np.ndarray, max_distance: int, bits: int) -> np.ndarray:
    """For images grouped by row (``rows`` non-decreasing): True for every image of a within-row
    cluster but its first. Rows of equal size are compared all pairs at once (a row holds few
    images); the label of an image is the smallest index reachable through near-duplicates."""
    n = len(hashes)
    dup = np.zeros(n, bool)
    if n < 2:
        return dup
    starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
    sizes = np.diff(np.concatenate([starts, [n]]))
    for k in np.unique(sizes[sizes > 1]).tolist():
        first = starts[sizes == k]
        if k > _DENSE_ROW:
            for s in first.tolist():
                labels = clusters(hashes[s:s + k], max_distance, bits)
                keep = np.zeros(k, bool)
                keep[np.unique(labels, return_index=True)[1]] = True
                dup[s:s + k] = ~keep
            continue
        step = max(1, 4_000_000 // (k * k))
        for c in range(0, len(first), step):
            idx = first[c:c + step, None] + np.arange(k)  # (rows, k)
            hk = hashes[idx]
            near = popcount(hk[:, :, None] ^ hk[:, None, :]) <= max_distance  # (rows, k, k)
            labels = np.broadcast_to(np.arange(k), idx.shape)
            while True:
                new = np.where(near, labels[:, None, :], k).min(axis=2)
                if np.array_equal(new, labels):
                    break
                labels = new
            dup[idx] = labels != np.arange(k)
    return dup


# ------------------------------------------------------------------------------------------ the stage
@register_stage("image_dedup")
class ImageDedup(ImageFilter):
    """Perceptual-hash near-duplicate images, per document or over the corpus, and over-copied images."""

    class Params(ImageFilter.Params):
        hash: Literal["phash", "dhash", "ahash", "whash"] = Field("phash", description="imagehash function")
        hash_size: int = Field(8, ge=2, le=8, description="hash side: hash_size² bits (at most 64)")
        max_distance: int = Field(5, ge=0, description="near-duplicates differ in at most this many bits "
                                  "(MMC4: 5 of 64)")
        scope: Literal["document", "corpus"] = Field("document", description="document: duplicates within a row; "
                                                     "corpus: also across rows (a global step)")
        max_copies: int | None = Field(None, ge=1, description="remove every image of a cluster with more images "
                                       "than this across the corpus (too_many_copies; MMC4: 10; a global step)")
        max_image_pixels: int = Field(MAX_PIXELS, gt=0, description="images with more pixels are not decoded "
                                      "(image_too_large, removed)")

        @model_validator(mode="after")
        def _fits(self):
            bits = self.hash_size ** 2
            if self.max_distance >= bits:
                raise ValueError(f"max_distance {self.max_distance} must be below the {bits} bits of the hash")
            if self.hash == "whash" and self.hash_size & (self.hash_size - 1):
                raise ValueError(f"whash needs a power-of-two hash_size, not {self.hash_size}")
            return self

    needs: ClassVar[dict[str, str]] = {"imagehash": "img", "PIL": "img", "scipy": "img"}

    @property
    def is_global(self) -> bool:
        return self.params.scope == "corpus" or self.params.max_copies is not None

    @property
    def bits(self) -> int:
        return self.params.hash_size ** 2

    def setup(self, ctx) -> None:
        try:
            import imagehash
        except ImportError as e:
            raise MissingDependency(e.name or "imagehash", "img") from None
        self._hasher = getattr(imagehash, _HASHERS[self.params.hash])

    # ---------------------------------------------------------------- hashing
    def hash_images(self, batch: pa.RecordBatch, view, ctx) -> tuple[np.ndarray, list[str | None]]:
        """A uint64 hash per image of ``view`` and None, or 0 and the problem reason (recorded in
        ``failures/`` and counted here). Identical bytes within the batch are decoded once."""
        if not hasattr(self, "_hasher"):
            self.setup(ctx)
        hashes = np.zeros(len(view), np.uint64)
        problems: list[str | None] = [None] * len(view)
        seen: dict[bytes, tuple[int, ImageProblem | None]] = {}
        ids = batch.column("id")
        for k, blob in enumerate(view.field("bytes")):
            data = blob.as_py() or b""
            if data not in seen:
                seen[data] = self._hash_one(data)
            value, problem = seen[data]
            if problem is None:
                hashes[k] = value
            else:
                problems[k] = problem.reason
                ctx.failure(problem.reason, f"stage {self.label}, {where(ids, view, k)}: {problem.detail}",
                            record=ids[int(view.rows[k])].as_py(), stage=self.label)
        return hashes, problems

    def _hash_one(self, data: bytes) -> tuple[int, ImageProblem | None]:
        if not data:
            return 0, ImageProblem("undecodable_image", "no image bytes")
        try:
            image = decode_rgb(data, self.params.max_image_pixels)
        except ImageProblem as problem:
            return 0, problem
        try:
            bits = np.asarray(self._hasher(image, hash_size=self.params.hash_size).hash, bool).ravel()
        except Exception as e:  # noqa: BLE001 - a picture imagehash cannot hash is this image's problem alone
            return 0, ImageProblem("undecodable_image", f"{self.params.hash}: {type(e).__name__}: {e}")
        value = 0
        for bit in bits:
            value = (value << 1) | int(bit)
        return value, None

    # ---------------------------------------------------------------- per row (and the global run)
    def image_reasons(self, batch, view, ctx, row0):
        if self.is_global:
            return self._global_reasons(batch, view, ctx, row0)
        hashes, problems = self.hash_images(batch, view, ctx)
        reasons: list[str | None] = list(problems)
        counted = {k for k, p in enumerate(problems) if p is not None}
        good = np.flatnonzero([p is None for p in problems])
        dup = row_duplicates(hashes[good], view.rows[good], self.params.max_distance, self.bits)
        for k in good[dup]:
            reasons[int(k)] = IN_DOCUMENT
        return reasons, counted

    def _global_reasons(self, batch, view, ctx, row0):
        state = ctx.global_state(self.label)
        span = state.get("shard_ranges", {}).get(ctx.shard.name)
        reasons: list[str | None] = [None] * len(view)
        counted: set[int] = set()
        if not span or span[0] == span[1]:
            return reasons, counted
        cols = ctx.global_columns(self.label, "removed")
        row = cols["row"].slice(span[0], span[1] - span[0]).to_numpy()
        lo, hi = np.searchsorted(row, [row0, row0 + batch.num_rows])
        if lo == hi:
            return reasons, counted
        at = slice(span[0] + lo, span[0] + hi)
        local = row[lo:hi] - row0
        pos = cols["pos"][at].to_numpy()
        key = view.rows.astype(np.int64) << 32 | view.pos.astype(np.int64)
        want = local.astype(np.int64) << 32 | pos.astype(np.int64)
        k = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
        found = len(key) > 0 and bool((key[k] == want).all())
        ids = batch.column("id").take(pa.array(local, pa.int64())).to_pylist()
        if not found or ids != cols["id"][at].to_pylist():
            raise RuntimeError(f"{self.label}: the combined state does not match shard {ctx.shard.name}'s input "
                               f"(rows {row0} to {row0 + batch.num_rows - 1}); rerun with --restart")
        for kk, reason, was_counted in zip(k, cols["reason"][at].to_pylist(), cols["counted"][at].to_pylist()):
            reasons[int(kk)] = reason
            if was_counted:
                counted.add(int(kk))
        return reasons, counted

    # ---------------------------------------------------------------- global protocol
    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        from filters.image_size import image_view

        view = image_view(batch)
        hashes, problems = self.hash_images(batch, view, ctx) if len(view) else (np.zeros(0, np.uint64), [])
        counts = view.image_counts()
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        bad = np.array([p is not None for p in problems], bool)
        partial.add(pa.table({
            "shard": pa.array([ctx.shard.name] * batch.num_rows, pa.string()),
            "row": pa.array(np.arange(partial.rows, partial.rows + batch.num_rows, dtype=np.int64)),
            "id": batch.column("id").cast(pa.string()),
            "pos": pa.ListArray.from_arrays(offsets, pa.array(view.pos.astype(np.int32))),
            "hash": pa.ListArray.from_arrays(offsets, pa.array(hashes, pa.uint64(), mask=bad)),
            "problem": pa.ListArray.from_arrays(offsets, pa.array(problems, pa.string())),
        }))

    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        table = concat_partials(partials)
        if table is None:
            return {"images": 0, "unusable": 0, "clusters": 0, "removed": {}, "size_histogram": {},
                    "largest": [], "shard_ranges": {}}
        table = table.take(pc.sort_indices(table, [("shard", "ascending"), ("row", "ascending")])).combine_chunks()
        doc = pc.list_parent_indices(table.column("pos")).to_numpy()  # the sorted table's row, per image
        n = len(doc)
        pos = pc.list_flatten(table.column("pos")).to_numpy() if n else np.zeros(0, np.int32)
        hash_col = pc.list_flatten(table.column("hash")) if n else pa.array([], pa.uint64())
        ok = hash_col.is_valid().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
        names = [None, IN_DOCUMENT, IN_CORPUS, TOO_MANY]
        code = np.zeros(n, np.int16)
        bad = np.flatnonzero(~ok)  # recorded in failures/ and counted where they were observed
        if len(bad):
            problems = pc.list_flatten(table.column("problem")).take(pa.array(bad, pa.int64())).to_pylist()
            names += sorted(set(problems))
            code[bad] = [names.index(r) for r in problems]
        good = np.flatnonzero(ok)
        hashes = pc.fill_null(hash_col, 0).to_numpy()[good] if n else np.zeros(0, np.uint64)
        uniq, inverse = np.unique(hashes, return_inverse=True)
        label = clusters(uniq, self.params.max_distance, self.bits)[inverse.ravel()] if len(uniq) else \
            np.zeros(0, np.int64)
        sizes = np.bincount(label) if len(label) else np.zeros(0, np.int64)
        first = np.unique(label, return_index=True)[1]  # labels are 0..k-1: first[c] is cluster c's first image
        kept = good[first[label]] if len(label) else np.zeros(0, np.int64)
        big = sizes[label] > self.params.max_copies if self.params.max_copies is not None else \
            np.zeros(len(good), bool)
        code[good[big]] = names.index(TOO_MANY)
        if self.params.scope == "corpus":
            dup = ~big & (good != kept)
            same = doc[good] == doc[kept]
            code[good[dup & same]] = names.index(IN_DOCUMENT)
            code[good[dup & ~same]] = names.index(IN_CORPUS)
        else:  # within each row, as the per-row stage does, among the images not already removed
            rest = np.flatnonzero(~big)
            dup = row_duplicates(hashes[rest], doc[good[rest]], self.params.max_distance, self.bits)
            code[good[rest[dup]]] = names.index(IN_DOCUMENT)
        removed = np.flatnonzero(code)
        rows = pa.array(doc[removed], pa.int64())
        gone = pa.table({
            "shard": table.column("shard").take(rows),
            "row": table.column("row").take(rows),
            "id": table.column("id").take(rows),
            "pos": pa.array(pos[removed], pa.int32()),
            "reason": pa.DictionaryArray.from_arrays(pa.array(code[removed].astype(np.int32)),
                                                     pa.array(names, pa.string())).cast(pa.string()),
            "counted": pa.array(~ok[removed]),
        })
        ranges: dict[str, list[int]] = {}
        for k, name in enumerate(gone.column("shard").to_pylist()):
            ranges.setdefault(name, [k, k])[1] = k + 1
        hist = Counter(int(s) for s in sizes if s > 1)
        largest = []
        for c in np.argsort(-sizes, kind="stable")[:10]:
            if sizes[c] < 2:
                break
            k = int(good[first[c]])
            largest.append({"size": int(sizes[c]), "kept_id": table.column("id")[int(doc[k])].as_py(),
                            "pos": int(pos[k]), "hash": f"{int(hashes[first[c]]):0{(self.bits + 3) // 4}x}"})
        by_reason = Counter(names[c] for c in code[removed].tolist())
        return {"images": int(n), "unusable": len(bad), "clusters": int((sizes > 1).sum()),
                "removed": dict(sorted(by_reason.items())),
                "size_histogram": {str(k): hist[k] for k in sorted(hist)}, "largest": largest,
                "shard_ranges": ranges, "_tables": {"removed": gone}}

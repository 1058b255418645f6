"""``minhash_dedup``: near-duplicate removal with MinHash LSH (global), on datatrove's machinery.

Signatures are datatrove's (``MinhashDedupSignature``): the text is normalized (``simplify_text``),
split into words by datatrove's word tokenizer, hashed as word ``n_grams`` (xxhash, 64-bit) and reduced
to ``num_buckets × hashes_per_bucket`` min-hashes under seeded universal hash permutations. Two rows
are candidates when all hashes of at least one bucket (band) agree; the probability of that for two
texts of Jaccard similarity ``s`` is ``1 − (1 − s^r)^b`` (b = 14, r = 8: 0.92 at s = 0.8, 0.02 at
s = 0.5). With ``threshold`` set, a candidate pair is only joined when the share of equal min-hashes
over the whole signature (an unbiased Jaccard estimate) reaches it. The driver gets one 64-bit hash
per band (the full signature only with ``threshold``). Candidates are joined into clusters
(union-find); see :mod:`filters.dedup_base` for which row stays, the scores and the report. Texts
shorter than one shingle get values no other row shares (exact copies of them are ``exact_dedup``'s).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.errors import MissingDependency
from curate.models import shared
from curate.registry import register_stage
from curate.seeds import doc_hashes
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
        shingles: Literal["datatrove", "fast"] = Field(
            "datatrove", description="datatrove: its word tokenizer and a hash per n-gram (signatures equal "
            "datatrove's); fast: whitespace words after the same normalization, n-grams hashed in numpy")

    needs = {"datatrove": "quality", "spacy": "quality", "xxhash": "quality"}

    def score_names(self) -> list[str]:
        """The cluster scores every row gets (see :mod:`filters.dedup_base`)."""
        return ["cluster_size", "cluster"]

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
        # the word-hash cache lives as long as the worker, shared by every shard with these n-grams
        self._fast = shared("fast_shingles", (p.n_grams,), lambda: FastShingles(p.n_grams)) \
            if p.shingles == "fast" else None

    def keys(self, texts: list[str], ids: list[str]) -> dict[str, pa.Array]:
        sigs = np.empty((len(texts), self._width), np.uint64)
        for i, text in enumerate(texts):
            shingles = self._sig.get_shingles(text) if self._fast is None else self._fast(text)
            if len(shingles) == 0:  # shorter than one n-gram: values no other row shares (exact_dedup's job)
                sigs[i] = _mix(np.arange(self._width, dtype=np.uint64) + doc_hashes(0, self.label, [ids[i]])[0])
                continue
            sigs[i] = np.concatenate(self._sig.get_signature(shingles))
        p = self.params
        bands = band_hashes(sigs, p.num_buckets, p.hashes_per_bucket)
        out = {"bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1)), p.num_buckets)}
        if p.threshold is not None:  # the full signature is only needed to estimate similarity
            out["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1)), self._width)
        return out

    def cluster(self, table: pa.Table) -> np.ndarray:
        n = table.num_rows
        b = self.params.num_buckets
        bands = table.column("bands").combine_chunks().flatten().to_numpy().reshape(n, b)
        sigs = None
        if self.params.threshold is not None:
            width = table.schema.field("signature").type.list_size
            sigs = table.column("signature").combine_chunks().flatten().to_numpy().reshape(n, width)
        parent = np.arange(n)

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        for band in range(b):
            _, inverse, counts = np.unique(bands[:, band], return_inverse=True, return_counts=True)
            shared = np.flatnonzero(counts[inverse] > 1)
            if len(shared) == 0:
                continue
            order = shared[np.argsort(inverse[shared], kind="stable")]
            for group in np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1):
                head = int(group[0])  # with a threshold, each member is compared with the group's first
                for other in group[1:]:
                    other = int(other)
                    if sigs is not None and np.mean(sigs[head] == sigs[other]) < self.params.threshold:
                        continue
                    a, c = find(head), find(other)
                    if a != c:
                        parent[max(a, c)] = min(a, c)
        labels = np.arange(n)
        for x in np.flatnonzero(parent != labels):  # only rows that were joined need their root looked up
            labels[x] = find(int(x))
        return labels


class FastShingles:
    """n-gram shingles as uint64 ``(N, 1)``, like datatrove's, at a fraction of the cost.

    Same normalization (datatrove's ``simplify_text``); words are the whitespace-separated tokens of the
    normalized text (datatrove's English word tokenizer also splits contractions such as "i'd", so the
    shingle sets differ slightly); each distinct word is hashed once (xxhash 64, cached per process) and
    an n-gram's hash mixes its words' hashes in order (rotations + the splitmix64 finalizer), in numpy.
    """

    def __init__(self, n: int):
        import xxhash
        from datatrove.utils.text import simplify_text

        self.n = n
        self.simplify = simplify_text
        self.hash = xxhash.xxh64_intdigest
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        words = self.simplify(text).split()
        if len(words) < self.n:
            return np.zeros((0, 1), np.uint64)
        cache, h = self.cache, self.hash
        if len(cache) > 2_000_000:
            cache.clear()
        ids = np.fromiter((cache[w] if w in cache else cache.setdefault(w, h(w.encode())) for w in words),
                          np.uint64, len(words))
        count = len(words) - self.n + 1
        acc = np.zeros(count, np.uint64)
        for k in range(self.n):
            part = ids[k:k + count]
            r = np.uint64((11 * k) % 64)
            acc = _mix(acc ^ ((part << r) | (part >> (np.uint64(64) - r)) if r else part))
        return acc.reshape(-1, 1)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit hash per band of ``rows`` min-hashes (splitmix64 chaining): ``(n, bands)``.

    Storing band hashes instead of whole signatures makes the driver's input 8× smaller (r = 8); two
    bands collide by accident with probability ~2^-64.
    """
    x = sigs.reshape(len(sigs), bands, rows)
    h = np.zeros((len(sigs), bands), np.uint64)
    for k in range(rows):
        h = _mix(h ^ x[:, :, k])
    return h


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))

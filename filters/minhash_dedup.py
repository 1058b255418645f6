"""``minhash_dedup``: near-duplicate removal with MinHash LSH (global), on datatrove's machinery.

Signatures are datatrove's (``MinhashDedupSignature``): the text is normalized (``simplify_text``),
split into words by datatrove's word tokenizer, hashed as word ``n_grams`` (xxhash, 64-bit) and reduced
to ``num_buckets × hashes_per_bucket`` min-hashes under seeded universal hash permutations. Two rows
are candidates when all hashes of at least one bucket (band) agree; the probability of that for two
texts of Jaccard similarity ``s`` is ``1 − (1 − s^r)^b`` (b = 14, r = 8: 0.92 at s = 0.8, 0.02 at
s = 0.5). With ``threshold`` set, a candidate pair is only joined when the share of equal min-hashes
over the whole signature (an unbiased Jaccard estimate) reaches it. The driver gets one 64-bit hash
per band (the full signature only with ``threshold``). Candidates are joined into clusters by
:mod:`filters.band_groups` (on disk, bounded memory); see :mod:`filters.dedup_base` for which row stays,
the scores and the report. Texts shorter than one shingle get values no other row shares (exact copies of
them are ``exact_dedup``'s).

Speed: datatrove's tokenizer (spaCy's rule-based tokenizer) splits the normalized text at whitespace and
tokenizes each piece on its own, so :class:`DatatroveShingles` tokenizes each distinct word once (cached
per worker) and gets exactly datatrove's tokens, n-grams and hashes — several times faster. Languages
whose datatrove tokenizer is not spaCy's rule-based one take datatrove's own function per text.
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
from filters.band_groups import PairCheck, Rows
from filters.dedup_base import GlobalDedup

_MERSENNE = np.uint64((1 << 61) - 1)


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
        self._a, self._b = self._sig.parameters
        # word caches live as long as the worker, shared by every shard with these settings
        if p.shingles == "fast":
            self._shingles = shared("fast_shingles", (p.n_grams,), lambda: FastShingles(p.n_grams))
        else:
            self._shingles = shared("datatrove_shingles", (p.n_grams, p.language),
                                    lambda: DatatroveShingles(self._sig))

    def keys(self, texts: list[str], ids: list[str]) -> dict[str, pa.Array]:
        sigs = np.empty((len(texts), self._width), np.uint64)
        for i, text in enumerate(texts):
            shingles = self._shingles(text)
            if len(shingles) == 0:  # shorter than one n-gram: values no other row shares (exact_dedup's job)
                sigs[i] = _mix(np.arange(self._width, dtype=np.uint64) + doc_hashes(0, self.label, [ids[i]])[0])
                continue
            # datatrove's get_signature (64-bit precision), without its per-band Python lists
            sigs[i] = ((shingles * self._a + self._b) % _MERSENNE).min(axis=0)
        p = self.params
        bands = band_hashes(sigs, p.num_buckets, p.hashes_per_bucket)
        out = {"bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.reshape(-1)), p.num_buckets)}
        if p.threshold is not None:  # the full signature is only needed to estimate similarity
            out["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1)), self._width)
        return out

    @property
    def bands(self) -> int:
        return self.params.num_buckets

    def band_keys(self, table: pa.Table) -> np.ndarray:
        return _fixed_lists(table.column("bands"), self.params.num_buckets)

    def pair_check(self, rows: Rows) -> PairCheck | None:
        """With ``threshold``: a pair joins when that share of the whole signatures' min-hashes agree."""
        threshold = self.params.threshold
        if threshold is None:
            return None

        def similar(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            keep = np.empty(len(a), bool)
            for start in range(0, len(a), 1 << 16):  # bounded: 64K pairs of signatures at a time
                x, y = a[start:start + (1 << 16)], b[start:start + (1 << 16)]
                same = rows.matrix("signature", x) == rows.matrix("signature", y)
                keep[start:start + len(x)] = same.mean(axis=1) >= threshold
            return keep

        return similar


class DatatroveShingles:
    """datatrove's ``get_shingles`` (same tokens, n-grams and xxhash values), each distinct word tokenized once.

    spaCy's rule-based tokenizer splits at whitespace first and tokenizes every piece independently, and
    datatrove's normalized text has single spaces only, so the tokens of a text are the concatenation of
    each word's tokens. Other tokenizers (and any text the per-word path fails on) use datatrove's own.
    """

    def __init__(self, sig):
        import xxhash
        from datatrove.utils.text import simplify_text

        self.sig = sig
        self.n = sig.config.n_grams
        self.simplify = lambda text: simplify_text(text, sig.config.norm_config)
        self.hash = xxhash.xxh64_intdigest
        self.cache: dict[str, list[str]] = {}
        self._tokenize = None  # loaded on first use: a worker that only scores never imports spaCy

    @property
    def tokenize(self):
        """Token texts of one word with spaCy's rule-based tokenizer, or None (datatrove's path per text)."""
        if self._tokenize is None:
            config = self.sig.config.hash_config
            usable = config.precision == 64 and config.hash_fc == "xxhash"
            self._tokenize = (_per_word_tokenizer(self.sig) if usable else None) or False
        return self._tokenize or None

    def __call__(self, text: str) -> np.ndarray:
        if self.tokenize is None:
            return self.sig.get_shingles(text)
        try:
            words = self._words(self.simplify(text))
        except Exception:  # what datatrove does about it (e.g. spaCy's "IS_ALPHA" failure) stays its own
            return self.sig.get_shingles(text)
        count = len(words) - self.n + 1
        if count <= 0:
            return np.zeros((0, 1), np.uint64)
        joined = " ".join(words)  # a shingle is a slice of it: tokens never contain spaces
        ends = np.cumsum([len(w) + 1 for w in words]).tolist()
        starts = [0] + ends[:-1]
        n, h = self.n, self.hash
        return np.fromiter((h(joined[starts[i]:ends[i + n - 1] - 1]) for i in range(count)), np.uint64,
                           count).reshape(-1, 1)

    def _words(self, simple: str) -> list[str]:
        cache, out = self.cache, []
        if len(cache) > 1_000_000:
            cache.clear()
        for word in simple.split(" "):
            tokens = cache.get(word)
            if tokens is None:
                tokens = cache[word] = [t for t in (tok.strip() for tok in self.tokenize(word)) if t]
            out.extend(tokens)
        return out


def _per_word_tokenizer(sig):
    """spaCy's rule-based tokenizer behind datatrove's word tokenizer (token texts), or None."""
    from datatrove.utils.word_tokenizers import SpaCyTokenizer

    if type(sig.word_tokenizer) is not SpaCyTokenizer:
        return None
    from spacy.tokenizer import Tokenizer

    tokenizer = sig.word_tokenizer.tokenizer.tokenizer
    if type(tokenizer) is not Tokenizer:
        return None
    return lambda word: [t.text for t in tokenizer(word)]


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


def _fixed_lists(column, width: int) -> np.ndarray:
    """A fixed-size-list uint64 column (chunked or not) as an ``(rows, width)`` array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy().reshape(-1, width)


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

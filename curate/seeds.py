"""Derived seeds: one manifest seed, everything else a stable digest of it.

No ``hash()`` (salted per interpreter), no pid, no time, no global ``random``: the same manifest gives
the same bytes on any machine, with any number of workers, in any shard order.
"""

from __future__ import annotations

import hashlib

import numpy as np


def digest(*parts: object, size: int = 8) -> bytes:
    """A stable digest of ``parts`` (each rendered with ``str`` and separated unambiguously)."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        data = str(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def derive_seed(seed: int, *parts: object) -> int:
    """A 64-bit seed for ``parts`` (e.g. ``stage, shard_key``) under the manifest ``seed``."""
    return int.from_bytes(digest(seed, *parts), "little")


def rng(seed: int, *parts: object) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed`."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *parts)))


def doc_hashes(seed: int, stage: str, ids: list[str]) -> np.ndarray:
    """Per-document 64-bit hashes of ``(seed, stage, doc_id)`` for per-document decisions."""
    keyed = hashlib.blake2b(digest_size=8, key=digest(seed, stage))  # copied per id: the key is set up once
    digests = []
    for doc_id in ids:
        h = keyed.copy()
        h.update(doc_id.encode())
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


def doc_uniform(seed: int, stage: str, ids: list[str]) -> np.ndarray:
    """Per-document uniform draws in [0, 1) from :func:`doc_hashes`."""
    return (doc_hashes(seed, stage, ids) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


_MASK = (1 << 64) - 1


class Stream:
    """A cheap counter-based random stream (splitmix64 over a stable key) for per-document draws.

    Creating a numpy Generator costs ~15 µs; a UtK plan needs a handful of draws per document, so this
    keyed stream (a blake2b key, then one 64-bit mix per draw) keeps per-document randomness derived and
    reproducible at a fraction of the cost.
    """

    __slots__ = ("key", "counter")

    def __init__(self, seed: int, *parts: object):
        self.key = derive_seed(seed, *parts)
        self.counter = 0

    def next64(self) -> int:
        self.counter += 1
        z = (self.key + self.counter * 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """Uniform in [0, 1)."""
        return (self.next64() >> 11) / float(1 << 53)

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) (multiply-shift; bias below 2^-32 for n < 2^32)."""
        return (self.next64() * n) >> 64

    def distinct(self, n: int, k: int) -> list[int]:
        """``k`` distinct integers from [0, n), sorted (k ≤ n)."""
        picked: set[int] = set()
        while len(picked) < k:
            picked.add(self.below(n))
        return sorted(picked)


def pick_weighted(u: float, weights: list[float]) -> int:
    """The index whose cumulative-weight interval holds ``u`` (uniform in [0, 1); weights summing to 1)."""
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)  # rounding left u above the sum

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
    prefix = digest(seed, stage)
    out = np.empty(len(ids), dtype=np.uint64)
    for i, doc_id in enumerate(ids):
        out[i] = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8, key=prefix).digest(), "little")
    return out


def doc_uniform(seed: int, stage: str, ids: list[str]) -> np.ndarray:
    """Per-document uniform draws in [0, 1) from :func:`doc_hashes`."""
    return (doc_hashes(seed, stage, ids) >> np.uint64(11)).astype(np.float64) / float(1 << 53)

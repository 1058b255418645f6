"""``exact_dedup``: drop rows whose normalized text is identical to an earlier row's (global).

The key is datatrove's 64-bit xxhash of the text after datatrove's ``simplify_text`` (lower case, whitespace
collapsed, punctuation removed, diacritics and digits normalized), or of the raw text with
``normalize: false``. Rows with equal keys form a cluster; see :mod:`filters.dedup_base` for which row
stays, the scores and the report.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.arrays import numeric
from curate.errors import MissingDependency
from curate.registry import register_stage
from filters.dedup_base import GlobalDedup


@register_stage("exact_dedup")
class ExactDedup(GlobalDedup):
    """Exact duplicates of the (normalized) text, one kept per cluster."""

    class Params(GlobalDedup.Params):
        normalize: bool = Field(True, description="compare datatrove-normalized text (false: raw text)")

    needs = {"datatrove": "quality", "xxhash": "quality"}

    def score_names(self) -> list[str]:
        """The cluster scores every row gets (see :mod:`filters.dedup_base`)."""
        return ["cluster_size", "cluster"]

    def setup(self, ctx) -> None:
        try:
            from datatrove.utils.hashing import HashConfig, create_hash_func
            from datatrove.utils.text import simplify_text
        except ImportError as e:
            raise MissingDependency(e.name or "datatrove", "quality") from None
        self._hash = create_hash_func(HashConfig(precision=64, hash_fc="xxhash"))
        self._norm = simplify_text if self.params.normalize else (lambda t: t)

    def keys(self, texts: list[str], ids: list[str]) -> dict[str, pa.Array]:
        return {"hash": numeric(np.fromiter((self._hash(self._norm(t)) for t in texts), np.uint64, len(texts)))}

    def band_keys(self, table: pa.Table) -> np.ndarray:
        return table.column("hash").to_numpy().reshape(-1, 1)

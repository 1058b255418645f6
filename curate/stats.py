"""Statistics that merge: per stage, counts, drops by reason, tokens, bytes and seconds.

Each shard writes its own ``stats/<shard>.json``; :func:`merge` sums them into ``stats.json``.
Keys are stable snake_case names, never display strings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Summary:
    """A mergeable numeric summary (count, sum, min, max; mean on output)."""

    count: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None

    def add_many(self, count: int, total: float, lo: float | None, hi: float | None) -> None:
        if not count:
            return
        self.count += count
        self.total += total
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def to_dict(self) -> dict[str, Any]:
        mean = self.total / self.count if self.count else None
        return {"count": self.count, "sum": self.total, "min": self.min, "max": self.max, "mean": mean}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        return cls(d["count"], d["sum"], d["min"], d["max"])


@dataclass
class StageStats:
    """What one stage did on one shard (or, merged, on the whole run)."""

    rows_in: int = 0
    rows_out: int = 0
    drops: Counter = field(default_factory=Counter)
    tokens_out: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    metrics: dict[str, Summary] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.drops[reason] += n

    def metric(self, name: str) -> Summary:
        return self.metrics.setdefault(name, Summary())

    def merge(self, other: StageStats) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.drops.update(other.drops)
        self.tokens_out += other.tokens_out
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        for name, s in other.metrics.items():
            self.metric(name).add_many(s.count, s.total, s.min, s.max)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "drops": dict(sorted(self.drops.items())),
            "tokens_out": self.tokens_out,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 4),
            "metrics": {k: v.to_dict() for k, v in sorted(self.metrics.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        return cls(
            rows_in=d["rows_in"], rows_out=d["rows_out"], drops=Counter(d["drops"]),
            tokens_out=d.get("tokens_out", 0), bytes_out=d.get("bytes_out", 0), seconds=d["seconds"],
            metrics={k: Summary.from_dict(v) for k, v in d.get("metrics", {}).items()},
        )


class ShardStats(dict):
    """Stage label → :class:`StageStats`, created on first use, kept in pipeline order."""

    def __missing__(self, key: str) -> StageStats:
        value = self[key] = StageStats()
        return value

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() for k, v in self.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardStats:
        out = cls()
        for k, v in d.items():
            out[k] = StageStats.from_dict(v)
        return out


def merge(shards: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, Any]:
    """Sum per-shard stage stats; stages appear in ``order`` first, then as first seen."""
    total = ShardStats()
    for label in order or []:
        total[label]  # noqa: B018 - creates the entry so the order is the pipeline's
    for shard in shards:
        for label, st in ShardStats.from_dict(shard).items():
            total[label].merge(st)
    return total.to_dict()

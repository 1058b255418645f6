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


#: Histogram bucket edges: 12 per decade from 1e-4 to 1e5 (seconds, tokens …), so percentiles are
#: exact to about 20% of the value whatever the scale, and histograms of any shards merge by adding.
_PER_DECADE, _LOW_EXP, _HIGH_EXP = 12, -4, 5


def _bucket(value: float) -> int:
    import math

    if value <= 10.0 ** _LOW_EXP:
        return 0
    b = int(math.floor((math.log10(value) - _LOW_EXP) * _PER_DECADE)) + 1
    return min(b, (_HIGH_EXP - _LOW_EXP) * _PER_DECADE + 1)


def _upper_edge(bucket: int) -> float:
    return 10.0 ** (_LOW_EXP + bucket / _PER_DECADE)


@dataclass
class Histogram:
    """A mergeable histogram of positive values (latencies) on fixed log-spaced buckets; ``to_dict``
    gives count, min, max and the 50th, 90th and 99th percentiles (interpolated inside their bucket,
    clamped to ``[min, max]``)."""

    buckets: Counter = field(default_factory=Counter)
    count: int = 0
    min: float | None = None
    max: float | None = None

    def add(self, value: float) -> None:
        self.buckets[_bucket(value)] += 1
        self.count += 1
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def merge(self, other: Histogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        for v in (other.min, other.max):
            if v is not None:
                self.min = v if self.min is None else min(self.min, v)
                self.max = v if self.max is None else max(self.max, v)

    def percentile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for b in sorted(self.buckets):
            n = self.buckets[b]
            if seen + n >= rank:  # geometric interpolation inside the bucket
                lo, hi = (_upper_edge(b - 1) if b else self.min), _upper_edge(b)
                value = lo * (hi / lo) ** ((rank - seen) / n) if lo and lo > 0 else hi
                return min(max(value, self.min), self.max)
            seen += n
        return self.max

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else float(f"{v:.4g}")

        return {"count": self.count, "min": r(self.min), "max": r(self.max), "p50": r(self.percentile(0.5)),
                "p90": r(self.percentile(0.9)), "p99": r(self.percentile(0.99)),
                "buckets": {str(k): v for k, v in sorted(self.buckets.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        return cls(Counter({int(k): v for k, v in d.get("buckets", {}).items()}), d["count"], d["min"], d["max"])


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
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.drops[reason] += n

    def metric(self, name: str) -> Summary:
        return self.metrics.setdefault(name, Summary())

    def histogram(self, name: str) -> Histogram:
        return self.histograms.setdefault(name, Histogram())

    def count(self, name: str, n: float = 1) -> None:
        """Add ``n`` to the counter metric ``name`` (a Summary of one value per call)."""
        self.metric(name).add_many(1, n, n, n)

    def merge(self, other: StageStats) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.drops.update(other.drops)
        self.tokens_out += other.tokens_out
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        for name, s in other.metrics.items():
            self.metric(name).add_many(s.count, s.total, s.min, s.max)
        for name, h in other.histograms.items():
            self.histogram(name).merge(h)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "drops": dict(sorted(self.drops.items())),
            "tokens_out": self.tokens_out,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 4),
            "metrics": {k: v.to_dict() for k, v in sorted(self.metrics.items())},
        }
        if self.histograms:
            out["histograms"] = {k: v.to_dict() for k, v in sorted(self.histograms.items())}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        return cls(
            rows_in=d["rows_in"], rows_out=d["rows_out"], drops=Counter(d["drops"]),
            tokens_out=d.get("tokens_out", 0), bytes_out=d.get("bytes_out", 0), seconds=d["seconds"],
            metrics={k: Summary.from_dict(v) for k, v in d.get("metrics", {}).items()},
            histograms={k: Histogram.from_dict(v) for k, v in d.get("histograms", {}).items()},
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

"""Statistics that merge: per stage, counts, drops by reason, tokens, bytes and seconds.

Each shard writes its own ``stats/<shard>.json``; :func:`merge` sums them into ``stats.json``.
Keys are stable snake_case names, never display strings. Filters also record the distribution of
every numeric score they write (:class:`ScoreHistogram`, under ``scores``) and the fixed bounds they
drop by (under ``thresholds``), which ``curate report`` plots.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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


def _widen(into, other) -> None:
    """Extend ``into.min``/``into.max`` (None: nothing seen) to cover ``other``'s."""
    for v in (other.min, other.max):
        if v is not None:
            into.min = v if into.min is None else min(into.min, v)
            into.max = v if into.max is None else max(into.max, v)


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
        _widen(self, other)

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


#: Score-histogram buckets: 40 per decade of |value| from 1e-9 to 1e15, a sign, and a zero bucket.
#: Bucket ``k > 0`` holds ``[10**(LOW + (k-1)/PER), 10**(LOW + k/PER))`` (bucket 1 also everything
#: smaller, the top bucket everything larger), bucket ``-k`` the same negated, bucket 0 exact zeros.
SCORE_PER_DECADE, _SCORE_LOW_EXP, _SCORE_HIGH_EXP = 40, -9, 15
_SCORE_TOP = (_SCORE_HIGH_EXP - _SCORE_LOW_EXP) * SCORE_PER_DECADE


def _score_edge(k: int) -> float:
    """The upper edge of positive bucket ``k`` (``k = 0``: the lower edge of bucket 1)."""
    return 10.0 ** (_SCORE_LOW_EXP + k / SCORE_PER_DECADE)


def score_bucket_range(bucket: int) -> tuple[float, float]:
    """``(low, high)`` of a signed score bucket; ``(0.0, 0.0)`` for the zero bucket."""
    if bucket == 0:
        return 0.0, 0.0
    lo, hi = _score_edge(abs(bucket) - 1), _score_edge(abs(bucket))
    return (lo, hi) if bucket > 0 else (-hi, -lo)


def _as_float_array(values: Any) -> tuple[np.ndarray, int] | None:
    """A numeric or boolean Arrow array (or numpy array) as float64 without its nulls, and the null
    count; None for any other type (strings, lists, structs are not scores to plot)."""
    import pyarrow as pa

    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            return None
        return values.astype(np.float64, copy=False).ravel(), 0
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        return None
    nulls = values.null_count
    if nulls:
        values = values.drop_null()
    if pa.types.is_boolean(t) or pa.types.is_float16(t):
        values = values.cast(pa.float64())
    return values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False), nulls


@dataclass
class ScoreHistogram:
    """A mergeable histogram of real scores (any sign) on fixed signed log-spaced buckets.

    Exact: ``count`` (finite values), ``total`` (their sum), ``min``/``max`` (finite), ``nan``,
    ``null``, ``inf`` and ``neg_inf`` counts; so ``count + nan + null + inf + neg_inf`` is the number
    of rows added. Percentiles are interpolated inside a bucket (within ~6% of the value) and clamped to
    ``[min, max]``. Two histograms merge by adding, so shard order never matters.
    """

    buckets: Counter = field(default_factory=Counter)
    count: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None
    nan: int = 0
    null: int = 0
    inf: int = 0
    neg_inf: int = 0

    def add_array(self, values: Any) -> bool:
        """Add every value of a numeric or boolean array (Arrow or numpy), vectorized; returns False
        (and adds nothing) for other types."""
        got = _as_float_array(values)
        if got is None:
            return False
        x, nulls = got
        self.null += nulls
        finite = np.isfinite(x)
        if not finite.all():
            nan = np.isnan(x)
            self.nan += int(nan.sum())
            self.inf += int((x == np.inf).sum())
            self.neg_inf += int((x == -np.inf).sum())
            x = x[finite]
        if not len(x):
            return True
        mag = np.abs(x)
        with np.errstate(divide="ignore"):
            idx = np.floor((np.log10(np.where(mag > 0, mag, 1.0)) - _SCORE_LOW_EXP) * SCORE_PER_DECADE)
        idx = np.clip(idx, 0, _SCORE_TOP - 1).astype(np.int64) + 1
        idx = np.where(mag > 0, np.where(x < 0, -idx, idx), 0)
        counts = np.bincount(idx + _SCORE_TOP, minlength=2 * _SCORE_TOP + 1)
        for b in np.flatnonzero(counts):
            self.buckets[int(b) - _SCORE_TOP] += int(counts[b])
        self.count += len(x)
        self.total += float(x.sum())
        lo, hi = float(x.min()), float(x.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        return True

    def merge(self, other: ScoreHistogram) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count
        self.total += other.total
        self.nan += other.nan
        self.null += other.null
        self.inf += other.inf
        self.neg_inf += other.neg_inf
        _widen(self, other)

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the finite values; None when there are none."""
        if not self.count:
            return None
        rank, seen = q * self.count, 0
        for b in sorted(self.buckets):
            n = self.buckets[b]
            if n and seen + n >= rank:  # linear interpolation inside the bucket
                lo, hi = score_bucket_range(b)
                value = lo + (hi - lo) * ((rank - seen) / n)
                return min(max(value, self.min), self.max)
            seen += n
        return self.max

    def bins(self) -> list[tuple[float, float, int]]:
        """``(low, high, count)`` of every non-empty bucket in value order, the outer ones clamped to
        ``[min, max]`` (what a plot draws)."""
        out = []
        for b in sorted(self.buckets):
            lo, hi = score_bucket_range(b)
            out.append((max(lo, self.min), min(hi, self.max), self.buckets[b]))
        return out

    def to_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else float(f"{v:.6g}")

        return {"count": self.count, "sum": self.total, "min": self.min, "max": self.max,
                "mean": self.total / self.count if self.count else None,
                "p50": r(self.percentile(0.5)), "p90": r(self.percentile(0.9)), "p99": r(self.percentile(0.99)),
                "nan": self.nan, "null": self.null, "inf": self.inf, "neg_inf": self.neg_inf,
                "per_decade": SCORE_PER_DECADE, "buckets": {str(k): v for k, v in sorted(self.buckets.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoreHistogram:
        if d.get("per_decade", SCORE_PER_DECADE) != SCORE_PER_DECADE:
            raise ValueError(f"score histogram with {d['per_decade']} buckets per decade; this version "
                             f"writes {SCORE_PER_DECADE}")
        return cls(Counter({int(k): v for k, v in d.get("buckets", {}).items()}), d["count"], d["sum"],
                   d["min"], d["max"], d.get("nan", 0), d.get("null", 0), d.get("inf", 0), d.get("neg_inf", 0))


def merge_bounds(a: dict[str, float | None] | None, b: dict[str, float | None]) -> dict[str, float | None]:
    """The tighter of two ``{"min", "max"}`` bounds (a row must meet both): the larger min, the smaller max."""
    if not a:
        return {"min": b.get("min"), "max": b.get("max")}
    lows = [v for v in (a.get("min"), b.get("min")) if v is not None]
    highs = [v for v in (a.get("max"), b.get("max")) if v is not None]
    return {"min": max(lows) if lows else None, "max": min(highs) if highs else None}


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
    #: metric → distribution of the scores a filter wrote (``scores.<label>.<metric>``)
    scores: dict[str, ScoreHistogram] = field(default_factory=dict)
    #: metric (or a column path such as ``scores.heuristics.n_words``) → ``{"min": x, "max": y}``
    thresholds: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        if n:
            self.drops[reason] += n

    def metric(self, name: str) -> Summary:
        return self.metrics.setdefault(name, Summary())

    def histogram(self, name: str) -> Histogram:
        return self.histograms.setdefault(name, Histogram())

    def score(self, name: str) -> ScoreHistogram:
        return self.scores.setdefault(name, ScoreHistogram())

    def threshold(self, name: str, lo: float | None = None, hi: float | None = None) -> None:
        """Record a bound a row must meet on ``name``; non-finite values (no line to draw) are ignored,
        and two bounds on one name keep the tighter of each side."""
        import math

        lo = None if lo is None or not math.isfinite(lo) else float(lo)
        hi = None if hi is None or not math.isfinite(hi) else float(hi)
        if lo is not None or hi is not None:
            self.thresholds[name] = merge_bounds(self.thresholds.get(name), {"min": lo, "max": hi})

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
        for name, sh in other.scores.items():
            self.score(name).merge(sh)
        for name, bound in other.thresholds.items():
            self.thresholds[name] = merge_bounds(self.thresholds.get(name), bound)

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
        if self.scores:
            out["scores"] = {k: v.to_dict() for k, v in sorted(self.scores.items())}
        if self.thresholds:
            out["thresholds"] = {k: dict(v) for k, v in sorted(self.thresholds.items())}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStats:
        return cls(
            rows_in=d["rows_in"], rows_out=d["rows_out"], drops=Counter(d["drops"]),
            tokens_out=d.get("tokens_out", 0), bytes_out=d.get("bytes_out", 0), seconds=d["seconds"],
            metrics={k: Summary.from_dict(v) for k, v in d.get("metrics", {}).items()},
            histograms={k: Histogram.from_dict(v) for k, v in d.get("histograms", {}).items()},
            scores={k: ScoreHistogram.from_dict(v) for k, v in d.get("scores", {}).items()},
            thresholds={k: {"min": v.get("min"), "max": v.get("max")} for k, v in d.get("thresholds", {}).items()},
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

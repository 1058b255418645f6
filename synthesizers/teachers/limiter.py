"""Adaptive concurrency for an OpenAI-compatible server: find how many requests it serves well.

A fixed ``max_concurrency`` is either too low (an idle GPU) or too high (429s, queues, timeouts), and
the right value changes as prompts get longer. :class:`AdaptiveLimiter` is an AIMD controller, as TCP
uses for its congestion window, with a latency signal:

- **start** at ``initial`` (default: the ceiling's square root) and **grow** additively: every
  ``limit`` successful answers whose latency stays under ``latency_tolerance ×`` the baseline add one
  slot (one slot per "round trip" of the whole window); until the first congestion signal the window
  doubles instead (slow start);
- **back off** multiplicatively (× ``decrease``) on a congestion signal — a 429 or 503, a timeout, or
  the recent latency (an exponential average) rising above ``latency_tolerance ×`` the baseline — at
  most once per baseline latency, so one burst of 429s from a full window counts once;
- the **baseline** is the lowest latency of the last ``baseline_window`` answers (the server's
  unloaded service time), re-learnt as prompts change;
- always within ``[minimum, maximum]``; ``adaptive=False`` pins it to ``maximum``.

``limit`` is read by :meth:`acquire`; the current value and its history are exposed for stats and for
the convergence benchmark.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque


class AdaptiveLimiter:
    """An asyncio concurrency limit that moves between ``minimum`` and ``maximum``."""

    def __init__(self, maximum: int, minimum: int = 1, *, adaptive: bool = True, initial: int | None = None,
                 decrease: float = 0.7, latency_tolerance: float = 2.0, baseline_window: int = 200):
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.adaptive = adaptive
        start = initial if initial is not None else max(self.minimum, math.isqrt(maximum))
        self.limit = float(maximum if not adaptive else min(max(start, self.minimum), maximum))
        self.decrease = decrease
        self.tolerance = latency_tolerance
        self.inflight = 0
        self.max_inflight = 0
        self.slow_start = True
        self._recent: deque[float] = deque(maxlen=baseline_window)
        self._ewma: float | None = None
        self._last_cut = 0.0
        self._cond: asyncio.Condition | None = None
        self.history: list[tuple[float, float]] = [(time.monotonic(), self.limit)]

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self) -> None:
        cond = self._condition()
        async with cond:
            while self.inflight >= max(1, int(self.limit)):
                await cond.wait()
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    async def release(self) -> None:
        cond = self._condition()
        async with cond:
            self.inflight -= 1
            cond.notify_all()

    @property
    def baseline(self) -> float | None:
        return min(self._recent) if self._recent else None

    def success(self, latency: float) -> None:
        """An answer came back in ``latency`` seconds."""
        self._recent.append(latency)
        self._ewma = latency if self._ewma is None else 0.8 * self._ewma + 0.2 * latency
        if not self.adaptive:
            return
        base = self.baseline
        if base is not None and len(self._recent) >= 8 and self._ewma > self.tolerance * base + 0.005:
            self._cut()
            return
        if self.slow_start:
            self._set(self.limit + 1)  # +1 per answer: doubles per window
        else:
            self._set(self.limit + 1.0 / max(self.limit, 1.0))

    def congestion(self) -> None:
        """The server said it is overloaded (429/503) or a request timed out."""
        if self.adaptive:
            self._cut()

    def _cut(self) -> None:
        now = time.monotonic()
        gap = max(self.baseline or 0.0, 0.05)
        if now - self._last_cut < gap:
            return
        self._last_cut = now
        self.slow_start = False
        self._set(self.limit * self.decrease)
        if self._ewma is not None and self.baseline is not None:
            self._ewma = max(self.baseline, self._ewma * self.decrease)

    def _set(self, value: float) -> None:
        value = min(max(value, float(self.minimum)), float(self.maximum))
        if value != self.limit:
            self.limit = value
            self.history.append((time.monotonic(), value))

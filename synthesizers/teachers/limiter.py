"""Adaptive concurrency for an OpenAI-compatible server: find how many requests it serves well.

A fixed ``max_concurrency`` is either too low (an idle GPU) or too high (429s, queues, timeouts), and
the right value changes as prompts get longer. :class:`AdaptiveLimiter` is an AIMD controller, as TCP
uses for its congestion window, with a latency signal:

- **start** at ``initial`` (default: the ceiling's square root) and **grow** additively: every
  ``limit`` successful answers add one slot (one slot per "round trip" of the whole window); until the
  first congestion signal, and while latency stays near the baseline, the window doubles instead
  (slow start);
- **back off** multiplicatively (× ``decrease``) on a congestion signal — a 429 or 503, a timeout, or
  the recent latency (an exponential average) rising above ``latency_tolerance ×`` the baseline while
  the window is full;
- a signal only counts when its request was **sent after the last cut**: answers to requests sent
  under the old, larger window arrive late and slow for a while, and must not cut again (one burst of
  429s from a full window is one signal, and a queueing server is not over-corrected);
- the **baseline** is the lowest latency of the last ``baseline_window`` answers (the server's
  unloaded service time), re-learnt as prompts change;
- always within ``[minimum, maximum]``; ``adaptive=False`` pins it to ``maximum``.

Waiters are woken one per free slot (a queue of futures), so the cost of a release does not grow
with the number of requests waiting. Everything runs on one event loop; nothing here is thread-safe.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque


class AdaptiveLimiter:
    """An asyncio concurrency limit that moves between ``minimum`` and ``maximum``."""

    def __init__(self, maximum: int, minimum: int = 1, *, adaptive: bool = True, initial: int | None = None,
                 decrease: float = 0.8, latency_tolerance: float = 2.0, baseline_window: int = 200):
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
        self.cuts = 0
        self._recent: deque[float] = deque(maxlen=baseline_window)
        self._ewma: float | None = None
        self._last_cut = float("-inf")
        self._waiters: deque[asyncio.Future] = deque()
        self.history: list[tuple[float, float]] = [(time.monotonic(), self.limit)]

    # ------------------------------------------------------------------ slots
    async def acquire(self) -> float:
        """Wait for a slot; returns the time the request is sent (pass it to the signals)."""
        if self.inflight < max(1, int(self.limit)) and not self._waiters:
            self._take()
        else:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self.release()  # the slot was handed over just as we were cancelled
                else:
                    self._waiters.remove(future)
                raise
        return time.monotonic()

    def _take(self) -> None:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)

    def release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inflight < max(1, int(self.limit)):
            future = self._waiters.popleft()
            if not future.done():
                self._take()
                future.set_result(None)

    # ------------------------------------------------------------------ signals
    @property
    def baseline(self) -> float | None:
        return min(self._recent) if self._recent else None

    def success(self, latency: float, sent: float | None = None) -> None:
        """An answer came back in ``latency`` seconds (its request sent at ``sent``)."""
        self._recent.append(latency)
        self._ewma = latency if self._ewma is None else 0.8 * self._ewma + 0.2 * latency
        if not self.adaptive:
            return
        base = self.baseline
        fresh = sent is None or sent > self._last_cut
        slow = base is not None and len(self._recent) >= 8 and self._ewma > self.tolerance * base + 0.005
        if slow and fresh and self.inflight >= int(self.limit) - 1:
            self._cut()
            return
        if self.slow_start and base is not None and self._ewma > 1.5 * base + 0.005:
            self.slow_start = False  # latency rising: grow carefully from here
        self._set(self.limit + (1.0 if self.slow_start else 1.0 / max(self.limit, 1.0)))
        self._wake()

    def congestion(self, sent: float | None = None) -> None:
        """The server said it is overloaded (429/503) or a request timed out."""
        if self.adaptive and (sent is None or sent > self._last_cut):
            self._cut()

    def _cut(self) -> None:
        self._last_cut = time.monotonic()
        self.slow_start = False
        self.cuts += 1
        self._set(self.limit * self.decrease)
        if self._ewma is not None and self.baseline is not None:
            self._ewma = max(self.baseline, self._ewma * self.decrease)

    def _set(self, value: float) -> None:
        value = min(max(value, float(self.minimum)), float(self.maximum))
        if value != self.limit:
            self.limit = value
            self.history.append((time.monotonic(), value))

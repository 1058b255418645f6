"""The figures of ``curate report``, drawn with matplotlib's Agg canvas and returned as PNG bytes.

No pyplot and no global backend switch: each figure is a ``matplotlib.figure.Figure`` on its own
``FigureCanvasAgg``, so a notebook's backend is untouched. Text is never parsed as math (a ``$`` in a
drop reason stays a ``$``), labels are shortened, and PNGs carry no software or time metadata, so the
same stats draw the same bytes with the same matplotlib.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from curate.errors import ConfigError

#: Threshold line colours: the stage's own bounds, then bounds other stages (select) put on its scores.
_LINE_COLOURS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_BAR = "#4c72b0"


@contextmanager
def _figure(width: float, height: float, left: float = 0.65) -> Iterator[Any]:
    """A figure of ``width × height`` inches with fixed margins (``left`` inches for the y labels): a
    layout engine would measure every text first and triple the drawing time."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("curate report draws its plots with matplotlib, which is not installed: "
                          "pip install matplotlib") from None
    with matplotlib.rc_context({"text.parse_math": False, "font.size": 9, "axes.titlesize": 10,
                                "axes.spines.top": False,
                                "axes.spines.right": False}):
        fig = Figure(figsize=(width, height), dpi=100)
        fig.subplots_adjust(left=left / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.3 / height)
        FigureCanvasAgg(fig)
        yield fig


def _png(fig) -> bytes:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # counts: whole numbers on the count axis
        if ax.get_ylabel() in ("rows", "samples"):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        elif ax.get_xlabel() in ("rows", "samples"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def short(text: str, n: int = 48) -> str:
    """``text`` on one line, cut to ``n`` characters (an ellipsis marks the cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def bars(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str) -> bytes:
    """A horizontal bar chart, first label on top, each bar annotated with its value."""
    n = max(len(labels), 1)
    left = 0.3 + 0.068 * max((len(short(s)) for s in labels), default=4)
    with _figure(7.5, 0.9 + 0.28 * n, left=left) as fig:
        ax = fig.add_subplot()
        ys = list(range(len(labels)))[::-1]
        ax.barh(ys, values, color=_BAR)
        ax.set_yticks(ys, [short(s) for s in labels])
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        top = max(values, default=0) or 1
        for y, v in zip(ys, values):
            ax.text(v + top * 0.01, y, f"{v:,.4g}" if isinstance(v, float) else f"{v:,}", va="center", fontsize=8)
        ax.set_xlim(0, top * 1.15)
        return _png(fig)


def token_lengths(groups: dict[str, dict[str, Any]], title: str) -> bytes:
    """Step histograms of tokens per sample on a log2 axis, one line per group (bucket, partition)."""
    with _figure(7.5, 3.2) as fig:
        ax = fig.add_subplot()
        for name, hist in groups.items():
            ax.stairs(hist["counts"], hist["edges"], label=short(name, 32), linewidth=1.5)
        ax.set_xscale("log", base=2)
        _plain_ticks(ax)
        lo, hi = _used_range(groups.values())
        if lo is not None:
            ax.set_xlim(lo, hi)
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("samples")
        ax.set_title(title)
        if len(groups) > 1:
            ax.legend(fontsize=7, ncols=2 if len(groups) > 6 else 1)
        return _png(fig)


def _used_range(hists) -> tuple[float | None, float | None]:
    """The span of the non-empty bins of every histogram (so 1K..1M edges do not flatten a 4K run)."""
    lo = hi = None
    for h in hists:
        used = [i for i, c in enumerate(h["counts"]) if c]
        if used:
            a, b = h["edges"][used[0]], h["edges"][used[-1] + 1]
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return lo, hi


def categories(groups: dict[str, dict[str, int]], title: str, xlabel: str) -> bytes:
    """Grouped bars of counts by category (images per sample, depth bins), one colour per group."""
    keys = sorted({k for g in groups.values() for k in g}, key=_natural)
    width = 0.8 / max(len(groups), 1)
    with _figure(7.5, 3.0) as fig:
        ax = fig.add_subplot()
        for j, (name, counts) in enumerate(groups.items()):
            xs = [i + j * width - 0.4 + width / 2 for i in range(len(keys))]
            ax.bar(xs, [counts.get(k, 0) for k in keys], width=width, label=short(name, 32))
        ax.set_xticks(range(len(keys)), [short(k, 12) for k in keys], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("samples")
        ax.set_title(title)
        if len(groups) > 1:
            ax.legend(fontsize=7)
        return _png(fig)


def _natural(key: str) -> tuple:
    try:
        return (0, float(key.split("–")[0]))
    except ValueError:
        return (1, key)


def scores(bins: list[tuple[float, float, int]], lines: list[tuple[str, float]], title: str) -> bytes:
    """A score distribution from ``(low, high, count)`` buckets, with a vertical line per threshold
    ``(label, value)``. Positive scores spread over more than two decades get a log axis. The buckets
    are redrawn as 10 to 60 equal bins (more rows, more bins), each bucket's count spread evenly over
    its range (on the log axis, evenly in log space)."""

    lo = min(b[0] for b in bins)
    hi = max(b[1] for b in bins)
    total = sum(b[2] for b in bins)
    values = [v for _, v in lines]
    log = lo > 0 and hi / lo > 100 and all(v > 0 for v in values)
    n_bins = int(min(60, max(10, 2 * math.sqrt(total))))
    with _figure(4.8, 2.6) as fig:
        ax = fig.add_subplot()
        if hi > lo:
            counts, edges = rebin(bins, n_bins, log)
            ax.stairs(counts, edges, fill=True, color=_BAR)
            if log:
                ax.set_xscale("log")
                _plain_ticks(ax)
        else:  # one value
            ax.bar([lo], [total], width=abs(lo) * 0.05 or 0.05, color=_BAR)
        for k, (label, value) in enumerate(lines):
            ax.axvline(value, color=_LINE_COLOURS[k % len(_LINE_COLOURS)], linestyle="--", linewidth=1.5,
                       label=short(f"{label} = {value:.4g}", 40))
        if values:
            ax.legend(fontsize=7)
            left, right = ax.get_xlim()
            span = [*values, left, right]
            pad = 0.0 if log else (max(span) - min(span)) * 0.03
            ax.set_xlim(min(span) - pad, max(span) + pad)
        ax.set_ylabel("rows")
        ax.set_title(short(title, 60))
        return _png(fig)


def rebin(bins: list[tuple[float, float, int]], n: int, log: bool = False):
    """``(counts, edges)``: ``n`` equal bins (equal in log space when ``log``) over the buckets' span,
    each bucket's count spread evenly over its range; a zero-width bucket (exact zeros) is a point."""
    import numpy as np

    def f(x):
        return np.log10(x) if log else np.asarray(x, dtype=np.float64)

    lo, hi = bins[0][0], bins[-1][1]
    eps = (f(hi) - f(lo)) * 1e-9
    xs, cum, total = [], [], 0.0
    for a, b, c in bins:
        a, b = float(f(a)), float(f(b))
        b = max(b, a + eps)
        xs += [a, b]
        cum += [total, total + c]
        total += c
    edges = np.linspace(f(lo), f(hi) + eps, n + 1)
    counts = np.diff(np.interp(edges, xs, cum))
    return counts, (10.0 ** edges if log else edges)


def _plain_ticks(ax) -> None:
    """Log-axis ticks as plain numbers (matplotlib's default labels are math text, which is off here)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())

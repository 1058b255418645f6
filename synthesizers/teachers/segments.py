"""Cutting documents into segments of about ``n`` tokens on line boundaries (IN2's Algorithm 1).

The text is split on ``"\\n"`` into paragraphs; paragraphs are added to the current segment until its
token count (the sum of its paragraphs' counts, by the run tokenizer) reaches ``n``; the segment is
then closed. Paragraphs left over at the end join the previous segment, so no segment is shorter than
``n`` tokens unless the whole document is. Blank paragraphs never start a segment.

A paragraph of more than ``2n`` tokens (a document without line breaks, a minified file) is first cut
into pieces of about ``n`` tokens at spaces (anywhere, when there are none), so no segment grows
without bound. A segment's text is always the exact span ``text[start:end]`` of its document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    text: str
    tokens: int
    index: int  # position in its document
    start: int = 0  # character offset in its document


def segment_documents(texts: Sequence[str], tokenizer, n: int) -> list[list[Segment]]:
    """Each text's segments (one encode call for every paragraph of every text)."""
    spans_per_doc = []
    flat = []
    for text in texts:
        spans, pos = [], 0
        for para in text.split("\n"):
            spans.append((pos, pos + len(para)))
            flat.append(para)
            pos += len(para) + 1
        spans_per_doc.append(spans)
    counts = [len(a) for a in tokenizer.encode_arrays(flat)] if flat else []
    out, k = [], 0
    for text, spans in zip(texts, spans_per_doc, strict=True):
        units: list[tuple[int, int, int]] = []  # (start, end, tokens)
        for start, end in spans:
            c = counts[k]
            k += 1
            if c > 2 * n and end - start > 1:
                pieces = -(-c // n)
                for a, b in _cut(text, start, end, pieces):
                    units.append((a, b, max(1, c * (b - a) // (end - start))))
            else:
                units.append((start, end, c))
        segs: list[Segment] = []
        first = None
        tokens = 0
        for start, end, c in units:
            if first is None:
                if not text[start:end].strip():
                    continue  # blank lines never start a segment
                first = start
            tokens += c
            if tokens >= n:
                segs.append(Segment(text[first:end], tokens, len(segs), first))
                first, tokens = None, 0
        if first is not None:  # the leftover joins the previous segment (or is the only one)
            end = units[-1][1]
            if segs:
                last = segs[-1]
                segs[-1] = Segment(text[last.start:end], last.tokens + tokens, last.index, last.start)
            else:
                segs.append(Segment(text[first:end], tokens, 0, first))
        out.append(segs)
    return out


def _cut(text: str, start: int, end: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into ``pieces`` spans of about equal length, each cut just after a space."""
    size = (end - start) / pieces
    cuts = [start]
    for j in range(1, pieces):
        want = int(start + j * size)
        space = text.rfind(" ", cuts[-1] + 1, want + 1)
        at = space + 1 if space > cuts[-1] else want
        if cuts[-1] < at < end:
            cuts.append(at)
    cuts.append(end)
    return list(zip(cuts[:-1], cuts[1:]))

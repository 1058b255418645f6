"""Cutting documents into segments of about ``n`` tokens on line boundaries (IN2's Algorithm 1).

The text is split on ``"\\n"`` into paragraphs; paragraphs are added to the current segment until its
token count (the sum of its paragraphs' counts, by the run tokenizer) reaches ``n``; the segment is
then closed (its paragraphs joined with ``"\\n"``). Paragraphs left over at the end join the previous
segment, so no segment is shorter than ``n`` tokens unless the whole document is. Empty and
whitespace-only paragraphs are kept inside segments (they carry layout) but never start one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    text: str
    tokens: int
    index: int  # position in its document


def segment_documents(texts: Sequence[str], tokenizer, n: int) -> list[list[Segment]]:
    """Each text's segments (one encode call for every paragraph of every text)."""
    paragraphs = [t.split("\n") for t in texts]
    flat = [p for ps in paragraphs for p in ps]
    counts = [len(a) for a in tokenizer.encode_arrays(flat)] if flat else []
    out, k = [], 0
    for ps in paragraphs:
        segs: list[Segment] = []
        cur: list[str] = []
        cur_tokens = 0
        for p in ps:
            c = counts[k]
            k += 1
            if not cur and not p.strip():
                if segs:  # layout between segments stays with the previous one
                    last = segs[-1]
                    segs[-1] = Segment(last.text + "\n" + p, last.tokens + c, last.index)
                continue
            cur.append(p)
            cur_tokens += c
            if cur_tokens >= n:
                segs.append(Segment("\n".join(cur), cur_tokens, len(segs)))
                cur, cur_tokens = [], 0
        if cur:
            if segs:
                last = segs[-1]
                segs[-1] = Segment(last.text + "\n" + "\n".join(cur), last.tokens + cur_tokens, last.index)
            else:
                segs.append(Segment("\n".join(cur), cur_tokens, 0))
        out.append(segs)
    return out

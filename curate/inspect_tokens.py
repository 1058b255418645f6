"""Token rows for ``curate inspect``: decoded with the run tokenizer, UtK structure made visible.

Chunks are coloured by the document they come from, knots and ``<D> … </D>`` ids stand out, and each
backtrace (``<S> id0 <s> id1 … </S>``) is decoded into the chunk order it asks the model to recover.
Document membership comes from the ``utk_chunks`` column when the row has it, else from the
backtrace ids (which name every chunk of a split document).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text

PALETTE = ("green", "magenta", "cyan", "yellow", "blue", "red", "bright_green", "bright_magenta")


def find_tokenizer(path: str | Path):
    """The run tokenizer of the run directory containing ``path`` (None when there is none)."""
    from curate.tokenizer import CurateTokenizer

    p = Path(path).resolve()
    for folder in [p, *p.parents]:
        if (folder / "tokenizer" / "specials.json").exists():
            return CurateTokenizer.load_run(folder / "tokenizer")
    return None


def render(row: dict[str, Any], tok, width: int) -> tuple[Text, list[str]]:
    """A coloured rendering of ``row['input_ids']`` and the decoded backtraces."""
    ids = row["input_ids"]
    names = {i: s for s, i in tok.specials.items()}
    owner = _owners(row, names, ids)
    text = Text()
    shown = 0
    run: list[int] = []
    run_style = None

    def flush() -> None:
        nonlocal shown
        if run:
            piece = tok.decode(run)
            text.append(piece, style=run_style)
            shown += len(piece)

    for pos, t in enumerate(ids):
        if shown > width:
            break
        style = PALETTE[owner[pos] % len(PALETTE)] if owner[pos] >= 0 else None
        if t in names:
            flush()
            run = []
            text.append(names[t], style="bold reverse")
            continue
        if style != run_style:
            flush()
            run, run_style = [], style
        run.append(t)
    flush()
    if shown > width:
        text.append(f" … [{len(ids):,} tokens]", style="dim")
    return text, _backtraces(ids, names, tok)


def _owners(row: dict[str, Any], names: dict[int, str], ids: list[int]) -> list[int]:
    owner = [-1] * len(ids)
    if row.get("utk_chunks"):
        for chunk in row["utk_chunks"]:
            for k in range(chunk["start"], chunk["end"]):
                owner[k] = chunk["doc"]
        return owner
    offsets = row.get("doc_offsets") or [0, len(ids)]
    for d, (a, b) in enumerate(zip(offsets, offsets[1:])):
        for k in range(a, b):
            owner[k] = d
    return owner


def _backtraces(ids: list[int], names: dict[int, str], tok) -> list[str]:
    """Each ``<S> … </S>`` as 'id0 → id1 → …' (the document's chunks in original order)."""
    out, inside, current, parts = [], False, [], []
    for t in ids:
        name = names.get(t)
        if name == "<S>":
            inside, current, parts = True, [], []
        elif inside and name == "<s>":
            parts.append(tok.decode(current, show_special=False))
            current = []
        elif inside and name == "</S>":
            parts.append(tok.decode(current, show_special=False))
            out.append(" → ".join(parts))
            inside = False
        elif inside:
            current.append(t)
    return out

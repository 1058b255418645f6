"""``curate inspect``: read samples back from any output (run dir, sink folder or one file)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from curate.schema import meta_value

FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "jsonl", ".tar": "webdataset"}


def output_files(path: str | Path) -> list[Path]:
    """The data files behind ``path``: a file, a sink folder (via index.json) or a run directory."""
    p = Path(path)
    if p.is_file():
        return [p]
    if (p / "index.json").exists():
        index = orjson.loads((p / "index.json").read_bytes())
        return [p / s["name"] for s in index["shards"]]
    if (p / "stats.json").exists():
        stats = orjson.loads((p / "stats.json").read_bytes())
        for out in stats.get("outputs", {}).values():
            files = output_files(out["path"])
            if files:
                return files
        return []
    files = sorted(f for f in p.iterdir() if _format(f)) if p.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path}: no curate output here (no index.json, stats.json or data files)")
    return files


def _format(path: Path) -> str | None:
    name = path.name
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix) or name.endswith(suffix + ".gz") or name.endswith(suffix + ".zst"):
            return fmt
    return None


def samples(path: str | Path, keep_bytes: bool = False) -> Iterator[dict[str, Any]]:
    """Every sample of the output at ``path`` as a dict, in file order. A WebDataset sample's other
    members are listed under ``files`` by size, or with their bytes when ``keep_bytes``."""
    for f in output_files(path):
        fmt = _format(f)
        if fmt == "parquet":
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                yield from batch.to_pylist()
        elif fmt == "arrow":
            from curate.readers.arrow_ipc import open_ipc

            for batch in open_ipc(str(f)):
                yield from batch.to_pylist()
        elif fmt == "jsonl":
            for line in jsonl_lines(f):
                if line.strip():
                    yield orjson.loads(line)
        elif fmt == "webdataset":
            yield from _tar_samples(f, keep_bytes)


def jsonl_lines(path: Path) -> Iterator[bytes]:
    """The lines of a JSONL output file, plain, ``.gz`` or ``.zst`` (decoded as the JSONL reader decodes:
    fsspec's zstd reader cannot iterate lines)."""
    from curate.readers.jsonl import _decoded

    codec = "zstd" if path.name.endswith(".zst") else "gzip" if path.name.endswith(".gz") else None
    with open(path, "rb") as raw:
        blocks = _decoded(raw, codec) if codec else iter(lambda: raw.read(1 << 20), b"")
        rest = b""
        for block in blocks:
            *lines, rest = (rest + block).split(b"\n")
            yield from lines
        if rest:
            yield rest


def _tar_samples(path: Path, keep_bytes: bool = False) -> Iterator[dict[str, Any]]:
    import numpy as np

    from curate.readers.webdataset import iter_samples

    with open(path, "rb") as fh:
        for sample in iter_samples(fh, str(path)):
            row: dict[str, Any] = {"__key__": sample["__key__"]}
            if "json" in sample:
                row.update(orjson.loads(sample["json"]))
            for key, value in sample.items():
                if key == "txt":
                    row["text"] = value.decode("utf-8", errors="replace")  # a viewer: never fail on a member
                elif key.endswith(".npy"):
                    row[key[:-4]] = np.load(io.BytesIO(value)).tolist()
                elif key not in ("json", "__key__", "__url__") and isinstance(value, bytes):
                    row.setdefault("files", {})[key] = value if keep_bytes else f"<{len(value)} bytes>"
            yield row


def show(path: str | Path, n: int, offset: int, width: int, console) -> int:
    """Print ``n`` samples from ``offset``; returns how many were shown."""
    from rich.panel import Panel
    from rich.pretty import Pretty
    from rich.table import Table
    from rich.text import Text

    from curate.inspect_tokens import find_tokenizer, render

    tok = None
    shown = 0
    for i, row in enumerate(itertools.islice(samples(path), offset, offset + n), start=offset):
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        if "input_ids" in row and tok is None:
            tok = find_tokenizer(path) or False
        for key, value in row.items():
            if key in ("text", "texts") or (key == "utk_chunks" and tok):
                continue
            if key == "meta" and isinstance(value, str):
                value = meta_value(value)
            if isinstance(value, list) and len(value) > 16:
                value = f"[{len(value)} items] {value[:16]} …"
            grid.add_row(Text(str(key)), Pretty(_short_bytes(value)))  # Text: never read as markup
        text = row.get("text")
        if text is None and row.get("texts"):
            text = "\n".join(t if t is not None else "<image>" for t in row["texts"])
        if text is not None and not isinstance(text, str):
            text = str(text)
        if text is not None and not (tok and "input_ids" in row):
            body = text if len(text) <= width else text[:width] + f" … [{len(text):,} chars]"
            grid.add_row("text", Text(body))
        if tok and "input_ids" in row:
            rendered, backtraces = render(row, tok, width)
            grid.add_row("decoded", rendered)
            for b in backtraces:
                grid.add_row("backtrace", Text(b))
        console.print(Panel(grid, title=f"sample {i}", title_align="left"))
        shown += 1
    return shown


def write_html(path: str | Path, n: int, offset: int, page_path: str | Path) -> int:
    """Write ``n`` samples from ``offset`` as a self-contained HTML page; returns how many."""
    from curate.inspect_html import page

    rows = list(itertools.islice(samples(path, keep_bytes=True), offset, offset + n))
    Path(page_path).write_text(page(rows, f"{Path(path).name}: samples {offset}–{offset + len(rows) - 1}"),
                               encoding="utf-8")
    return len(rows)


def _short_bytes(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _short_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short_bytes(v) for v in value]
    return value


def table_of(path: str | Path) -> pa.Table:
    """The whole output at ``path`` as one Arrow table (small outputs; tests and notebooks)."""
    return pa.Table.from_pylist(list(samples(path)))

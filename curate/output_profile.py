"""What a finished output holds, read back from its files: samples, token lengths, images, depths.

:func:`profile_output` reads one sink folder (through its ``index.json``, so only complete outputs),
:func:`profile_run` every sink of a run directory. Only the columns a profile needs are read: for
Parquet by column projection (the images' bytes are never read, only one small field of each image
struct, which keeps the nulls that mark text positions), for Arrow IPC by selecting columns of the
memory-mapped batches; JSONL rows and WebDataset samples are parsed whole (their ``json`` member;
``input_ids.npy`` only for its header, which holds the length).

The profile (a JSON-ready dict)::

    {"format": "parquet", "samples": int, "bytes": int,
     "groups": {"all" | "<partition folder>": {
         "samples": int,
         "tokens": {"count", "sum", "min", "max", "mean", "p50", "p90", "p99"} | None,
         "token_histogram": {"edges": [...], "counts": [...]} | None,
         "images_per_sample": {"0": n, "1": n, ...} | None,
         "evidence_depth": {"edges": [0.0, 0.1, ..., 1.0], "counts": [...]} | None}}}

- ``tokens`` come from an ``n_tokens`` column, else the length of ``input_ids``; rows with neither are
  not counted (``count`` may be below ``samples``).
- ``token_histogram`` edges are quarter-octaves (``2**(k/4)``), always covering 1,024 to 1,048,576
  tokens and widened by whole octaves to the data; every group of one sink shares the same edges.
  A length below the first edge (0) counts in the first bin.
- ``images_per_sample`` counts the non-null entries of an ``images`` list column per row.
- ``evidence_depth``: the ``depth`` of each entry of an ``evidence`` list column (``segment_qa``), else
  the needle's: ``meta.insert.depth_actual`` (else ``meta.insert.depth``) written by
  ``long_multimodal``, and for ``mm_needle`` the ``target`` cell's place among all cells of the
  haystack (``meta.images × meta.grid²``), ``cell / (cells - 1)`` (negatives have no target and count
  nowhere). Ten bins over [0, 1]; None when no row has a depth.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import ConfigError

DEPTH_EDGES = [round(k / 10, 1) for k in range(11)]
_QUARTERS = 4  # token-histogram bins per octave


class _Group:
    """What one group (a partition folder, or the whole sink) holds, gathered batch by batch."""

    def __init__(self) -> None:
        self.samples = 0
        self.tokens: list[np.ndarray] = []
        self.images: list[np.ndarray] = []
        self.depths: list[np.ndarray] = []
        self.has_images = self.has_depths = False

    # ---------------------------------------------------------------- columnar (Parquet, Arrow)
    def add_batch(self, batch: pa.RecordBatch) -> None:
        names = batch.schema.names
        self.samples += batch.num_rows
        if "n_tokens" in names:
            self.tokens.append(_valid(batch.column("n_tokens")))
        elif "input_ids" in names:
            self.tokens.append(_valid(pc.list_value_length(batch.column("input_ids"))))
        if "images" in names and _is_list(batch.schema.field("images").type):
            self.has_images = True
            self.images.append(_non_null_per_row(batch.column("images")))
        if "evidence" in names and _is_list(batch.schema.field("evidence").type):
            flat = pc.list_flatten(batch.column("evidence"))
            if pa.types.is_struct(flat.type) and flat.type.get_field_index("depth") >= 0:
                self.has_depths = True
                self.depths.append(_valid(pc.struct_field(flat, "depth")).astype(np.float64))
        elif "meta" in names:
            metas = batch.column("meta").to_pylist()
            targets = batch.column("target").to_pylist() if "target" in names else [None] * len(metas)
            self.add_depths([needle_depth(m, t) for m, t in zip(metas, targets)])

    # ---------------------------------------------------------------- row by row (JSONL, WebDataset)
    def add_row(self, row: dict[str, Any], n_input_ids: int | None = None) -> None:
        self.samples += 1
        n = row.get("n_tokens")
        if isinstance(n, (int, float)) and not isinstance(n, bool):
            self.tokens.append(np.array([n]))
        elif isinstance(row.get("input_ids"), list):
            self.tokens.append(np.array([len(row["input_ids"])]))
        elif n_input_ids is not None:
            self.tokens.append(np.array([n_input_ids]))
        images = row.get("images")
        if isinstance(images, list):
            self.has_images = True
            self.images.append(np.array([sum(im is not None for im in images)]))
        evidence = row.get("evidence")
        if isinstance(evidence, list):
            self.has_depths = True
            self.add_depths([e.get("depth") for e in evidence if isinstance(e, dict)])
        elif "meta" in row:
            self.add_depths([needle_depth(row["meta"], row.get("target"))])

    def add_depths(self, depths: list[float | None]) -> None:
        got = [float(d) for d in depths if _is_number(d)]
        if got:
            self.has_depths = True
            self.depths.append(np.array(got))

    # ---------------------------------------------------------------- result
    def token_array(self) -> np.ndarray:
        return np.concatenate(self.tokens).astype(np.int64) if self.tokens else np.zeros(0, np.int64)

    def profile(self, edges: list[float] | None) -> dict[str, Any]:
        tokens = self.token_array()
        out: dict[str, Any] = {"samples": self.samples, "tokens": None, "token_histogram": None,
                               "images_per_sample": None, "evidence_depth": None}
        if len(tokens):
            p50, p90, p99 = (float(v) for v in np.percentile(tokens, [50, 90, 99]))
            out["tokens"] = {"count": len(tokens), "sum": int(tokens.sum()), "min": int(tokens.min()),
                             "max": int(tokens.max()), "mean": float(tokens.mean()), "p50": p50, "p90": p90,
                             "p99": p99}
            if edges:
                clipped = np.clip(tokens, edges[0], edges[-1])
                out["token_histogram"] = {"edges": edges, "counts": np.histogram(clipped, edges)[0].tolist()}
        if self.has_images:
            per_row = np.concatenate(self.images) if self.images else np.zeros(0, np.int64)
            values, counts = np.unique(per_row, return_counts=True)
            out["images_per_sample"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
        if self.has_depths:
            depths = np.clip(np.concatenate(self.depths), 0.0, 1.0) if self.depths else np.zeros(0)
            out["evidence_depth"] = {"edges": list(DEPTH_EDGES),
                                     "counts": np.histogram(depths, DEPTH_EDGES)[0].tolist()}
        return out


def token_edges(lengths: np.ndarray) -> list[float] | None:
    """Quarter-octave edges covering 2**10..2**20 and every length in ``lengths`` (None when empty)."""
    if not len(lengths):
        return None
    lo = min(10, int(np.floor(np.log2(max(int(lengths.min()), 1)))))
    hi = max(20, int(np.ceil(np.log2(max(int(lengths.max()), 1)))))
    return [float(2.0 ** (k / _QUARTERS)) for k in range(lo * _QUARTERS, hi * _QUARTERS + 1)]


def needle_depth(meta: Any, target: Any = None) -> float | None:
    """The needle depth a row records, or None (see the module doc): ``meta`` is its JSON text or
    object, ``target`` its ``target`` column (``mm_needle``'s ``{image, row, col}``)."""
    if isinstance(meta, bytes):
        meta = meta.decode("utf-8", "replace")
    if isinstance(meta, str):
        if '"insert"' not in meta and target is None:
            return None  # most rows: no needle, nothing to parse
        try:
            meta = orjson.loads(meta)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(meta, dict):
        return None
    insert = meta.get("insert")
    if isinstance(insert, dict):
        depth = insert.get("depth_actual", insert.get("depth"))
        return float(depth) if _is_number(depth) else None
    grid, images = meta.get("grid"), meta.get("images")
    if not (isinstance(target, dict) and _is_number(grid) and _is_number(images)):
        return None
    try:
        cell = ((int(target["image"]) - 1) * grid + int(target["row"]) - 1) * grid + int(target["col"]) - 1
    except (KeyError, TypeError, ValueError):
        return None
    cells = int(images) * int(grid) ** 2
    return cell / (cells - 1) if cells > 1 else 0.0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def profile_output(sink_dir: Path) -> dict[str, Any]:
    """The profile of the finished sink folder ``sink_dir`` (see the module doc for its shape).

    Raises :class:`~curate.errors.ConfigError` when the folder has no ``index.json`` (not a finished
    output) or names a format this module cannot read.
    """
    sink_dir = Path(sink_dir)
    index_path = sink_dir / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"{sink_dir}: no index.json: not a finished curate output")
    index = orjson.loads(index_path.read_bytes())
    fmt = index.get("format")
    read = _READERS.get(fmt)
    if read is None:
        raise ConfigError(f"{index_path}: unknown output format {fmt!r}")
    partitioned = bool(index.get("partitions"))
    groups: dict[str, _Group] = {}
    for entry in sorted(index.get("shards", []), key=lambda e: e["name"]):
        name = entry["name"]
        group = name.partition("/")[0] if partitioned and "/" in name else "all"
        read(sink_dir / name, groups.setdefault(group, _Group()))
    for folder in index.get("partitions") or {}:  # an empty partition still has its entry
        groups.setdefault(folder, _Group())
    if not groups:
        groups["all"] = _Group()
    edges = token_edges(np.concatenate([g.token_array() for g in groups.values()]))
    return {"format": fmt, "samples": int(index.get("total_samples", 0)), "bytes": int(index.get("total_bytes", 0)),
            "groups": {name: groups[name].profile(edges) for name in sorted(groups)}}


def sink_folders(run_dir: Path) -> dict[str, Path]:
    """``sink:<folder>`` → folder of every sink in the run's resolved manifest, inside ``run_dir``
    (where the run is now, not where it ran). ConfigError when this is not a run directory, or when a
    sink path leads outside it."""
    import yaml

    run_dir = Path(run_dir)
    path = run_dir / "manifest.resolved.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a curate run directory (no manifest.resolved.yaml)")
    resolved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    sinks = resolved.get("sink") or []
    out: dict[str, Path] = {}
    root = run_dir.resolve()
    for spec in sinks if isinstance(sinks, list) else [sinks]:
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise ConfigError(f"{path}: a sink without a kind: {spec!r}")
        folder = run_dir / (spec.get("path") or spec["kind"])
        if not folder.resolve().is_relative_to(root):
            raise ConfigError(f"{path}: sink path {spec.get('path')!r} leads outside the run directory")
        out[f"sink:{folder.name}"] = folder
    return out


def profile_run(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``sink label`` → :func:`profile_output` of every sink of the run that has an ``index.json``."""
    return {label: profile_output(folder) for label, folder in sink_folders(run_dir).items()
            if (folder / "index.json").is_file()}


# ---------------------------------------------------------------------- readers, one per format
def _read_parquet(path: Path, group: _Group) -> None:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    top = pf.schema_arrow.names
    columns = []
    if "n_tokens" in top:
        columns.append("n_tokens")
    elif "input_ids" in top:
        columns.append("input_ids")
    leaves = [pf.schema.column(i).path for i in range(len(pf.schema))]
    images = [p for p in leaves if p.startswith("images.") and not p.endswith(".bytes")]
    if images:  # one small leaf keeps each image's null-ness; the bytes stay on disk
        columns.append(images[0])
    depth = [p for p in leaves if p.startswith("evidence.") and p.endswith(".depth")]
    if depth:
        columns.append(depth[0])
    elif "meta" in top:
        columns += ["meta"] + (["target"] if "target" in top else [])
    if not columns:
        group.samples += pf.metadata.num_rows
        return
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        group.add_batch(batch)


def _read_arrow(path: Path, group: _Group) -> None:
    from curate.readers.arrow_ipc import open_ipc

    for batch in open_ipc(str(path)):
        keep = [n for n in ("n_tokens", "input_ids", "images", "evidence", "meta", "target") if n in batch.schema.names]
        group.add_batch(batch.select(keep))


def _read_jsonl(path: Path, group: _Group) -> None:
    import fsspec

    with fsspec.open(str(path), "rb", compression="infer") as fh:
        for line in fh:
            if line.strip():
                group.add_row(orjson.loads(line))


def _read_webdataset(path: Path, group: _Group) -> None:
    from curate.readers.webdataset import iter_samples

    with open(path, "rb") as fh:
        for sample in iter_samples(fh, str(path)):
            row = orjson.loads(sample["json"]) if "json" in sample else {}
            row = row if isinstance(row, dict) else {}
            group.add_row(row, _npy_length(sample.get("input_ids.npy")))


def _npy_length(data: bytes | None) -> int | None:
    """The element count of an ``.npy`` member, from its header alone."""
    if not data:
        return None
    fh = io.BytesIO(data)
    version = np.lib.format.read_magic(fh)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, _ = header(fh)
    return int(np.prod(shape)) if shape else 1


_READERS = {"parquet": _read_parquet, "arrow": _read_arrow, "jsonl": _read_jsonl, "webdataset": _read_webdataset}


# ---------------------------------------------------------------------- Arrow helpers
def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _valid(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The non-null values as numpy."""
    return array.drop_null().to_numpy(zero_copy_only=False)


def _non_null_per_row(column: pa.Array) -> np.ndarray:
    """Per row of a list column, how many of its entries are not null (a null list: 0)."""
    n = len(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    valid = pc.list_flatten(column).is_valid().to_numpy(zero_copy_only=False)
    return np.bincount(parents[valid], minlength=n)

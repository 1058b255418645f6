"""Arrow arrays built from numpy buffers and UTF-8 bytes directly.

Faster than ``pa.array(python_list)`` for token data, and — unlike ``pa.array`` and ``pa.scalar``,
which import pandas on first use (~50 MB in every worker process) — they keep workers lean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_TYPES = {np.dtype(np.int8): pa.int8(), np.dtype(np.int16): pa.int16(), np.dtype(np.int32): pa.int32(),
          np.dtype(np.int64): pa.int64(), np.dtype(np.uint8): pa.uint8(), np.dtype(np.uint16): pa.uint16(),
          np.dtype(np.uint32): pa.uint32(), np.dtype(np.uint64): pa.uint64(), np.dtype(np.float32): pa.float32(),
          np.dtype(np.float64): pa.float64()}


def numeric(values: np.ndarray | Sequence, dtype=None) -> pa.Array:
    """A primitive array over a contiguous numpy array (no nulls)."""
    arr = np.ascontiguousarray(values, dtype=dtype)
    if arr.dtype == np.bool_:
        return pa.Array.from_buffers(pa.bool_(), len(arr), [None, pa.py_buffer(np.packbits(arr, bitorder="little"))])
    return pa.Array.from_buffers(_TYPES[arr.dtype], len(arr), [None, pa.py_buffer(arr)])


def int_lists(rows: Sequence, dtype=np.int32) -> pa.ListArray:
    """A ``list<int>`` array from rows of ints (Python lists or numpy arrays)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total:,} values do not fit one list<int> array (int32 offsets): use smaller batches")
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(r, dtype=dtype) for r in rows]) if len(rows) else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(numeric(offsets), numeric(flat.astype(dtype, copy=False)))


def strings(values: Sequence[str | None]) -> pa.StringArray:
    """A string array from Python strings (None is null), via one UTF-8 buffer."""
    return utf8([None if v is None else v.encode() for v in values])


def utf8(encoded: Sequence[bytes | None]) -> pa.StringArray:
    """A string array over UTF-8 bytes that are already valid (from ``str.encode`` or orjson; None is null)."""
    return _var_width(pa.string(), encoded, "string column")


def binaries(values: Sequence[bytes | None]) -> pa.BinaryArray:
    """A binary array from Python bytes (None is null), via one buffer."""
    return _var_width(pa.binary(), [None if v is None else bytes(v) for v in values], "binary column")


def _var_width(kind: pa.DataType, encoded: Sequence[bytes | None], what: str) -> pa.Array:
    """Validity only when there are nulls, int32 offsets, one data buffer (:func:`joined`)."""
    n = len(encoded)
    data = [b"" if v is None else v for v in encoded]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=n), out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{what} over 2 GiB in one batch; lower batch_bytes")
    nulls = sum(v is None for v in encoded)
    validity = None
    if nulls:
        mask = np.fromiter((v is not None for v in encoded), dtype=bool, count=n)
        validity = pa.py_buffer(np.packbits(mask, bitorder="little"))
    return pa.Array.from_buffers(kind, n, [validity, pa.py_buffer(offsets.astype(np.int32)),
                                           joined(data, int(offsets[-1]))], null_count=nulls)


#: From this size on, :func:`joined` copies into pyarrow's memory pool instead of ``b"".join``.
POOL_FROM = 1 << 20


def joined(values: Sequence[bytes], total: int) -> pa.Buffer:
    """``b"".join(values)`` (``total`` bytes) as a pyarrow buffer. From 1 MB on the bytes are copied into
    pyarrow's memory pool, which keeps and reuses freed memory: in processes curate tunes (see
    :mod:`curate.allocator`) a joined ``bytes`` of several MB is a fresh ``mmap`` whose pages all fault
    in (5x slower per 8 MB batch). Below that ``join`` is faster (one C call) and takes heap memory."""
    if total < POOL_FROM:
        return pa.py_buffer(b"".join(values))
    buf = pa.allocate_buffer(total)
    out = memoryview(buf).cast("B")
    at = 0
    for value in values:
        end = at + len(value)
        out[at:end] = value
        at = end
    return buf


def string_lists(rows: Sequence[Sequence[str]]) -> pa.ListArray:
    """A ``list<string>`` array from rows of strings."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total:,} values do not fit one list<int> array (int32 offsets): use smaller batches")
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(numeric(offsets), strings([s for r in rows for s in r]))


def struct_lists(rows: Sequence[Sequence[dict]], fields: dict[str, np.dtype]) -> pa.ListArray:
    """A ``list<struct>`` array from rows of dicts with numeric ``fields``."""
    flat = [item for r in rows for item in r]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    if total > np.iinfo(np.int32).max:
        raise ValueError(f"{total:,} values do not fit one list<int> array (int32 offsets): use smaller batches")
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    children = [numeric(np.fromiter((d[k] for d in flat), dtype=t, count=len(flat))) for k, t in fields.items()]
    struct = pa.StructArray.from_arrays(children, names=list(fields))
    return pa.ListArray.from_arrays(numeric(offsets), struct)

"""JSON Lines: plain, ``.gz`` or ``.zst`` (any fsspec compression), streamed in bounded blocks.

A plain file larger than ``shard_bytes`` is split into byte ranges; a line belongs to the range
holding its first byte, and line numbers stay those of the whole file. Compressed files are one
shard each (they cannot be seeked). Every bad line lands in ``failures/`` with file, line and one of
the reasons ``invalid_utf8``, ``invalid_json``, ``not_an_object``, ``missing_text_field``,
``text_not_a_string``, ``empty_text``, ``missing_id_field``.
"""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import orjson
import pyarrow as pa
from fsspec.utils import infer_compression
from pydantic import ByteSize, Field

from curate.plugins import register_source
from curate.readers.base import DocumentBuilder, Reader, ReaderParams, Shard, content_key, list_files, meta_json

_BLOCK = 4 << 20


@register_source("jsonl")
class JsonlReader(Reader):
    class Params(ReaderParams):
        shard_bytes: ByteSize = Field(ByteSize(256_000_000), description="split plain files above this size")
        compression: str | None = Field("infer", description="'infer' from the extension, or a codec name")

    def shards(self) -> list[Shard]:
        out: list[Shard] = []
        for uri, info, rel in list_files(self.params.paths, (".jsonl", ".json", ".gz", ".zst", ".ndjson")):
            size = info.get("size") or 0
            compressed = self._compression(uri) is not None
            step = int(self.params.shard_bytes)
            ranges = [(0, None)] if compressed or size <= step else [
                (s, min(s + step, size)) for s in range(0, size, step)]
            for start, stop in ranges:
                name = f"{len(out):05d}"
                out.append(Shard(name, content_key(uri, info, start, stop), uri, rel, start, stop))
        return out

    def _compression(self, uri: str) -> str | None:
        c = self.params.compression
        return infer_compression(uri) if c == "infer" else c

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        builder = DocumentBuilder(p.batch_rows, int(p.batch_bytes))
        exclude = (p.text_field,) + ((p.id_field,) if p.id_field else ())
        for line_no, raw in _lines(shard, self._compression(shard.uri)):
            doc = _parse(raw, line_no, shard, p, exclude, ctx)
            if doc is not None:
                batch = builder.add(*doc)
                if batch is not None:
                    yield batch
        last = builder.flush()
        if last is not None:
            yield last


def _parse(raw: bytes, line_no: int, shard: Shard, p, exclude, ctx):
    def bad(reason: str, detail: str = ""):
        ctx.failure(reason, detail, file=shard.uri, line=line_no, record=raw)

    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as u:
            return bad("invalid_utf8", str(u))
        return bad("invalid_json", str(e))
    if not isinstance(record, dict):
        return bad("not_an_object", type(record).__name__)
    text = record.get(p.text_field)
    if text is None:
        return bad("missing_text_field", f"no field {p.text_field!r}")
    if not isinstance(text, str):
        return bad("text_not_a_string", f"field {p.text_field!r} is {type(text).__name__}")
    if not text.strip():
        return bad("empty_text", f"field {p.text_field!r} is empty")
    if p.id_field:
        if record.get(p.id_field) is None:
            return bad("missing_id_field", f"no field {p.id_field!r}")
        doc_id = str(record[p.id_field])
    else:
        doc_id = f"{shard.rel}:{line_no}"
    return doc_id, text, shard.rel, meta_json(record, exclude, p.meta_fields)


def _lines(shard: Shard, compression: str | None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(1-based line number, line bytes)`` for the lines whose first byte is in the shard."""
    with fsspec.open(shard.uri, "rb", compression=compression) as fh:
        line_no = 1
        pos = 0
        if shard.start:
            line_no = 1 + _count_newlines(fh, shard.start - 1)
            pos = shard.start - 1
            fh.seek(pos)
            skipped = fh.readline()  # the tail of the line owned by the previous range
            pos += len(skipped)
            if skipped.endswith(b"\n"):
                line_no += 1
        stop = shard.stop
        carry = b""
        while True:
            block = fh.read(_BLOCK)
            if not block:
                break
            block = carry + block
            lines = block.split(b"\n")
            carry = lines.pop()
            for raw in lines:
                if stop is not None and pos >= stop:
                    return
                pos += len(raw) + 1
                if raw.strip():
                    yield line_no, raw
                line_no += 1
        if carry.strip() and (stop is None or pos < stop):
            yield line_no, carry


def _count_newlines(fh, upto: int) -> int:
    fh.seek(0)
    count, left = 0, upto
    while left > 0:
        chunk = fh.read(min(_BLOCK, left))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count

"""JSON Lines: plain, ``.gz`` or ``.zst`` (any fsspec compression), streamed in bounded blocks.

A plain file larger than ``shard_bytes`` (unset: sized from the input, :func:`range_bytes`) is split
into byte ranges; a line belongs to the range holding its first byte, and line numbers stay those of
the whole file. ``shards()`` finds, in one pass over such a file, where each range's first line starts
and its line number (``Shard.extra`` ``start_pos``/``first_line``), so reading all ranges reads each
byte about once. Compressed files
are one shard each (they cannot be seeked). A UTF-8 byte-order mark before the first line is skipped.

Every bad line lands in ``failures/`` with file, line and one of the reasons ``invalid_utf8``,
``invalid_json``, ``not_an_object``, ``missing_text_field``, ``text_not_a_string``, ``empty_text``,
``missing_id_field``. A damaged file keeps every whole line before the damage and is recorded once:
``truncated_input`` (a compressed stream that ends before its end marker, or a last line without a
newline that is not valid JSON: the file was cut) or ``corrupt_input`` (the decoder rejects the bytes),
with ``line`` (the last whole line, 0 for none), ``offset`` (the byte of the file where decoding
stopped: the compressed position) and ``lost`` (1 when a partial line was cut, None when unknown).
A partial last line is part of that record, never a document nor an ``invalid_json``.

Lines are parsed a block at a time (:mod:`curate.readers.jsonl_blocks`): orjson over every line of a
block, batches cut and built in a thread that runs at most two items ahead of the consumer. Only blank
and bad lines go through the per-line path (``_parse``), which names each failure with its exact line;
the batches are those of the per-line path (``_BULK = False``), row for row and cut for cut.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import fsspec
import orjson
import pyarrow as pa
from fsspec.compression import compr
from fsspec.utils import infer_compression
from pydantic import ByteSize, Field

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import (
    DamagedInput,
    Reader,
    ReaderParams,
    Shard,
    content_key,
    list_files,
    meta_json,
    range_bytes,
)
from curate.readers.jsonl_blocks import BatchCutter, Fields, ParsedBlock, id_text, parse_block, read_ahead

#: Bytes read at a time: just under the 1 MB above which glibc maps every allocation afresh in processes
#: curate tunes (see curate.allocator), so each block reuses freed heap memory instead of faulting in new
#: pages (4 MB blocks: 105 k page faults per 200 MB read, this size 70 k and the reader 15-20% faster).
_BLOCK = (1 << 20) - (8 << 10)
#: Parse blocks of lines in bulk, in a thread ahead of the consumer (False: every line through the
#: per-line path, in the consumer's thread — the reference the bulk path is tested against).
_BULK = True
#: Bytes read at a time past the last range start while looking for its first line.
_TAIL = 1 << 10
#: Compressed bytes fed to the zstd, bz2 and xz decoders at a time (bounds the output per step).
_ZSTD_CHUNK = 1 << 16


@register_source("jsonl")
class JsonlReader(Reader):
    class Params(ReaderParams):
        shard_bytes: ByteSize | None = Field(
            None, gt=0, description="split plain files into byte ranges of this size; unset: the plain files' "
            "total size / 16, at least 8 MB and at most 256 MB (a small corpus still gives every worker work)")
        compression: str | None = Field("infer", description="'infer' from the extension, or a codec name")

    def shards(self) -> list[Shard]:
        """One shard per compressed file, one per ``shard_bytes`` range of a plain file (:func:`range_bytes`).

        Raises ConfigError naming the file when its first bytes show another format (Parquet, a tar,
        gzip under a plain name, plain text under a ``.gz`` name …).
        """
        out: list[Shard] = []
        files = [(uri, info, rel, self._compression(uri)) for uri, info, rel in
                 list_files(self.params.paths, (".jsonl", ".json", ".gz", ".zst", ".bz2", ".xz", ".ndjson"))]
        step = range_bytes(self.params.shard_bytes, sum(info.get("size") or 0 for _, info, _, c in files if c is None))
        for uri, info, rel, compression in files:
            size = info.get("size") or 0
            check_file(uri, compression)
            if compression is not None or size <= step:
                out.append(Shard(f"{len(out):05d}", content_key(uri, info, 0, None), uri, rel, 0, None))
                continue
            starts = list(range(0, size, step))
            anchors = line_anchors(uri, starts[1:])
            for start, anchor in zip(starts, [None, *anchors], strict=True):
                stop = min(start + step, size)
                extra = {} if anchor is None else {"start_pos": anchor[0], "first_line": anchor[1]}
                key = content_key(uri, info, start, stop)
                out.append(Shard(f"{len(out):05d}", key, uri, rel, start, stop, extra))
        return out

    def _compression(self, uri: str) -> str | None:
        c = self.params.compression
        return infer_compression(uri) if c == "infer" else c

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        compression = self._compression(shard.uri)
        if _BULK:
            items = read_ahead(lambda: _items(shard, compression, self.params, bulk=True))
        else:
            items = _items(shard, compression, self.params, bulk=False)
        try:
            for item in items:
                if isinstance(item, pa.RecordBatch):
                    yield item
                elif isinstance(item, DamagedInput):
                    item.record_in(ctx, shard.uri)
                else:
                    for bad in item:
                        ctx.failure(bad.reason, bad.detail, file=shard.uri, line=bad.line, record=bad.record)
        finally:
            items.close()  # stops the read-ahead thread when the consumer stops early


def check_file(uri: str, compression: str | None) -> None:
    """ConfigError naming ``uri`` when its first bytes do not fit JSON Lines compressed with
    ``compression``."""
    if compression is not None and compression not in compr:
        raise ConfigError(f"{uri}: source.compression: unknown codec {compression!r} "
                          f"(have {sorted(c for c in compr if c)})")
    data = sniff.head(uri)
    found = sniff.looks_like(data)
    if compression is None:
        if found in sniff.CODECS:
            raise ConfigError(f"{uri}: not plain JSON Lines: {sniff.describe(found)}; name it by its "
                              f"compression (.gz, .zst …) or set source.compression: {found}")
        sniff.expect(uri, ("json", "empty"), "JSON Lines", data)
        if b"\r" in data and b"\n" not in data and data.rstrip(b"\r").count(b"\r"):
            raise ConfigError(f"{uri}: not JSON Lines: its lines end with a bare CR (old Mac line ends), so it "
                              "reads as one line; convert them to LF first (e.g. tr '\\r' '\\n')")
    elif compression in sniff.CODECS and found != compression:
        if compression in ("gzip", "zstd", "bz2", "xz") and sniff.cut_in_magic(data, compression):
            return  # the whole file is the start of the magic: read, it is a truncated_input
        if found is None:
            what = f"no {compression} magic bytes in its first {len(data)} bytes"
        elif found in sniff.CODECS:
            what = f"{sniff.describe(found)}; set source.compression: {found}"
        elif found == "json":
            what = "looks like plain JSON Lines text; name it without the compression suffix"
        else:
            what = sniff.describe(found)
        raise ConfigError(f"{uri}: not {compression}-compressed (as its name or source.compression says): "
                          f"{what}")


def line_anchors(uri: str, starts: list[int]) -> list[tuple[int, int]]:
    """For each byte offset in ``starts`` (ascending, > 0): where the first line beginning at or after it
    starts, and that line's 1-based number. One streaming pass, stopping after the last offset.

    A line begins at 0 and after every newline; an offset past the last line start maps to the file size.
    """
    out: list[tuple[int, int]] = []
    if not starts:
        return out
    with fsspec.open(uri, "rb") as fh:
        base, newlines = 0, 0  # file offset of `block`, newlines before it
        i = 0
        while i < len(starts):
            # near the last offset, read little past it: the rest of the file is its range's to read
            block = fh.read(min(_BLOCK, max(starts[-1] - base, 0) + _TAIL))
            if not block:
                break
            counted = 0  # newlines of `block` before this position are in `newlines`
            while i < len(starts):
                # the first line at or after offset s starts after the first newline at or after s - 1
                at = block.find(b"\n", max(starts[i] - 1 - base, 0))
                if at < 0:
                    break
                newlines += block.count(b"\n", counted, at + 1)
                counted = at + 1
                out.append((base + at + 1, 1 + newlines))
                i += 1
            newlines += block.count(b"\n", counted)
            base += len(block)
    out += [(base, 1 + newlines)] * (len(starts) - len(out))
    return out


class BadLine(NamedTuple):
    """A line that makes no document: ``reason`` is one of the module docstring's."""

    line: int
    reason: str
    detail: str
    record: bytes


def _items(shard: Shard, compression: str | None, p, bulk: bool) -> Iterator[pa.RecordBatch | list[BadLine] |
                                                                          DamagedInput]:
    """The shard as the consumer records it, in file order: batches, the bad lines of each block (a list,
    after the block's batches that come before its end), and a damage last (then the final batch).

    Touches no run context, so it can run in another thread. ``bulk``: lines through :func:`parse_block`,
    only the rest through :func:`_parse_line`; otherwise every line through :func:`_parse_line`.
    """
    fields = Fields(p.text_field, p.id_field, p.meta_fields, shard.rel)
    exclude = fields.exclude
    cutter = BatchCutter(p.batch_rows, int(p.batch_bytes))
    try:
        for first, lines in _line_blocks(shard, compression):
            if bulk:
                block = parse_block(first, lines, fields)
            else:
                block = ParsedBlock(first, lines, rest=list(range(len(lines))))
            bad: list[BadLine] = []
            done = 0  # the block's good rows added so far
            for k, pos in enumerate(block.rest):
                yield from cutter.extend(block, done, pos - k, shard.rel)
                done = pos - k
                doc = _parse_line(lines[pos], first + pos, shard.rel, p, exclude)
                if isinstance(doc, BadLine):
                    bad.append(doc)
                elif doc is not None and (batch := cutter.add(*doc)) is not None:
                    yield batch
            yield from cutter.extend(block, done, len(block.ids), shard.rel)
            if bad:
                yield bad
    except DamagedInput as damage:
        yield damage
    last = cutter.flush()
    if last is not None:
        yield last


def _parse_line(raw: bytes, line_no: int, rel: str, p, exclude):
    """The per-line path: ``(id, text, source, meta)``, a :class:`BadLine`, or None for a blank line."""
    if not raw.strip():
        return None
    return _parse(raw[3:] if line_no == 1 and raw.startswith(sniff.BOM) else raw, line_no, rel, p, exclude)


def _parse(raw: bytes, line_no: int, rel: str, p, exclude):
    def bad(reason: str, detail: str = "") -> BadLine:
        return BadLine(line_no, reason, detail, raw)

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
        return bad("missing_text_field", f"field {p.text_field!r} is null" if p.text_field in record else
                   f"no field {p.text_field!r}")
    if not isinstance(text, str):
        return bad("text_not_a_string", f"field {p.text_field!r} is {type(text).__name__}")
    if not text.strip():
        return bad("empty_text", f"field {p.text_field!r} is empty")
    if p.id_field:
        if record.get(p.id_field) is None:
            return bad("missing_id_field", f"field {p.id_field!r} is null" if p.id_field in record else
                       f"no field {p.id_field!r}")
        doc_id = id_text(record[p.id_field], raw, p.id_field)
    else:
        doc_id = f"{rel}:{line_no}"
    return doc_id, text, rel, meta_json(record, exclude, p.meta_fields)


def _line_blocks(shard: Shard, compression: str | None) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(number of the first line, lines)`` for the lines owned by the shard, a block at a time.

    Lines are numbered 1-based from the start of the file, blank ones and a leading BOM included (the
    per-line path skips or strips them). Raises :class:`DamagedInput` after the last whole line when
    the file is damaged (see the module docstring).
    """
    with fsspec.open(shard.uri, "rb") as fh:
        if compression is not None:
            yield from _split(_decoded(fh, compression), 1, 0, fh.tell)
        elif shard.start == 0:
            yield from _split(_blocks(fh, shard.stop), 1, 0, fh.tell)
        else:
            pos = shard.extra.get("start_pos")
            if pos is None:  # a shard listed by an older version: find its first line
                pos, first = line_anchors(shard.uri, [shard.start])[0]
            else:
                first = shard.extra["first_line"]
            if shard.stop is not None and pos >= shard.stop:
                return  # no line starts in this range
            fh.seek(pos)
            yield from _split(_blocks(fh, shard.stop), first, pos, fh.tell)


def _split(blocks: Iterator[bytes], line_no: int, pos: int, tell) -> Iterator[tuple[int, list[bytes]]]:
    """Cut ``blocks`` (starting at decoded offset ``pos``) into blocks of whole lines numbered from ``line_no``.

    A cut stream (DamagedInput from ``blocks``) gets the last whole line and the partial line it lost; a
    last line without a newline that is not valid JSON (once a BOM before line 1 is dropped) is a cut too
    (``tell()`` gives the file position for its ``offset``); a valid one is yielded alone.
    """
    parts: list[bytes] = []  # the pieces of a line not yet ended
    try:
        for block in blocks:
            pos += len(block)
            if b"\n" not in block:
                parts.append(block)
                continue
            lines = block.split(b"\n")
            if parts:  # the line the previous blocks began
                lines[0] = b"".join((*parts, lines[0]))
            parts = [lines.pop()]
            yield line_no, lines
            line_no += len(lines)
    except DamagedInput as damage:
        raise _lost_tail(damage, line_no, b"".join(parts), pos) from None
    rest = b"".join(parts)
    if not rest.strip():
        return
    try:
        orjson.loads(rest[3:] if line_no == 1 and rest.startswith(sniff.BOM) else rest)
    except orjson.JSONDecodeError as e:
        cut = DamagedInput("truncated_input", f"the last line has no newline and is not valid JSON ({e}): "
                           "the file looks cut inside it", offset=tell())
        raise _lost_tail(cut, line_no, rest, pos) from None
    yield line_no, [rest]


def _lost_tail(damage: DamagedInput, line_no: int, partial: bytes, pos: int) -> DamagedInput:
    """``damage`` with the last whole line (``line_no - 1``) and the partial line it cut, if any."""
    damage.line = line_no - 1
    if partial.strip():
        damage.lost, damage.record = 1, partial
        damage.detail += (f"; the partial line {line_no} ({len(partial)} bytes from decoded byte "
                          f"{pos - len(partial)}) is lost")
    else:
        damage.detail += f"; the last whole line is {line_no - 1}; an unknown number of records is lost"
    return damage


def _blocks(fh, stop: int | None) -> Iterator[bytes]:
    """Blocks of a plain file from its current position; with ``stop``, up to ``stop`` and then the rest
    of the line that crosses it (a line belongs to the range holding its first byte)."""
    pos = fh.tell()
    last = b"\n"
    while stop is None or pos < stop:
        block = fh.read(_BLOCK if stop is None else min(_BLOCK, stop - pos))
        if not block:
            return
        pos += len(block)
        last = block[-1:]
        yield block
    if last != b"\n":
        yield fh.readline()


def _decoded(raw, codec: str) -> Iterator[bytes]:
    """Decompressed blocks of the compressed stream ``raw``; DamagedInput when it is cut or corrupt.

    gzip and zstd are decoded here so that truncation is always detected (fsspec's zstd reader stops
    silently at a cut, and reads one frame only), bz2 and xz so that a damaged later stream is not
    dropped silently (see :func:`_streams`); other fsspec codecs raise EOFError when cut.
    """
    if codec == "zstd":
        yield from _unzstd(raw)
    elif codec == "gzip":
        yield from _read1(raw, gzip.GzipFile(fileobj=raw, mode="rb"), "gzip", (zlib.error, gzip.BadGzipFile))
    elif codec in ("bz2", "xz"):
        yield from _streams(raw, codec)
    else:
        import lzma  # its LZMAError is neither OSError nor ValueError

        yield from _read1(raw, compr[codec](raw, mode="rb"), codec, (OSError, ValueError, lzma.LZMAError))


def _read1(raw, stream, codec: str, corrupt: tuple[type[Exception], ...]) -> Iterator[bytes]:
    """Blocks from a decompressing file object. ``read1`` returns what one decoding step produced,
    so nothing decoded before a cut is lost inside a larger buffered read."""
    read = getattr(stream, "read1", stream.read)
    done = 0
    try:
        while block := read(_BLOCK):
            done += len(block)
            yield block
    except EOFError as e:
        raise _cut(codec, raw.tell(), done, e) from None
    except corrupt as e:
        raise _corrupt(codec, raw.tell(), done, e) from None


def _unzstd(raw) -> Iterator[bytes]:
    """Decode every zstd frame of ``raw``; a frame left unfinished at the end of the bytes is a cut."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, fed, done, pos = None, False, 0, 0
    while chunk := raw.read(_ZSTD_CHUNK):
        pos += len(chunk)
        while chunk:
            if dobj is None:
                dobj, fed = dctx.decompressobj(), False
            try:
                out = dobj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise _corrupt("zstd", pos, done, e) from None
            fed = True
            if out:
                done += len(out)
                yield out
            chunk = dobj.unused_data if dobj.eof else b""
            if dobj.eof:
                dobj = None
    if dobj is not None and fed:
        raise _cut("zstd", pos, done, "the last frame has no end")


def _streams(raw, codec: str) -> Iterator[bytes]:
    """Decode every bz2 or xz stream of ``raw``: a stream left unfinished is a cut, and bytes after a
    stream that neither start another nor are zero padding are corrupt (the standard library's file
    objects ignore them silently, and with them every record of a damaged later stream)."""
    import bz2
    import lzma

    new, error = {"bz2": (bz2.BZ2Decompressor, OSError), "xz": (lzma.LZMADecompressor, lzma.LZMAError)}[codec]
    dobj, fed, done, pos, chunk = new(), False, 0, 0, b""
    while True:
        if not chunk and dobj.needs_input:
            chunk = raw.read(_ZSTD_CHUNK)
            if not chunk:
                break
            pos += len(chunk)
        if not fed:
            chunk = chunk.lstrip(b"\0")  # zero padding after a stream
            if not chunk:
                continue
        try:
            out = dobj.decompress(chunk, _BLOCK)  # bounded output: more comes from the next call
        except error as e:
            raise _corrupt(codec, pos, done, e) from None
        chunk, fed = b"", True
        if out:
            done += len(out)
            yield out
        if dobj.eof:
            dobj, fed, chunk = new(), False, dobj.unused_data
    if fed:
        raise _cut(codec, pos, done, "the last stream has no end")


def _cut(codec: str, offset: int, decoded: int, why: object) -> DamagedInput:
    return DamagedInput("truncated_input", f"{codec} stream ends before its end marker at compressed byte "
                        f"{offset} ({why}); {decoded} bytes were decompressed", offset=offset)


def _corrupt(codec: str, offset: int, decoded: int, why: object) -> DamagedInput:
    return DamagedInput("corrupt_input", f"{codec} stream cannot be decoded near compressed byte {offset} "
                        f"({why}); {decoded} bytes were decompressed", offset=offset)

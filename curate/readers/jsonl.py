"""JSON Lines: plain, ``.gz`` or ``.zst`` (any fsspec compression), streamed in bounded blocks.

A plain file larger than ``shard_bytes`` is split into byte ranges; a line belongs to the range
holding its first byte, and line numbers stay those of the whole file. ``shards()`` finds, in one
pass over such a file, where each range's first line starts and its line number (``Shard.extra``
``start_pos``/``first_line``), so reading all ranges reads each byte about once. Compressed files
are one shard each (they cannot be seeked). A UTF-8 byte-order mark before the first line is skipped.

Every bad line lands in ``failures/`` with file, line and one of the reasons ``invalid_utf8``,
``invalid_json``, ``not_an_object``, ``missing_text_field``, ``text_not_a_string``, ``empty_text``,
``missing_id_field``. A damaged file keeps every whole line before the damage and is recorded once:
``truncated_input`` (a compressed stream that ends before its end marker, or a last line without a
newline that is not valid JSON: the file was cut) or ``corrupt_input`` (the decoder rejects the bytes),
with ``line`` (the last whole line, 0 for none), ``offset`` (the byte of the file where decoding
stopped: the compressed position) and ``lost`` (1 when a partial line was cut, None when unknown).
A partial last line is part of that record, never a document nor an ``invalid_json``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator

import fsspec
import orjson
import pyarrow as pa
from fsspec.compression import compr
from fsspec.utils import infer_compression
from pydantic import ByteSize, Field

from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import (DamagedInput, DocumentBuilder, Reader, ReaderParams, Shard, content_key,
                                 list_files, meta_json)

_BLOCK = 4 << 20
#: Bytes read at a time past the last range start while looking for its first line.
_TAIL = 1 << 10
#: Compressed bytes fed to the zstd decoder at a time (bounds the decompressed output per step).
_ZSTD_CHUNK = 1 << 16


@register_source("jsonl")
class JsonlReader(Reader):
    class Params(ReaderParams):
        shard_bytes: ByteSize = Field(ByteSize(256_000_000), description="split plain files above this size")
        compression: str | None = Field("infer", description="'infer' from the extension, or a codec name")

    def shards(self) -> list[Shard]:
        """One shard per compressed file, one per ``shard_bytes`` range of a plain file.

        Raises ConfigError naming the file when its first bytes show another format (Parquet, a tar,
        gzip under a plain name, plain text under a ``.gz`` name …).
        """
        out: list[Shard] = []
        for uri, info, rel in list_files(self.params.paths, (".jsonl", ".json", ".gz", ".zst", ".bz2", ".xz", ".ndjson")):
            size = info.get("size") or 0
            compression = self._compression(uri)
            check_file(uri, compression)
            step = int(self.params.shard_bytes)
            if compression is not None or size <= step:
                out.append(Shard(f"{len(out):05d}", content_key(uri, info, 0, None), uri, rel, 0, None))
                continue
            starts = list(range(0, size, step))
            anchors = line_anchors(uri, starts[1:])
            for start, anchor in zip(starts, [None, *anchors]):
                stop = min(start + step, size)
                extra = {} if anchor is None else {"start_pos": anchor[0], "first_line": anchor[1]}
                key = content_key(uri, info, start, stop)
                out.append(Shard(f"{len(out):05d}", key, uri, rel, start, stop, extra))
        return out

    def _compression(self, uri: str) -> str | None:
        c = self.params.compression
        return infer_compression(uri) if c == "infer" else c

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        builder = DocumentBuilder(p.batch_rows, int(p.batch_bytes))
        exclude = (p.text_field,) + ((p.id_field,) if p.id_field else ())
        try:
            for line_no, raw in _lines(shard, self._compression(shard.uri)):
                doc = _parse(raw, line_no, shard, p, exclude, ctx)
                if doc is not None:
                    batch = builder.add(*doc)
                    if batch is not None:
                        yield batch
        except DamagedInput as damage:
            damage.record_in(ctx, shard.uri)
        last = builder.flush()
        if last is not None:
            yield last


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
    elif compression in sniff.CODECS and found != compression:
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
    """Yield ``(1-based line number, line bytes)`` for the non-blank lines owned by the shard.

    Raises :class:`DamagedInput` after the last whole line when the file is damaged (see the module
    docstring).
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


def _split(blocks: Iterator[bytes], line_no: int, pos: int, tell) -> Iterator[tuple[int, bytes]]:
    """Cut ``blocks`` (starting at decoded offset ``pos``) into lines numbered from ``line_no``.

    A BOM before line 1 is dropped. A cut stream (DamagedInput from ``blocks``) gets the last whole
    line and the partial line it lost; a last line without a newline that is not valid JSON is a cut
    too (``tell()`` gives the file position for its ``offset``).
    """
    parts: list[bytes] = []  # the pieces of a line not yet ended
    try:
        for block in blocks:
            pos += len(block)
            if b"\n" not in block:
                parts.append(block)
                continue
            lines = (b"".join(parts) + block if parts else block).split(b"\n")
            parts = [lines.pop()]
            for raw in lines:
                if raw.strip():
                    yield line_no, (raw[3:] if line_no == 1 and raw.startswith(sniff.BOM) else raw)
                line_no += 1
    except DamagedInput as damage:
        raise _lost_tail(damage, line_no, b"".join(parts), pos) from None
    rest = b"".join(parts)
    if not rest.strip():
        return
    rest = rest[3:] if line_no == 1 and rest.startswith(sniff.BOM) else rest
    try:
        orjson.loads(rest)
    except orjson.JSONDecodeError as e:
        cut = DamagedInput("truncated_input", f"the last line has no newline and is not valid JSON ({e}): "
                           "the file looks cut inside it", offset=tell())
        raise _lost_tail(cut, line_no, rest, pos) from None
    yield line_no, rest


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
    silently at a cut, and reads one frame only); other fsspec codecs raise EOFError when cut.
    """
    if codec == "zstd":
        yield from _unzstd(raw)
    elif codec == "gzip":
        yield from _read1(raw, gzip.GzipFile(fileobj=raw, mode="rb"), "gzip", (zlib.error, gzip.BadGzipFile))
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


def _cut(codec: str, offset: int, decoded: int, why: object) -> DamagedInput:
    return DamagedInput("truncated_input", f"{codec} stream ends before its end marker at compressed byte "
                        f"{offset} ({why}); {decoded} bytes were decompressed", offset=offset)


def _corrupt(codec: str, offset: int, decoded: int, why: object) -> DamagedInput:
    return DamagedInput("corrupt_input", f"{codec} stream cannot be decoded near compressed byte {offset} "
                        f"({why}); {decoded} bytes were decompressed", offset=offset)

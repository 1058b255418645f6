"""WebDataset tar shards (local paths, globs or fsspec URLs); each tar is a shard.

A sample's text comes from the member with extension ``text_field`` (default ``txt``); its ``json``
member becomes ``meta`` (with ``id_field`` looked up there). With ``schema: interleaved``, image
members (jpg, png, webp, …) become an interleaved row: the images in member-name order, then the text.
Samples without the text member, and undecodable text, go to ``failures/`` with the tar and the
sample's position; so does a ``json`` member that is not a JSON object (``invalid_json``,
``not_an_object``), and the sample is skipped. Image members seen in documents mode are counted as
``read`` metric ``image_members_ignored`` rather than dropped silently, and so are members whose name
is not ``key.ext`` (``README``, ``._key.txt``) as ``members_ignored``.

``shards()`` refuses (ConfigError naming the file) an empty file, another format, or a tar whose first
header is invalid. A tar cut short or corrupt later keeps every whole sample before the damage and is
recorded once as ``truncated_input`` or ``corrupt_input`` (see :func:`iter_samples`), with ``line``
the position of the last whole sample, ``offset`` the byte where reading stopped and ``lost``.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import Literal

import fsspec
import orjson
import pyarrow as pa
from pydantic import Field

from curate.context import READ_LABEL
from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import (
    DamagedInput,
    DocumentBuilder,
    Reader,
    ReaderParams,
    Shard,
    content_key,
    list_files,
)
from curate.schema import INTERLEAVED

IMAGE_EXTENSIONS = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                    "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff"}


@register_source("webdataset")
class WebDatasetReader(Reader):
    class Params(ReaderParams):
        text_field: str = Field("txt", description="extension of the text member")
        schema_: Literal["documents", "interleaved"] = Field(
            "documents", alias="schema", description="interleaved: image members become images of the row")

    def output_kind(self) -> str:
        return self.params.schema_

    def shards(self) -> list[Shard]:
        """One shard per tar; ConfigError naming the file when it is empty, another format, or its
        first header is invalid."""
        listed = list_files(self.params.paths, (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))
        for uri, _, _ in listed:
            check_tar(uri)
        return [Shard(f"{i:05d}", content_key(uri, info), uri, rel)
                for i, (uri, info, rel) in enumerate(listed)]

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        interleaved = p.schema_ == "interleaved"
        builder = DocumentBuilder(p.batch_rows, int(p.batch_bytes))
        rows: list[dict] = []
        ignored: list[str] = []
        with fsspec.open(shard.uri, "rb") as fh:
            try:
                for n, sample in enumerate(iter_samples(fh, shard.uri, ignored)):
                    doc = self._sample(sample, n, shard, ctx)
                    if doc is None:
                        continue
                    if interleaved:
                        rows.append(doc)
                        if len(rows) >= p.batch_rows:
                            yield _interleaved_batch(rows)
                            rows = []
                    else:
                        batch = builder.add(doc["id"], doc["text"], shard.rel, doc["meta"])
                        if batch is not None:
                            yield batch
            except DamagedInput as damage:
                damage.record_in(ctx, shard.uri)
        if ignored:
            ctx.stats[READ_LABEL].metric("members_ignored").add_many(len(ignored), len(ignored), 1, 1)
        last = _interleaved_batch(rows) if rows else builder.flush()
        if last is not None:
            yield last

    def _sample(self, sample: dict, n: int, shard: Shard, ctx) -> dict | None:
        p = self.params
        key = sample.get("__key__", str(n))
        raw = sample.get(p.text_field)
        if raw is None:
            ctx.failure("missing_text_field", f"sample {key!r} has no .{p.text_field}", file=shard.uri, line=n)
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            ctx.failure("invalid_utf8", f"sample {key!r}: {e}", file=shard.uri, line=n)
            return None
        if not text.strip():
            ctx.failure("empty_text", f"sample {key!r}", file=shard.uri, line=n)
            return None
        meta = _meta(sample, key, n, shard, ctx)
        if meta is None:
            return None
        if p.id_field:
            doc_id = str(meta[p.id_field]) if meta.get(p.id_field) is not None else key
        else:
            doc_id = f"{shard.rel}:{key}"
        images = [(ext, sample[ext]) for ext in sorted(sample) if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        if images and p.schema_ == "documents":
            ctx.stats[READ_LABEL].metric("image_members_ignored").add_many(len(images), len(images), 1, 1)
        meta_str = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode() if meta else None
        return {"id": doc_id, "text": text, "meta": meta_str, "source": shard.rel, "images": images}


def check_tar(uri: str) -> None:
    """ConfigError naming ``uri`` unless its first bytes look like a tar (or a compressed one)."""
    data = sniff.head(uri)
    found = sniff.expect(uri, ("tar", "gzip", "bz2", "xz"), "a tar archive", data)
    if found in (None, "tar"):
        why = sniff.tar_header_error(data)
        if why:
            raise ConfigError(f"{uri}: not a readable tar archive: {why}")


def _meta(sample: dict, key: str, n: int, shard: Shard, ctx) -> dict | None:
    """The sample's ``json`` member as a dict ({} without one); None (counted) when it is not a JSON
    object."""
    if "json" not in sample:
        return {}
    try:
        meta = orjson.loads(sample["json"])
    except orjson.JSONDecodeError as e:
        ctx.failure("invalid_json", f"sample {key!r}: member .json: {e}", file=shard.uri, line=n,
                    record=sample["json"])
        return None
    if not isinstance(meta, dict):
        ctx.failure("not_an_object", f"sample {key!r}: member .json is {type(meta).__name__}", file=shard.uri,
                    line=n, record=sample["json"])
        return None
    return meta


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def iter_samples(fh, url: str, ignored: list[str] | None = None) -> Iterator[dict]:
    """The samples of an open tar stream, grouped by key as ``webdataset`` groups them.

    A member ``dir/key.ext1.ext2`` belongs to sample ``dir/key`` under the (lower-cased) field
    ``ext1.ext2``; consecutive members with the same key form one sample, and a field seen again in it
    starts the next sample (with the same key: no member is overwritten). The names of files that are
    not ``key.ext`` are appended to ``ignored``. Read with the standard
    library's ``tarfile``: importing ``webdataset`` would import torch (~250 MB) in every worker.

    A tar that ends before its end-of-archive block, or stops decoding, raises :class:`DamagedInput`
    after every whole sample: the sample being read when the bytes ran out is whole only when what
    follows it shows another key or the end of the archive; otherwise it is counted lost (``lost=1``).
    """
    stream, mode = _gunzipped(fh)
    try:
        yield from _samples(stream, mode, fh, url, ignored)
    finally:
        if stream is not fh:
            stream.close()


def _samples(stream, mode: str, fh, url: str, ignored: list[str] | None) -> Iterator[dict]:
    """:func:`iter_samples` over ``stream`` (``fh`` itself, or ``fh`` decompressed)."""
    current: dict | None = None
    count = 0
    pending = None  # the key of the member being read when the tar broke off
    try:
        with tarfile.open(fileobj=stream, mode=mode, tarinfo=_EndAwareTarInfo) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                match = _KEY.match(member.name)
                if match is None:
                    if ignored is not None:
                        ignored.append(member.name)
                    continue
                key, field = match.group(1), match.group(2).lower()
                pending = key
                data = tf.extractfile(member).read()
                pending = None
                if current is None or current["__key__"] != key or field in current:
                    if current is not None:
                        yield current
                        count += 1
                    current = {"__key__": key, "__url__": url}
                current[field] = data
            damage = _tar_end(tf, fh)
            next_key = _peek_key(fh, tf.offset) if damage is not None else None
    except tarfile.ReadError as e:
        if count == 0 and current is None and pending is None and _GZIP_CUT not in str(e):
            raise DamagedInput("unreadable_file", f"not a readable tar archive: {e}", offset=0) from None
        reason = "truncated_input" if "unexpected end" in str(e) else "corrupt_input"
        damage = DamagedInput(reason, f"tar archive breaks off: {e}", offset=_tell(fh))
        next_key = pending  # a broken member whose header was read names its sample
    if damage is None:
        if current is not None:
            yield current
        return
    whole = current is not None and next_key is not None and next_key != current["__key__"]
    if whole:
        yield current
        count += 1
    damage.line = count - 1 if count else None
    if current is not None and not whole:
        damage.lost = 1
        damage.detail += (f"; sample {current['__key__']!r} (position {count}) is cut or may lack members "
                          "after the cut: not kept")
    elif next_key:
        damage.lost = 1
        damage.detail += f"; sample {next_key!r} (position {count}) is cut"
    elif next_key == "":
        damage.lost = 0
        damage.detail += "; only the end-of-archive block is cut: no sample is lost"
    else:
        damage.detail += "; an unknown number of samples is lost"
    raise damage


def _gunzipped(fh):
    """``(stream, tarfile mode)``: a gzip-compressed tar is decompressed by :mod:`gzip`, which reads every
    member of a multi-member file (``bgzip``, ``pigz -i``, concatenated ``.tar.gz`` parts) — tarfile's own
    stream reader stops after the first one. Other inputs go to tarfile as they are."""
    head = b""
    try:
        if fh.seekable():
            at = fh.tell()
            head = fh.read(2)
            fh.seek(at)
    except (OSError, ValueError):
        head = b""
    if head != b"\x1f\x8b":
        return fh, "r|*"
    return _TarSource(gzip.GzipFile(fileobj=fh, mode="rb")), "r|"


#: How :class:`_TarSource` words a gzip stream that ends before its end marker (a cut ``.tar.gz``: even
#: one cut before its first sample is a truncation, not an unreadable file).
_GZIP_CUT = "compressed stream ends early"


class _TarSource:
    """A decompressed stream for tarfile: what breaks the decompression becomes tarfile's ReadError, with
    tarfile's wording for a stream that ends early, so damage is reported as for any other tar."""

    def __init__(self, inner):
        self.inner = inner

    def read(self, size: int = -1) -> bytes:
        try:
            return self.inner.read(size)
        except EOFError as e:
            raise tarfile.ReadError(f"unexpected end of data ({_GZIP_CUT}: {e})") from None
        except (zlib.error, gzip.BadGzipFile) as e:
            raise tarfile.ReadError(f"corrupt compressed data ({e})") from None

    def tell(self) -> int:
        return self.inner.fileobj.tell() if self.inner.fileobj is not None else 0

    def close(self) -> None:
        self.inner.close()


class _EndAwareTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why the last header could not be read (tarfile ends iteration silently
    on an empty, truncated or invalid header after the first one)."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_._curate_end = e
            raise


def _tar_end(tf: tarfile.TarFile, fh) -> DamagedInput | None:
    """None when the archive ended with its end-of-archive block, else what broke it off."""
    why = getattr(tf, "_curate_end", None)
    if why is None or isinstance(why, tarfile.EOFHeaderError):
        return None
    if isinstance(why, tarfile.InvalidHeaderError):
        damage = DamagedInput("corrupt_input", f"tar header at tar byte {tf.offset} is invalid ({why})",
                              offset=tf.offset)
    else:
        damage = DamagedInput("truncated_input", f"tar archive ends inside or before the header at tar byte "
                              f"{tf.offset} ({why}), with no end-of-archive block", offset=_tell(fh))
    return damage


def _peek_key(fh, offset: int) -> str | None:
    """What the (possibly partial) header at ``offset`` of an uncompressed, seekable tar shows: ``""``
    for the end-of-archive block, the key of the member it names, or None when that cannot be seen."""
    try:
        if not fh.seekable():
            return None
        fh.seek(0)
        if sniff.looks_like(fh.read(sniff.HEAD)) != "tar":
            return None  # compressed: tar offsets are not file offsets
        fh.seek(offset)
        part = fh.read(tarfile.BLOCKSIZE)
    except (OSError, ValueError):
        return None
    if not part:
        return None
    if part[0] == 0:
        return ""
    name = part[:100]
    if b"\0" not in name and len(part) < 100:
        return None
    name = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    match = _KEY.match(name)
    return match.group(1) if match and "@PaxHeader" not in name and "@LongLink" not in name else None


def _tell(fh) -> int | None:
    try:
        return fh.tell()
    except (OSError, ValueError):
        return None


def _image(ext: str, data: bytes) -> dict:
    width, height = _size(data)
    return {"bytes": data, "mime": IMAGE_EXTENSIONS[ext.rsplit(".", 1)[-1]],
            "sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height}


def _size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height as displayed, from the header (see :func:`curate.images.image_size`)."""
    from curate.images import image_size

    return image_size(data)


def _interleaved_batch(rows: list[dict]) -> pa.RecordBatch:
    texts, images = [], []
    for r in rows:
        imgs = [_image(ext, data) for ext, data in r["images"]]
        texts.append([None] * len(imgs) + [r["text"]])
        images.append(imgs + [None])
    return pa.RecordBatch.from_pydict(
        {"id": [r["id"] for r in rows], "texts": texts, "images": images,
         "source": [r["source"] for r in rows], "meta": [r["meta"] for r in rows]},
        schema=INTERLEAVED,
    )

"""What every reader shares: shards with content keys, file listing, bounded batches.

A reader turns its ``source:`` section into a list of :class:`Shard` (one per input file, or per
byte/row-group range of a large one), and reads one shard as a stream of bounded
``pyarrow.RecordBatch`` in the documents (or interleaved) schema. Bad records go to
``ctx.failure`` with file and line; they never stop the shard. A file that is not of the source's
kind, empty or unreadable is a ConfigError from ``shards()`` naming it (see ``sniff.py``); damage
found only while reading (a cut or corrupt stream) ends that file with one :class:`DamagedInput`
record after every whole record before it.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import fsspec
import orjson
import pyarrow as pa
from pydantic import ByteSize, Field, field_validator

from curate.errors import ConfigError
from curate.schema import DOCUMENTS, string_array
from curate.seeds import digest
from curate.stage import StageParams

if TYPE_CHECKING:
    from curate.context import RunContext


@dataclass(frozen=True)
class Shard:
    """One unit of work: a stable ``name`` (its place in the sorted listing) and a content ``key``."""

    name: str
    key: str
    uri: str
    rel: str = ""
    start: int = 0
    stop: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "uri": self.uri, "rel": self.rel, "start": self.start,
                "stop": self.stop, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shard:
        return cls(**d)


class BatchParams(StageParams):
    """Batch bounds, shared by every reader: memory stays bounded whatever the document sizes."""

    batch_rows: int = Field(2048, gt=0, description="most rows per batch")
    batch_bytes: ByteSize = Field(ByteSize(16_000_000), description="most text bytes per batch")


class FieldParams(BatchParams):
    """Field mapping onto the documents schema."""

    text_field: str = Field("text", description="field holding the document text")
    id_field: str | None = Field(None, description="field holding a unique id; default file:line")
    meta_fields: list[str] | None = Field(None, description="fields kept in `meta`; default all others")


#: Bounds of the shard size an unset ``shard_bytes`` gives, and how many shards it aims at.
AUTO_RANGES = 16
AUTO_MIN_BYTES = 8_000_000
AUTO_MAX_BYTES = 256_000_000


def range_bytes(shard_bytes: int | None, plain_bytes: int) -> int:
    """The bytes of input per shard: ``shard_bytes`` when set, else the input's total ``plain_bytes``
    (those that can be split) / :data:`AUTO_RANGES`, kept within [:data:`AUTO_MIN_BYTES`,
    :data:`AUTO_MAX_BYTES`]. Used for JSONL byte ranges and Parquet row-group runs.

    A fixed 256 MB made a 50 MB corpus one shard, run by one worker while the others waited; 16 ranges
    keep 2–16 workers busy to the end, and the floor keeps each shard's fixed costs (its files, a packed
    shard's last part-filled window) small beside its work. The size depends on the input alone, never
    on the workers, so every executor writes the same files.
    """
    if shard_bytes is not None:
        return int(shard_bytes)
    return min(AUTO_MAX_BYTES, max(AUTO_MIN_BYTES, -(-plain_bytes // AUTO_RANGES)))


class ReaderParams(FieldParams):
    """Parameters every file-based reader takes."""

    paths: list[str] = Field(description="files, glob patterns or fsspec URLs")

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Reader(ABC):
    """Base reader. Subclasses implement :meth:`shards` and :meth:`read`."""

    kind: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = ReaderParams
    def __init__(self, params: StageParams):
        self.params = params

    def output_kind(self) -> str:
        """Which schema (``documents`` or ``interleaved``) the batches have."""
        return "documents"

    @abstractmethod
    def shards(self) -> list[Shard]:
        """The input shards, in a stable order, each with a content key."""

    @abstractmethod
    def read(self, shard: Shard, ctx: RunContext) -> Iterator[pa.RecordBatch]:
        """Stream one shard as bounded batches; bad records go to ``ctx.failure``."""


class DamagedInput(Exception):
    """An input file ends early or stops decoding; raised once every whole record before it is yielded.

    ``reason`` is ``truncated_input`` (the bytes end before the format says they should),
    ``corrupt_input`` (the decoder rejects the bytes) or ``unreadable_file`` (the file cannot be read
    at all). ``offset`` is the byte position in the file where reading stopped (for compressed files
    the compressed position; ``detail`` names any other position). ``line`` is the last whole line
    (1-based, 0 for none) or sample/row (0-based, None for none) before the damage; ``lost`` the
    number of records known to be lost (at least), None when unknown.
    """

    def __init__(self, reason: str, detail: str, *, offset: int | None = None, line: int | None = None,
                 lost: int | None = None, record: bytes | str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.offset = reason, detail, offset
        self.line, self.lost, self.record = line, lost, record

    def record_in(self, ctx: RunContext, uri: str) -> None:
        """Write this damage to ``failures/`` (with ``file``, ``line``, ``offset``, ``lost``) and count it."""
        ctx.failure(self.reason, self.detail, file=uri, line=self.line, offset=self.offset, lost=self.lost,
                    record=self.record)


# ---------------------------------------------------------------------------------- helpers
def list_files(patterns: list[str], suffixes: tuple[str, ...] | None = None) -> list[tuple[str, dict, str]]:
    """Expand globs/URLs to ``(uri, info, relative name)`` sorted by uri; ConfigError if none match."""
    from curate.secrets import redact

    found: dict[str, dict] = {}
    for pattern in _brace_expand(patterns):
        try:
            fs, _, expanded = fsspec.get_fs_token_paths(os.path.expanduser(pattern))
            matches = [p for p in expanded if not fs.isdir(p)]
            if not matches and fs.isdir(expanded[0] if expanded else pattern):
                matches = sorted(p for p in fs.find(expanded[0]) if suffixes is None or p.endswith(suffixes))
            if not matches and fs.isfile(literal := fs._strip_protocol(os.path.expanduser(pattern))):
                matches = [literal]  # a file whose name has glob characters, in a folder that has some too
            if not matches:
                raise FileNotFoundError(pattern)
            for p in matches:
                uri = fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p
                found[uri] = fs.info(p)
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(f"no input files match {redact(pattern)!r}") from None
        except (OSError, ValueError, ImportError) as e:  # a filesystem that cannot be reached or used
            raise ConfigError(f"cannot list {redact(pattern)!r}: {type(e).__name__}: {redact(str(e))}") from None
    uris = sorted(found)
    # relative names become each row's `source`: computed from the redacted uri, so credentials in a
    # URL never reach the output
    shown = {u: redact(u) for u in uris}
    root = os.path.commonpath([shown[u].split("://")[-1] for u in uris]) if len(uris) > 1 else ""
    out = []
    for u in uris:
        path = shown[u].split("://")[-1]
        rel = os.path.relpath(path, root) if root and path != root else os.path.basename(path)
        out.append((u, found[u], rel))
    return out


def _brace_expand(patterns: list[str]) -> list[str]:
    """``shard-{00000..00099}.tar`` and ``{a,b}`` expanded as the shell and webdataset expand them; a
    local path naming an existing file as it is (``data{1}.jsonl``) is kept."""
    from braceexpand import braceexpand

    return [p for pattern in patterns
            for p in ([pattern] if _literal_file(pattern) else braceexpand(pattern))]


def _literal_file(pattern: str) -> bool:
    return "{" in pattern and "://" not in pattern and os.path.isfile(os.path.expanduser(pattern))


def content_key(uri: str, info: dict, *extra: object) -> str:
    """A content key from what the filesystem says about a file (size, mtime or etag) plus ``extra``."""
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
    return digest(uri, info.get("size"), stamp, *extra, size=12).hex()


class DocumentBuilder:
    """Accumulates documents and cuts them into batches bounded by rows and text bytes."""

    def __init__(self, batch_rows: int, batch_bytes: int):
        self.batch_rows, self.batch_bytes = batch_rows, batch_bytes
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.sources: list[str | None] = []
        self.metas: list[str | None] = []
        self.nbytes = 0

    def add(self, doc_id: str, text: str, source: str | None, meta: str | None) -> pa.RecordBatch | None:
        self.ids.append(doc_id)
        self.texts.append(text)
        self.sources.append(source)
        self.metas.append(meta)
        self.nbytes += len(text)
        if len(self.ids) >= self.batch_rows or self.nbytes >= self.batch_bytes:
            return self.flush()
        return None

    def flush(self) -> pa.RecordBatch | None:
        if not self.ids:
            return None
        batch = pa.RecordBatch.from_arrays(
            [string_array(self.ids), string_array(self.texts), string_array(self.sources), string_array(self.metas)],
            schema=DOCUMENTS,
        )
        self.ids, self.texts, self.sources, self.metas, self.nbytes = [], [], [], [], 0
        return batch


def meta_json(record: dict, exclude: tuple[str, ...], keep: list[str] | None) -> str | None:
    """The record's other fields as a JSON object string (sorted keys), or None when there are none."""
    if keep is not None:
        rest = {k: record[k] for k in keep if k in record}
    else:
        rest = {k: v for k, v in record.items() if k not in exclude}
    return orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode() if rest else None

"""What a file looks like, from its first few hundred bytes: catches a source whose files are not of its kind.

Every file-based reader calls :func:`expect` from ``shards()`` (so ``curate validate`` catches it): a
Parquet file under ``kind: jsonl``, a gzip file named ``.jsonl`` or a tar under ``kind: parquet`` is a
:class:`~curate.errors.ConfigError` naming the file and what it looks like, never an empty corpus.
Reading costs :data:`HEAD` bytes per file.
"""

from __future__ import annotations

import tarfile

import fsspec

from curate.errors import ConfigError

#: How many bytes :func:`head` reads (a tar header block is 512 bytes).
HEAD = 512
BOM = b"\xef\xbb\xbf"

#: Magic prefixes, checked in order.
_MAGIC = (
    (b"PAR1", "parquet"),
    (b"ARROW1", "arrow"),
    (b"\xff\xff\xff\xff", "arrow"),  # an Arrow IPC stream (as `datasets` writes): a continuation marker
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"PK\x03\x04", "zip"),
)

#: What each format is called in messages, and the source kind that reads it.
DESCRIBE = {
    "parquet": ("Parquet", "use kind: parquet"),
    "arrow": ("Arrow IPC", "use kind: arrow"),
    "tar": ("a tar archive", "use kind: webdataset"),
    "json": ("JSON Lines text", "use kind: jsonl"),
    "gzip": ("gzip-compressed data", None),
    "zstd": ("zstd-compressed data", None),
    "bz2": ("bzip2-compressed data", None),
    "xz": ("xz-compressed data", None),
    "lz4": ("lz4-compressed data", None),
    "zip": ("a zip archive", None),
    "empty": ("an empty file (0 bytes)", None),
    "utf16": ("text in UTF-16 or UTF-32", "re-encode it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)"),
}

#: Compression codecs (fsspec names) whose streams start with a known magic.
CODECS = ("gzip", "zstd", "bz2", "xz", "lz4", "zip")


def head(uri: str, n: int = HEAD) -> bytes:
    """The first ``n`` bytes of the file at ``uri`` (fewer when the file is shorter)."""
    with fsspec.open(uri, "rb") as fh:
        return fh.read(n)


def looks_like(data: bytes) -> str | None:
    """The format ``data`` (a file's first bytes) starts like, or None when it is not recognized.

    One of ``empty``, ``parquet``, ``arrow``, ``gzip``, ``zstd``, ``bz2``, ``xz``, ``lz4``, ``zip``,
    ``tar`` (``ustar`` at offset 257), ``utf16`` (UTF-16/32 text), ``json`` (``{`` after optional BOM and
    whitespace).
    """
    if not data:
        return "empty"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[1:4] == b"\x2a\x4d\x18" and 0x50 <= data[0] <= 0x5F:
        return "zstd"  # a zstd skippable frame first (pzstd writes one)
    if data[257:262] == b"ustar":
        return "tar"
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")) or data[:2] in (b"{\x00", b"\x00{"):
        return "utf16"  # a UTF-16/32 byte-order mark, or a "{" that is two bytes wide
    if data.removeprefix(BOM).lstrip().startswith(b"{"):
        return "json"
    return None


def cut_in_magic(data: bytes, codec: str) -> bool:
    """Whether ``data`` (a whole file, shorter than :data:`HEAD`) is a non-empty proper start of the magic
    of ``codec``: a compressed stream cut inside its first bytes, not a file of another format."""
    return 0 < len(data) and any(name == codec and len(data) < len(magic) and magic.startswith(data)
                                 for magic, name in _MAGIC)


def describe(found: str) -> str:
    """``found`` in words, with the source kind that reads it: ``looks like Parquet; use kind: parquet``."""
    words, hint = DESCRIBE.get(found, (found, None))
    return f"looks like {words}" + (f"; {hint}" if hint else "")


def expect(uri: str, wanted: tuple[str, ...], kind: str, data: bytes | None = None) -> str | None:
    """Raise ConfigError unless the file at ``uri`` looks like one of ``wanted`` (or like nothing known).

    ``kind`` names what the source expected (for the message). Returns what the file looks like.
    An unrecognized start (None) passes: the reader decides, record by record or when it opens the file.
    """
    found = looks_like(head(uri) if data is None else data)
    if found is None or found in wanted:
        return found
    raise ConfigError(f"{uri}: not {kind}: {describe(found)}")


def tar_header_error(data: bytes) -> str | None:
    """Why the first 512-byte block of an uncompressed tar is not a valid header, or None when it is.

    An all-zero block (an empty archive) is valid. Uses the checksum test of :mod:`tarfile`.
    """
    block = data[:tarfile.BLOCKSIZE]
    if len(block) < tarfile.BLOCKSIZE:
        return f"shorter than one tar header ({len(block)} bytes)"
    if block.count(0) == tarfile.BLOCKSIZE:
        return None
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return f"the first tar header is invalid ({e})"
    return None

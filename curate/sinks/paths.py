"""Where a sink may write: its folder inside the run directory, and safe partition folder names.

**Sink folders.** :func:`check_sink_path` is the validator behind ``SinkParams.path``: a sink folder is
a relative path that stays inside the run directory. Refused: an empty path, an absolute path, a
``..`` component, a drive or URL scheme (any ``:``; webdataset would also read ``pipe:…`` as a shell
command), backslashes, control characters (NUL included), a component that starts with the
temporary-file prefix ``.tmp-`` or is longer than 255 bytes (no filesystem takes it), and a first
component naming one of curate's own entries of the run directory (:data:`RESERVED`, the run's
``lock`` and ``locks/`` included, compared case-insensitively). The accepted path is normalized (``./a//b/``
→ ``a/b``).

**Partition folders.** With ``partition_by: <column>``, rows go to ``<column>_<value>/`` where both parts
are encoded by :func:`encode_component`, so no value can name a folder outside the sink folder, and two
different values never share a folder, even on a case-insensitive filesystem:

* bytes outside ``[a-z0-9._-]`` are percent-encoded from UTF-8 as ``%XX`` (upper-case hex): ``/`` →
  ``%2F``, NUL → ``%00``, ``é`` → ``%C3%A9``, and upper-case letters too (``Aa`` → ``%41a``), so ``Aa``
  and ``aa`` stay two folders on macOS and Windows. The column part keeps its upper-case letters (one
  column per sink, nothing to tell apart);
* a ``.`` that starts or ends the value is encoded (``.`` → ``%2E``, ``..`` → ``%2E%2E``, ``a.`` →
  ``a%2E``: no hidden folders, nothing Windows would trim);
* None is ``%null`` and the empty string is ``%empty`` (the encoder never writes ``%`` followed by a
  lower-case letter, so these cannot clash with a real value);
* an encoding longer than :data:`MAX_COMPONENT` characters keeps its first characters (never cutting
  a ``%XX``) and ends with ``~`` and 16 hex digits of the sha256 of the whole encoding (``~`` is never
  written otherwise).

Values become text before encoding (:func:`value_text`): strings as they are, ``True``/``False`` as
``true``/``false``, integers in decimal, floats by Python's shortest ``repr`` (``nan``, ``inf``),
bytes as their raw bytes, dates and times in ISO 8601. The encoding is injective on that text, plain
ASCII, deterministic, and undone by ``urllib.parse.unquote`` (except the two special forms and
shortened names): ``bucket_8``, ``lang_en``, ``lang_%45%4E`` for ``EN``. The original value is kept in
``index.json`` (:func:`json_value`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import math
from typing import Any

#: First components of a sink path that are curate's own entries of the run directory.
RESERVED = frozenset({"completions", "failures", "logs", "stats", "global", "phases", "quarantine", "cache",
                      "downloads", "tokenizer", "fingerprint", "manifest.resolved.yaml", "stats.json",
                      "compacted", "publish", "report", "report.html", "lock", "locks"})
#: Longest folder name (one component of a sink path) filesystems take, in UTF-8 bytes.
MAX_NAME_BYTES = 255
#: Longest encoded part of a partition folder name (column and value each), in characters.
MAX_COMPONENT = 96
NULL = "%null"
EMPTY = "%empty"

_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._-")
_CASED = _LOWER | frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TMP_PREFIX = ".tmp-"


def check_sink_path(path: str) -> str:
    """The normalized form of a sink ``path`` (``a/b``), or ValueError saying why it would leave the
    run directory or collide with curate's own files (see the module docstring for the rules)."""
    if not isinstance(path, str):
        raise ValueError("must be a string")
    if not path.strip():
        raise ValueError("must not be empty (leave it out for the default, the sink's kind)")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{path!r} contains a control character")
    if "\\" in path:
        raise ValueError(f"{path!r}: use '/' to separate folders")
    if ":" in path:
        raise ValueError(f"{path!r}: a drive or URL scheme is not allowed; "
                         "a sink writes inside the run directory (set `output` to move the run)")
    if path.startswith("/"):
        raise ValueError(f"{path!r} is absolute; a sink path is relative to the run directory")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r}: '..' would leave the run directory")
    if not parts:
        raise ValueError(f"{path!r} names the run directory itself; give the sink its own folder")
    for p in parts:
        if p != p.strip():
            raise ValueError(f"{path!r}: folder name {p!r} starts or ends with a space")
        if len(p.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
            raise ValueError(f"{path!r}: folder name {p[:40]!r}… is longer than {MAX_NAME_BYTES} bytes")
        if p.startswith(_TMP_PREFIX):
            raise ValueError(f"{path!r}: {p!r} starts with {_TMP_PREFIX!r}, curate's temporary-file prefix")
    if parts[0].casefold() in RESERVED:
        raise ValueError(f"{path!r}: {parts[0]!r} is curate's own entry of the run directory "
                         f"(reserved: {', '.join(sorted(RESERVED))})")
    return "/".join(parts)


def encode_component(text: str | bytes | None, *, fold_case: bool = True) -> str:
    """``text`` as one safe folder-name component (rules in the module docstring); with
    ``fold_case=False`` upper-case letters are kept as they are (for the column name)."""
    if text is None:
        return NULL
    data = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else bytes(text)
    if not data:
        return EMPTY
    safe = _LOWER if fold_case else _CASED
    last = len(data) - 1
    out = "".join(chr(b) if b in safe and not (b == 0x2E and i in (0, last)) else f"%{b:02X}"
                  for i, b in enumerate(data))
    if len(out) > MAX_COMPONENT:
        digest = hashlib.sha256(out.encode("ascii")).hexdigest()[:16]
        head = out[:MAX_COMPONENT - len(digest) - 1]
        cut = head.rfind("%", len(head) - 2)  # a %XX triplet cut short
        if cut != -1:
            head = head[:cut]
        out = f"{head}~{digest}"
    return out


def value_text(value: Any) -> str | bytes | None:
    """The text a partition value is encoded from (see the module docstring); TypeError for a value
    that has no folder form (lists, structs)."""
    if value is None or isinstance(value, (str, bytes)):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, _dt.timedelta)):
        return str(value)
    raise TypeError(f"partition_by: a {type(value).__name__} value cannot name a folder "
                    "(use a column of strings, numbers, booleans or dates)")


def partition_folder(column: str, value: Any) -> str:
    """The folder name ``<column>_<value>`` for rows whose ``column`` holds ``value``."""
    folder = f"{encode_component(column, fold_case=False)}_{encode_component(value_text(value))}"
    if "/" in folder or folder in (".", "..") or "\x00" in folder:  # pragma: no cover - by construction
        raise AssertionError(f"unsafe partition folder {folder!r}")
    return folder


def json_value(value: Any) -> Any:
    """``value`` as stored in ``index.json``: strings, integers, booleans, None and finite floats as
    they are; ``nan``/``inf``/``-inf`` as those strings; bytes as base64; dates and times in ISO 8601;
    decimals and durations as strings."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    return str(value)

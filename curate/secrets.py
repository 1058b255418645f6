"""Secret values never reach the disk or the console.

A manifest's ``${VAR}`` whose name looks like a secret (``HF_TOKEN``, ``OPENAI_API_KEY``, see
``curate.manifest._SECRET_NAME``) is expanded in memory only, and its value is recorded in
:data:`SECRET_VALUES` (per process: a spawned worker records them again when it rebuilds the
manifest). Everything curate writes as text — logs, failure records, completion markers, console
messages, ``index.json`` — goes through :func:`redact` or :func:`redact_obj` first.

Redaction replaces

* every known secret value, longest first (so a secret that contains another is replaced whole), and
  its common escaped forms: JSON string escaping (a secret with ``"`` or ``\\`` inside a JSON record)
  and percent-encoding (a secret placed in a URL);
* the user-info part of any URL, ``scheme://user:password@host`` → ``scheme://***@host``, including
  credentials that were written literally in a manifest and so are not known secret values.

with :data:`MASK` (``***``). Redaction is for text leaving the process; in-memory values (the
manifest a worker runs) keep the real secret.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, quote_plus

#: What a redacted secret becomes.
MASK = "***"

#: Secret values seen by ``${VAR}`` interpolation in this process (``curate.manifest`` adds to it).
SECRET_VALUES: set[str] = set()

# scheme://userinfo@ — userinfo stops at the first "/", whitespace, "?" or "#" (the end of the
# authority), so an "@" later in a path or query is left alone; the greedy match reaches the last
# "@" of the authority, which covers a password with an unescaped "@".
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)"
                           r"(?P<userinfo>[^/\s?#@]+(?:@[^/\s?#@]+)*)@")

_compiled: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)


def register(value: str) -> None:
    """Remember ``value`` as a secret for this process (empty values are ignored)."""
    if value:
        SECRET_VALUES.add(value)


def _variants(secret: str) -> set[str]:
    """The secret and the forms it takes once escaped into JSON or a URL."""
    out = {secret, json.dumps(secret, ensure_ascii=False)[1:-1], json.dumps(secret)[1:-1],
           quote(secret, safe=""), quote_plus(secret, safe="")}
    return {v for v in out if v}


def _pattern() -> re.Pattern[str] | None:
    """One alternation of every secret variant, longest first (recompiled when the set changes)."""
    global _compiled
    key = frozenset(SECRET_VALUES)
    if key != _compiled[0]:
        variants = {v for s in key for v in _variants(s)}
        ordered = sorted(variants, key=lambda v: (-len(v), v))
        _compiled = (key, re.compile("|".join(map(re.escape, ordered))) if ordered else None)
    return _compiled[1]


def redact(text: str, *, urls: bool = True) -> str:
    """``text`` with every known secret value (and its JSON- or percent-escaped form) replaced by
    ``***``, longest first, and, with ``urls``, the credentials of every ``scheme://user:pass@``
    URL replaced by ``***``. Non-strings are returned unchanged. Idempotent."""
    if not isinstance(text, str) or not text:
        return text
    pattern = _pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if urls and "://" in text:
        text = _URL_USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    return text


def redact_obj(obj: Any, *, urls: bool = True) -> Any:
    """A copy of ``obj`` with :func:`redact` applied to every string in it, recursively through
    dicts (keys and values), lists and tuples; bytes are redacted as UTF-8 text when they decode;
    other values (numbers, None, …) are returned as they are."""
    if isinstance(obj, str):
        return redact(obj, urls=urls)
    if isinstance(obj, dict):
        return {redact_obj(k, urls=urls): redact_obj(v, urls=urls) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_obj(v, urls=urls) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact_obj(v, urls=urls) for v in obj)
    if isinstance(obj, (bytes, bytearray)):
        try:
            text = bytes(obj).decode("utf-8")
        except UnicodeDecodeError:
            return obj
        out = redact(text, urls=urls)
        return obj if out == text else out.encode("utf-8")
    return obj

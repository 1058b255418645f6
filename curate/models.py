"""Heavy objects (models, tokenizers, hash tables) loaded once per worker process, keyed by parameters.

A worker serves many shards, and ``Stage.setup`` runs for each; a stage asks :func:`shared` for its
model instead of loading it, so a CLIP model, a fastText or KenLM model, or a shingle cache is loaded
once per process for each distinct set of parameters, whatever the number of shards or of stages
that use it. Keys should name everything that changes what is loaded (path, file size and mtime,
device, precision …); :func:`file_key` helps for files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
#: How many times each kind was loaded in this process (tests and the run log read it).
LOADS: dict[str, int] = {}


def shared(kind: str, key: tuple, load: Callable[[], T]) -> T:
    """The object ``load()`` returns for ``(kind, key)``, loaded at most once per process."""
    full = (kind, *key)
    with _LOCK:
        if full not in _CACHE:
            _CACHE[full] = load()
            LOADS[kind] = LOADS.get(kind, 0) + 1
        return _CACHE[full]


def file_key(path: str) -> tuple:
    """``(absolute path, size, mtime_ns)`` of a file or folder: a new file at the same path reloads."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(path)
    except OSError:
        return (path, None, None)
    return (path, st.st_size, st.st_mtime_ns)


def clear() -> None:
    """Forget every cached object (tests)."""
    with _LOCK:
        _CACHE.clear()
        LOADS.clear()

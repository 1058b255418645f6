"""Registries of sources, sinks and executors, selected in the manifest by ``kind``.

Each registered class has a pydantic ``Params`` model (frozen, unknown keys rejected) that the
manifest validates its section against. Third-party packages can add kinds through the entry-point
groups ``curate.sources``, ``curate.sinks`` and ``curate.executors``.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points

_KINDS: dict[str, dict[str, type]] = {"source": {}, "sink": {}, "executor": {}}
_MODULES = {"source": "curate.readers", "sink": "curate.sinks", "executor": "curate.executors"}
_GROUPS = {"source": "curate.sources", "sink": "curate.sinks", "executor": "curate.executors"}


def _register(what: str, kind: str):
    def wrap(cls: type) -> type:
        cls.kind = kind
        _KINDS[what][kind] = cls
        return cls

    return wrap


def register_source(kind: str):
    """Class decorator for a :class:`curate.readers.base.Reader` under ``source: {kind: ...}``."""
    return _register("source", kind)


def register_sink(kind: str):
    """Class decorator for a :class:`curate.sinks.base.Sink` under ``sink: {kind: ...}``."""
    return _register("sink", kind)


def register_executor(kind: str):
    """Class decorator for an executor under ``executor: {kind: ...}``."""
    return _register("executor", kind)


def kinds_of(what: str) -> dict[str, type]:
    """All registered classes of one kind of part (``source``, ``sink`` or ``executor``).

    The installed packages' entry points are scanned once per process and ``sys.path`` (reading every
    distribution's metadata costs ~0.1 s with a few hundred packages installed, and a run asks often).
    """
    importlib.import_module(_MODULES[what])
    path = tuple(sys.path)
    if _SCANNED.get(what) != path:
        for ep in entry_points(group=_GROUPS[what]):
            if ep.name not in _KINDS[what]:
                _KINDS[what][ep.name] = ep.load()
                _KINDS[what][ep.name].kind = ep.name
        _SCANNED[what] = path
    return _KINDS[what]


_SCANNED: dict[str, tuple[str, ...]] = {}  # part → the sys.path its entry points were scanned under

"""Registries of sources, sinks and executors, selected in the manifest by ``kind``.

Each registered class has a pydantic ``Params`` model (frozen, unknown keys rejected) that the
manifest validates its section against. Third-party packages can add kinds through the entry-point
groups ``curate.sources``, ``curate.sinks`` and ``curate.executors``.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import distributions

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
        for ep in installed_entry_points(_GROUPS[what]):
            if ep.name not in _KINDS[what]:
                _KINDS[what][ep.name] = ep.load()
                _KINDS[what][ep.name].kind = ep.name
        _SCANNED[what] = path
    return _KINDS[what]


def installed_entry_points(group: str, refresh: bool = False) -> list:
    """The installed entry points of one of curate's groups (``curate.sources`` … ``curate.stages``).

    Every distribution's metadata is read once per process and ``sys.path`` for all of curate's groups
    together: the scan costs the same for one group as for all (~0.1 s with hundreds of packages).
    ``refresh`` reads them again (a name not found may belong to a package installed since).
    """
    global _ENTRY_POINTS
    path = tuple(sys.path)
    if refresh or _ENTRY_POINTS is None or _ENTRY_POINTS[0] != path:
        found: dict[str, list] = {}
        seen: set[str] = set()
        for dist in distributions():  # the first of a name on sys.path wins, as in entry_points()
            name = getattr(dist, "_normalized_name", None) or (dist.metadata["Name"] or "").lower().replace("-", "_")
            if name in seen:
                continue
            seen.add(name)
            for ep in dist.entry_points:
                if ep.group.startswith("curate."):
                    found.setdefault(ep.group, []).append(ep)
        _ENTRY_POINTS = (path, found)
    return _ENTRY_POINTS[1].get(group, [])


_SCANNED: dict[str, tuple[str, ...]] = {}  # part → the sys.path its entry points were scanned under
_ENTRY_POINTS: tuple[tuple[str, ...], dict[str, list]] | None = None  # (sys.path, group → entry points)

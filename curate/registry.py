"""The stage registry: ``@register_stage("name")``, built-ins, and the ``curate.stages`` entry points.

Built-in stages live one per file in ``curate.stages`` (engine stages: tokenize, pack), ``filters``
and ``synthesizers``; importing those packages registers them. Third-party packages declare
``[project.entry-points."curate.stages"] name = "pkg.module:Class"`` and are loaded on first use.

Looking up one stage imports only the module that defines it: the built-in modules' sources are read
(not imported) for their ``@register_stage("…")`` lines, so a run pays the import of the stages it uses,
not of all of them (about a second per process). A name not found that way loads every built-in, as
listing the stages does.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import re
from functools import lru_cache
from pathlib import Path

from curate.errors import ConfigError
from curate.plugins import installed_entry_points
from curate.stage import Stage

_REGISTRY: dict[str, type[Stage]] = {}
_BUILTIN_PACKAGES = ("curate.stages", "filters", "synthesizers")
_loaded = False


def register_stage(name: str):
    """Class decorator registering a :class:`Stage` subclass under ``name``."""

    def wrap(cls: type[Stage]) -> type[Stage]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"stage name {name!r} already registered by {existing.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{mod.name}")


_REGISTER_LINE = re.compile(rb"""@register_stage\(\s*["']([^"']+)["']""")


@lru_cache(maxsize=1)
def _builtin_index() -> dict[str, str]:
    """Stage name → built-in module that registers it, read from the sources without importing them."""
    index: dict[str, str] = {}
    for pkg_name in _BUILTIN_PACKAGES:
        spec = importlib.util.find_spec(pkg_name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(folder).glob("*.py")):
                if path.name.startswith("_"):
                    continue
                for match in _REGISTER_LINE.finditer(path.read_bytes()):
                    index.setdefault(match.group(1).decode(), f"{pkg_name}.{path.stem}")
    return index


def _load_one(name: str) -> None:
    """Import the built-in module that defines ``name``, when its source says which one does."""
    module = _builtin_index().get(name)
    if module is not None:
        importlib.import_module(module)


def _entry_points(refresh: bool = False) -> dict[str, object]:
    return {ep.name: ep for ep in installed_entry_points("curate.stages", refresh)}


def stage_names() -> list[str]:
    """Every registered or installable stage name, sorted."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def get_stage(name: str) -> type[Stage]:
    """The stage class for ``name``; an unknown name raises ConfigError listing close matches."""
    if name not in _REGISTRY:
        _load_one(name)
    if name not in _REGISTRY:
        _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name not in eps:  # installed since the last scan (e.g. by pip in a running notebook)?
        eps = _entry_points(refresh=True)
    if name in eps:
        cls = eps[name].load()  # type: ignore[attr-defined]
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise ConfigError(f"entry point curate.stages:{name} is not a curate Stage subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    close = difflib.get_close_matches(name, stage_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"unknown stage {name!r}{hint} (`curate stages` lists them all)")

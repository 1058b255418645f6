"""The manifest: one YAML file that names a source, stages, sinks and an executor.

Loaded with ``yaml.safe_load`` semantics and validated in two phases: the envelope (top-level keys,
shape of each section), then each part against its registered ``Params`` (sources, stages, sinks,
executors). Every error names the manifest path, the YAML line and the field::

    manifests/x.yaml:12: stages[2] (select).threshold: Input should be a valid number

``${VAR}`` and ``${VAR:-default}`` are expanded in string values. Variables whose names look like
secrets (a ``TOKEN``, ``SECRET``, ``PASSWORD``, ``API_KEY`` … word: ``HF_TOKEN``, ``OPENAI_API_KEY``, not
``TOKENIZER``) are never written back: the resolved manifest keeps the ``${VAR}`` reference, and their
values are redacted from everything written (:mod:`curate.secrets`). :func:`Manifest.resolved_yaml`, the
form written to disk and printed, also masks credentials written literally in a URL
(``s3://user:pass@…``); :func:`Manifest.resolved`, the form workers rebuild the manifest from, keeps them.

Sink folders are checked here too: each ``path`` stays inside the run directory (see
:func:`curate.sinks.base.check_sink_path`), and no two sinks share a folder, nest one inside another,
or share a stats label (``sink:<last folder name>``), compared case-insensitively.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from curate.errors import ConfigError
from curate.secrets import SECRET_VALUES, redact_obj, register  # noqa: F401  (SECRET_VALUES: re-exported)

Loc = tuple[Any, ...]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY)(?:$|_)", re.I)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    seed: int = 0
    output: str | None = None
    source: dict[str, Any]
    stages: list[Any] = []
    sink: dict[str, Any] | list[dict[str, Any]]
    executor: dict[str, Any] = {"kind": "local"}
    tokenizer: dict[str, Any] | None = None
    card: dict[str, Any] | None = None


@dataclass(frozen=True)
class Part:
    """A validated ``kind``-selected section (a source, sink or executor)."""

    kind: str
    params: BaseModel
    loc: Loc


@dataclass(frozen=True)
class StageSpec:
    name: str
    label: str
    params: BaseModel
    loc: Loc


@dataclass
class Manifest:
    """A validated manifest. Build it with :func:`load` or :meth:`from_dict`."""

    path: str
    name: str
    seed: int
    output: str
    source: Part
    stages: list[StageSpec]
    sinks: list[Part]
    executor: Part
    description: str | None = None
    tokenizer: BaseModel | None = None
    card: BaseModel | None = None
    lines: dict[Loc, int] = field(default_factory=dict, repr=False)
    secrets: dict[Loc, str] = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: Any, path: str = "<manifest>", lines: dict[Loc, int] | None = None) -> Manifest:
        lines = lines or {}
        errors = _Errors(path, lines)
        if not isinstance(data, dict):
            raise errors.one((), "the manifest must be a mapping of top-level keys")
        data, secrets = _interpolate(data, (), errors)
        errors.raise_if_any()
        try:
            env = _Envelope.model_validate(data)
        except ValidationError as e:
            errors.pydantic(e, (), "", list(_Envelope.model_fields))
            errors.raise_if_any()
            raise  # pragma: no cover - raise_if_any always raises here
        _no_bool_numbers({k: v for k, v in data.items() if k == "seed"}, env, (), "", errors)
        source = _part(env.source, ("source",), "source", errors)
        sink_items = env.sink if isinstance(env.sink, list) else [env.sink]
        sink_prefix: Loc = ("sink",)
        sinks = [_part(s, sink_prefix + ((i,) if isinstance(env.sink, list) else ()), "sink", errors)
                 for i, s in enumerate(sink_items)]
        if not sink_items:
            errors.add(sink_prefix, "needs at least one sink (a mapping with a `kind`, or a list of them)")
        _check_sink_folders([s for s in sinks if s], errors)
        executor = _part(env.executor, ("executor",), "executor", errors)
        stages = _stages(env.stages, errors)
        tokenizer = _tokenizer(env.tokenizer, errors) if env.tokenizer is not None else None
        card = _card(env.card, errors) if env.card is not None else None
        errors.raise_if_any()
        return cls(path=path, name=env.name, seed=env.seed, output=env.output or f"runs/{env.name}",
                   source=source, stages=stages, sinks=[s for s in sinks if s], executor=executor,  # type: ignore[misc]
                   description=env.description, tokenizer=tokenizer, card=card, lines=lines, secrets=secrets)

    # ---------------------------------------------------------------- use
    def error(self, loc: Loc, message: str) -> ConfigError:
        """A ConfigError for ``loc`` (e.g. ``("source", "paths")``) with file, line and field."""
        return _Errors(self.path, self.lines).one(loc, message)

    def build_stages(self) -> list:
        """Fresh stage objects, in order (each worker calls this; nothing live is shipped)."""
        from curate.registry import get_stage

        return [get_stage(s.name)(s.params, s.label) for s in self.stages]

    def resolved(self, *, with_executor: bool = True) -> dict[str, Any]:
        """The manifest with every default filled in; secrets stay as ``${VAR}`` references."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["seed"] = self.seed
        out["output"] = self.output
        out["source"] = _dump_part(self.source)
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.model_dump(mode="json", by_alias=True)
        out["stages"] = [{s.name: s.params.model_dump(mode="json", by_alias=True)} for s in self.stages]
        sinks = [_dump_part(s) for s in self.sinks]
        out["sink"] = sinks[0] if len(sinks) == 1 else sinks
        if with_executor:
            out["executor"] = _dump_part(self.executor)
        if self.card is not None:
            out["card"] = self.card.model_dump(mode="json", exclude_none=True)
        return _restore_secrets(out, self.secrets)

    def resolved_yaml(self, *, with_executor: bool = True) -> str:
        """:meth:`resolved` as YAML, for the disk and the console: known secret values and URL
        credentials (``scheme://user:pass@``) are masked as ``***``."""
        return yaml.safe_dump(redact_obj(self.resolved(with_executor=with_executor)), sort_keys=False,
                              allow_unicode=True)


def load(path: str | os.PathLike, *, output: str | None = None) -> Manifest:
    """Read and validate the manifest at ``path`` (``output`` overrides its run directory)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: manifest not found")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the manifest is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start})") from None
    manifest = loads(text, str(path))
    if output:
        manifest.output = output
    return manifest


def loads(text: str, path: str = "<manifest>") -> Manifest:
    """Validate manifest YAML given as a string; ``path`` is used in messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    lines: dict[Loc, int] = {}
    if node is not None:
        duplicates: list[tuple[Loc, int, int]] = []
        _collect_lines(node, (), lines, duplicates)
        if duplicates:
            errors = _Errors(path, {})
            for loc, line, first in duplicates:
                errors.items.append(f"{path}:{line}: {_field_name(loc)}: duplicate key (first given on line {first})")
            errors.raise_if_any()
    return Manifest.from_dict(data, path, lines)


# ==================================================================== internals
class _Errors:
    """Collects errors with their locations and raises them together."""

    def __init__(self, path: str, lines: dict[Loc, int]):
        self.path, self.lines, self.items = path, lines, []

    def line(self, loc: Loc) -> int | None:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None

    def format(self, loc: Loc, message: str, label: str | None = None) -> str:
        line = self.line(loc)
        where = f"{self.path}:{line}" if line else self.path
        return f"{where}: {label or _field_name(loc)}: {message}" if loc else f"{where}: {message}"

    def add(self, loc: Loc, message: str, label: str | None = None) -> None:
        self.items.append(self.format(loc, message, label))

    def one(self, loc: Loc, message: str) -> ConfigError:
        return ConfigError(self.format(loc, message))

    def pydantic(self, e: ValidationError, prefix: Loc, label: str, fields: list[str]) -> None:
        for err in e.errors():
            loc = prefix + tuple(err["loc"])
            inner = tuple(err["loc"])
            name = (label + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in inner)
                    if label else _field_name(loc))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _suggest(str(inner[-1]), fields)
            self.add(loc, msg, name)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError("\n".join(self.items))


def _suggest(key: str, fields: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, fields, n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else (
        f" (known keys: {', '.join(fields)})" if fields else "")


def _field_name(loc: Loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _collect_lines(node: yaml.Node, loc: Loc, lines: dict[Loc, int],
                   duplicates: list[tuple[Loc, int, int]], seen: set[int] | None = None) -> None:
    """Record the line of every key and item; a key given twice in one mapping goes to ``duplicates``
    as (field, line, first line). Merge keys (``<<``) may be overridden, as YAML allows."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (lines and duplicates are the anchor's)
        return
    seen.add(id(node))
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            k = key.value
            line = key.start_mark.line + 1
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, k) in first:
                    duplicates.append((loc + (k,), line, first[(key.tag, k)]))
                first.setdefault((key.tag, k), line)
            lines[loc + (k,)] = line
            _collect_lines(value, loc + (k,), lines, duplicates, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, loc + (i,), lines, duplicates, seen)


def _interpolate(value: Any, loc: Loc, errors: _Errors) -> tuple[Any, dict[Loc, str]]:
    secrets: dict[Loc, str] = {}

    def walk(v: Any, at: Loc) -> Any:
        if isinstance(v, dict):
            return {k: walk(x, at + (k,)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, at + (i,)) for i, x in enumerate(v)]
        if not isinstance(v, str) or "${" not in v:
            return v

        if "${" in _VAR.sub("", v) or any("${" in (m.group(2) or "") for m in _VAR.finditer(v)):
            errors.add(at, f"{v!r}: a `${{` that does not start a ${{VAR}} or ${{VAR:-default}} reference "
                           "(names are letters, digits and _; references do not nest)")
            return v

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            got = os.environ.get(name, default)
            if got is None:
                errors.add(at, f"environment variable ${{{name}}} is not set (use ${{{name}:-default}})")
                return ""
            if _SECRET_NAME.search(name):
                secrets[at] = v
                register(got)
            return got

        return _VAR.sub(sub, v)

    return walk(value, loc), secrets


def _restore_secrets(data: dict[str, Any], secrets: dict[Loc, str]) -> dict[str, Any]:
    """Put each secret's ``${VAR}`` template back where its value landed, then redact any secret value
    left anywhere else (a value copied into another field), so none is ever written to disk."""
    for loc, template in secrets.items():
        parent = _lookup(data, loc[:-1])
        if isinstance(parent, dict) and loc[-1] in parent:
            parent[loc[-1]] = template
        elif isinstance(parent, list) and isinstance(loc[-1], int) and loc[-1] < len(parent):
            parent[loc[-1]] = template
    # URL credentials written literally stay: workers rebuild the manifest from this dict
    return redact_obj(data, urls=False)


def _lookup(data: Any, loc: Loc) -> Any:
    """The value at ``loc`` in nested dicts/lists, or None when the path does not exist there."""
    for p in loc:
        if isinstance(data, dict) and p in data:
            data = data[p]
        elif isinstance(data, list) and isinstance(p, int) and p < len(data):
            data = data[p]
        else:
            return None
    return data


def _part(section: dict[str, Any], loc: Loc, what: str, errors: _Errors) -> Part | None:
    from curate.plugins import kinds_of

    registry = kinds_of(what)
    kind = section.get("kind")
    if kind is None:
        errors.add(loc, f"needs a 'kind' (one of: {', '.join(sorted(registry))})")
        return None
    if kind not in registry:
        import difflib

        close = difflib.get_close_matches(str(kind), list(registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        errors.add(loc + ("kind",), f"unknown {what} kind {kind!r}{hint} (known: {', '.join(sorted(registry))})")
        return None
    params_cls = registry[kind].Params
    rest = {k: v for k, v in section.items() if k != "kind"}
    try:
        params = params_cls.model_validate(rest)
    except ValidationError as e:
        errors.pydantic(e, loc, f"{_field_name(loc)} ({kind})", list(params_cls.model_fields))
        return None
    if not _no_bool_numbers(rest, params, loc, f"{_field_name(loc)} ({kind})", errors):
        return None
    return Part(kind, params, loc)


def _no_bool_numbers(raw: Any, value: Any, loc: Loc, label: str, errors: _Errors, inner: Loc = ()) -> bool:
    """Refuse a boolean where a number is expected (pydantic would read ``yes``/``true`` as 1) and an
    integer that does not fit in 64 bits (numpy, Arrow and every file format would overflow on it later,
    far from the manifest): walk the raw mapping beside the validated model; True when there is none."""
    def name() -> str:
        return (label + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in inner)
                if label else _field_name(loc + inner))

    top = 2**64 if loc + inner == ("seed",) else 2**63  # the run's seed is only hashed: unsigned 64-bit too
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < top:
        shown = str(value) if len(str(value)) <= 30 else f"a {len(str(abs(value)))}-digit number"
        errors.add(loc + inner, f"{shown} does not fit in 64 bits (at most {top - 1:,})", name())
        return False
    if isinstance(raw, bool):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            errors.add(loc + inner, f"expected a number, got the boolean {str(raw).lower()} "
                                    "(YAML reads yes/no/on/off/true/false unquoted as booleans)", name())
            return False
        return True
    ok = True
    if isinstance(raw, dict) and isinstance(value, BaseModel):
        for name, f in type(value).model_fields.items():
            key = f.alias if f.alias in raw else name
            if key in raw:
                ok &= _no_bool_numbers(raw[key], getattr(value, name), loc, label, errors, inner + (key,))
    elif isinstance(raw, dict) and isinstance(value, dict):
        for key, item in raw.items():
            if key in value:
                ok &= _no_bool_numbers(item, value[key], loc, label, errors, inner + (key,))
    elif isinstance(raw, list) and isinstance(value, (list, tuple)) and len(raw) == len(value):
        for i, (item, got) in enumerate(zip(raw, value)):
            ok &= _no_bool_numbers(item, got, loc, label, errors, inner + (i,))
    return ok


def _sink_folder(part: Part) -> tuple[str, ...]:
    """The sink's folder inside the run directory as normalized parts (``path`` or its kind)."""
    path = getattr(part.params, "path", None) or part.kind
    return tuple(p for p in path.split("/") if p not in ("", "."))


def _check_sink_folders(sinks: list[Part], errors: _Errors) -> None:
    """Refuse two sinks that write the same folder, one inside the other, or with the same stats
    label (``sink:<last folder name>``). Names compare after NFC normalization and case folding, so
    ``Out`` and ``out`` clash (they are one folder on macOS and Windows)."""

    def key(parts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(unicodedata.normalize("NFC", p).casefold() for p in parts)

    seen: list[tuple[Part, tuple[str, ...]]] = []
    for part in sinks:
        folder = _sink_folder(part)
        if not folder:  # an invalid path, already reported by its validator
            continue
        mine = key(folder)
        where = part.loc + (("path",) if getattr(part.params, "path", None) else ())
        for other, theirs in seen:
            shown, other_shown = "/".join(folder), "/".join(_sink_folder(other))
            other_name = _field_name(other.loc)
            if mine == theirs:
                problem = f"writes to {shown!r}, as {other_name} does"
            elif mine[:len(theirs)] == theirs or theirs[:len(mine)] == mine:
                problem = f"{shown!r} and {other_name}'s {other_shown!r} are nested folders"
            elif mine[-1] == theirs[-1]:
                problem = (f"{shown!r} has the same last folder name as {other_name}'s {other_shown!r} "
                           f"(both would be counted as sink:{folder[-1]})")
            else:
                continue
            errors.add(where, problem + "; give one of them another `path`")
            break
        else:
            seen.append((part, mine))


def _tokenizer(section: dict[str, Any], errors: _Errors) -> BaseModel | None:
    from curate.tokenizer import TokenizerSpec

    try:
        spec = TokenizerSpec.model_validate(section)
    except ValidationError as e:
        errors.pydantic(e, ("tokenizer",), "tokenizer", list(TokenizerSpec.model_fields))
        return None
    return spec if _no_bool_numbers(section, spec, ("tokenizer",), "tokenizer", errors) else None


def _card(section: dict[str, Any], errors: _Errors) -> BaseModel | None:
    from curate.dataset_card import CardParams

    try:
        card = CardParams.model_validate(section)
    except ValidationError as e:
        errors.pydantic(e, ("card",), "card", list(CardParams.model_fields))
        return None
    return card if _no_bool_numbers(section, card, ("card",), "card", errors) else None


def _stages(items: list[Any], errors: _Errors) -> list[StageSpec]:
    from curate.registry import get_stage

    names = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            names.append((item, {}))
        elif isinstance(item, dict) and len(item) == 1:
            name, params = next(iter(item.items()))
            if params is not None and not isinstance(params, dict):
                errors.add(("stages", i, name), "stage parameters must be a mapping", f"stages[{i}] ({name})")
                params = {}
            names.append((str(name), params or {}))
        else:
            errors.add(("stages", i), "each stage is a one-key mapping like `- select: {min: ...}`")
            names.append((None, {}))
    counts: dict[str, int] = {}
    for name, _ in names:
        if name:
            counts[name] = counts.get(name, 0) + 1
    seen: dict[str, int] = {}
    specs = []
    for i, (name, params) in enumerate(names):
        if name is None:
            continue
        loc: Loc = ("stages", i, name)
        try:
            cls = get_stage(name)
        except ConfigError as e:
            errors.add(("stages", i), str(e), f"stages[{i}]")
            continue
        try:
            p = cls.Params.model_validate(params)
        except ValidationError as e:
            errors.pydantic(e, loc, f"stages[{i}] ({name})", list(cls.Params.model_fields))
            continue
        if not _no_bool_numbers(params, p, loc, f"stages[{i}] ({name})", errors):
            continue
        seen[name] = seen.get(name, 0) + 1
        label = name if counts[name] == 1 else f"{name}_{seen[name]}"
        specs.append(StageSpec(name, label, p, loc))
    return specs


def _dump_part(part: Part) -> dict[str, Any]:
    return {"kind": part.kind, **part.params.model_dump(mode="json", by_alias=True)}

"""The outputs of a finished run directory, for the tools that work on them afterwards.

``curate compact``, ``curate publish`` and ``curate report`` start from a run directory, not a manifest:
the run may have moved since it ran, and its inputs may be gone. :func:`finished_outputs` reads
``manifest.resolved.yaml`` and ``stats.json`` and returns one :class:`SinkOutput` per sink, each with its
validated parameters, its folder *inside the given run directory* (never the absolute path recorded at
run time) and its ``index.json``. A run that has not finished (no ``stats.json``, or a sink without
``index.json``) is refused with a :class:`~curate.errors.ConfigError` that says so.

Only the sink sections of the resolved manifest are validated; sources, stages and executors are not
rebuilt, so a missing plugin or input file does not stop these tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import ValidationError

from curate.errors import ConfigError


@dataclass(frozen=True)
class SinkOutput:
    """One finished sink: ``label`` (``sink:<folder>``), ``kind``, ``params``, ``directory``, ``index``."""

    label: str
    kind: str
    params: Any
    directory: Path
    index: dict[str, Any]

    @property
    def partitioned(self) -> bool:
        return bool(self.index.get("partitions"))

    @property
    def extension(self) -> str:
        """The data files' extension as the sink writes it (``parquet``, ``jsonl.zst``, ``tar`` …)."""
        from curate.plugins import kinds_of

        return kinds_of("sink")[self.kind](self.params, self.directory.parent).extension

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        """Index entries by partition folder (``""`` for an unpartitioned sink), names relative to the
        group's folder, in name order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for entry in self.index["shards"]:
            folder, _, name = entry["name"].rpartition("/")
            out.setdefault(folder, []).append({**entry, "name": name})
        return {k: sorted(v, key=lambda e: e["name"]) for k, v in sorted(out.items())}


def read_resolved(run_dir: Path) -> dict[str, Any]:
    """The run's resolved manifest as a dict (ConfigError when this is not a run directory)."""
    path = Path(run_dir) / "manifest.resolved.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a curate run directory (no manifest.resolved.yaml)")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "sink" not in data:
        raise ConfigError(f"{path}: not a resolved manifest (no sink section)")
    return data


def read_stats(run_dir: Path) -> dict[str, Any]:
    """The run's merged ``stats.json``; ConfigError when the run has not finished."""
    path = Path(run_dir) / "stats.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: the run has not finished (no stats.json); run `curate run` to the end first")
    return orjson.loads(path.read_bytes())


def finished_outputs(run_dir: str | Path) -> list[SinkOutput]:
    """Every sink of the finished run at ``run_dir``, in manifest order."""
    from curate.plugins import kinds_of

    root = Path(run_dir)
    resolved = read_resolved(root)
    read_stats(root)
    sinks = resolved["sink"] if isinstance(resolved["sink"], list) else [resolved["sink"]]
    registry = kinds_of("sink")
    out = []
    for i, spec in enumerate(sinks):
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in registry:
            raise ConfigError(f"{root}/manifest.resolved.yaml: sink[{i}] has unknown kind {kind!r}")
        try:
            params = registry[kind].Params.model_validate(spec)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            raise ConfigError(f"{root}/manifest.resolved.yaml: sink[{i}] ({kind}).{where}: {first.get('msg')}") from None
        directory = root / (params.path or kind)
        index_path = directory / "index.json"
        if not index_path.is_file():
            raise ConfigError(f"{directory}: no index.json: this output is not complete "
                              "(run `curate run` on the same manifest to finish it)")
        index = orjson.loads(index_path.read_bytes())
        out.append(SinkOutput(f"sink:{directory.name}", kind, params, directory, index))
    return out


def stage_order(stats: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """The stage labels of ``stats["stages"]`` in pipeline order: ``read``, the manifest's stages (labels
    as the manifest gives them: ``name``, or ``name_<k>`` for a name used more than once), the sinks in
    manifest order, then anything else as it comes (``stats.json`` is written with sorted keys)."""
    names = [next(iter(item)) for item in resolved.get("stages", []) if isinstance(item, dict) and item]
    counts = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    labels = ["read"]
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        labels.append(n if counts[n] == 1 else f"{n}_{seen[n]}")
    sinks = resolved.get("sink", [])
    for spec in sinks if isinstance(sinks, list) else [sinks]:
        path = (spec.get("path") or spec.get("kind") or "") if isinstance(spec, dict) else ""
        labels.append(f"sink:{path.rstrip('/').rsplit('/', 1)[-1]}")
    present = list(stats.get("stages", {}))
    return [x for x in labels if x in present] + [x for x in present if x not in labels]

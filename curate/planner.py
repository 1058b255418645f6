"""The planner: input shards, phases cut at global stages, column flow, and the run fingerprint.

A *phase* is a run of stages that can process each shard on its own. A global stage (one that must
see every shard first: top-fraction selection, dedup clustering, grouping) starts a new phase; the
phase before it writes intermediate shards and lets the global stage ``observe`` them, then the
driver ``combine``s what it saw before the next phase starts.
"""

from __future__ import annotations

import importlib.util

import hashlib
import sys
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any

from curate.errors import ConfigError
from curate.manifest import Manifest
from curate.plugins import kinds_of
from curate.readers.base import Reader, Shard
from curate.rundir import RunDir
from curate.schema import SCHEMAS

#: Packages whose versions enter the fingerprint (their behaviour shapes the output bytes).
FINGERPRINT_PACKAGES = ("curate-longctx", "pyarrow", "polars", "orjson", "numpy", "tokenizers", "webdataset")


@dataclass(frozen=True)
class Phase:
    index: int
    start: int  # first stage index (inclusive)
    stop: int  # last stage index (exclusive)
    last: bool

    @property
    def global_stage(self) -> int | None:
        """Index of the global stage this phase starts with (None for the first phase)."""
        return self.start if self.index > 0 else None


@dataclass
class Plan:
    manifest: Manifest
    shards: list[Shard]

    @classmethod
    def build(cls, manifest: Manifest) -> Plan:
        """List the input shards and check the column flow; ConfigError on any problem."""
        reader = make_reader(manifest)
        try:
            shards = reader.shards()
        except ConfigError as e:
            raise manifest.error(("source", "paths"), str(e)) from None
        plan = cls(manifest, shards)
        plan.column_flow()  # raises on a stage whose required columns are missing
        for spec, stage in zip(manifest.stages, plan.stages):
            missing = [(m, extra) for m, extra in stage.requirements().items() if importlib.util.find_spec(m) is None]
            if missing:
                raise manifest.error(spec.loc, "needs " + ", ".join(
                    f"the module {m!r} (pip install 'curate-longctx[{extra}]')" for m, extra in missing))
            if stage.needs_tokenizer and manifest.tokenizer is None:
                raise manifest.error(spec.loc, "needs a tokenizer: add a top-level `tokenizer:` section "
                                     "(`path:` to a tokenizer folder, or `train: {}` to train one on the source)")
        seen: dict[str, int] = {}
        for i, sink in enumerate(plan.sinks):
            if str(sink.directory) in seen:
                raise manifest.error(manifest.sinks[i].loc, f"writes to {sink.directory}, as sink "
                                     f"{seen[str(sink.directory)]} does; give one of them another `path`")
            seen[str(sink.directory)] = i
        return plan

    # ------------------------------------------------------------------ structure
    @cached_property
    def stages(self) -> list:
        return self.manifest.build_stages()

    @cached_property
    def phases(self) -> list[Phase]:
        # A global stage at position 0 gives an empty first phase: read, then observe.
        starts = [0] + [i for i, s in enumerate(self.stages) if s.is_global]
        stops = starts[1:] + [len(self.stages)]
        return [Phase(i, a, b, i == len(starts) - 1) for i, (a, b) in enumerate(zip(starts, stops))]

    @cached_property
    def reader(self) -> Reader:
        return make_reader(self.manifest)

    @cached_property
    def sinks(self) -> list:
        registry = kinds_of("sink")
        return [registry[s.kind](s.params, self.manifest.output) for s in self.manifest.sinks]

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.manifest.output)

    def column_flow(self) -> list[tuple[str, list[str]]]:
        """``(label, columns after it)`` from the source through every stage."""
        kind = self.reader.output_kind()
        columns = list(SCHEMAS[kind].names)
        flow = [(f"source ({self.manifest.source.kind})", columns)]
        for spec, stage in zip(self.manifest.stages, self.stages):
            missing = [c for c in stage.requires if c not in columns]
            if missing:
                raise self.manifest.error(spec.loc, f"needs column(s) {missing}, but only {columns} reach it")
            columns = stage.columns_out(columns)
            flow.append((stage.label, columns))
        return flow

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """Digests of what decides the output bytes: manifest (less executor and output), packages,
        and the input shards' content keys."""
        resolved = self.manifest.resolved(with_executor=False)
        resolved.pop("output", None)
        import yaml

        manifest_digest = _sha(yaml.safe_dump(resolved, sort_keys=True))
        packages = {p: _version(p) for p in FINGERPRINT_PACKAGES}
        packages["python"] = ".".join(map(str, sys.version_info[:2]))
        inputs = _sha("\n".join(f"{s.name} {s.key}" for s in self.shards))
        tok = self.manifest.tokenizer
        if tok is not None and tok.path:
            from curate.tokenizer import file_digest

            inputs = _sha(f"{inputs}\ntokenizer {file_digest(tok.path) or tok.path}")
        digest = _sha(f"{manifest_digest}\n{sorted(packages.items())}\n{inputs}")
        return {"digest": digest, "manifest": manifest_digest, "packages": packages, "inputs": inputs}

    def special_tokens(self) -> list[str]:
        """Every special token the stages insert, in pipeline order."""
        return list(dict.fromkeys(t for s in self.stages for t in s.special_tokens()))

    def to_dict(self) -> dict[str, Any]:
        """What a worker needs to rebuild the plan: the resolved manifest and the shard list."""
        return {"manifest": self.manifest.resolved(), "path": self.manifest.path,
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(Manifest.from_dict(d["manifest"], d["path"]), [Shard.from_dict(s) for s in d["shards"]])


def make_reader(manifest: Manifest) -> Reader:
    return kinds_of("source")[manifest.source.kind](manifest.source.params)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None

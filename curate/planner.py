"""The planner: input shards, phases cut at global stages, column flow, and the run fingerprint.

A *phase* is a run of stages that can process each shard on its own. A global stage (one that must
see every shard first: top-fraction selection, dedup clustering, grouping) starts a new phase; the
phase before it writes intermediate shards and lets the global stage ``observe`` them, then the
driver ``combine``s what it saw before the next phase starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any

from curate import checks
from curate.errors import ConfigError
from curate.manifest import Manifest
from curate.plugins import kinds_of
from curate.readers.base import Reader, Shard
from curate.rundir import RunDir

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
        """List the input shards and check everything that can be checked before any work; ConfigError
        naming the manifest line on any problem. Creates nothing on disk (no run directory).

        Checked, in order: the input listing; the column flow (each stage's required columns, and every
        column parameter — ``select``'s ``where``/``top`` columns, ``text_column``s, a sink's
        ``partition_by`` — against the columns and ``scores.<label>.<metric>`` paths that reach it, see
        :mod:`curate.checks`); the optional modules each stage imports; the tokenizer a stage needs;
        every model a stage loads (:meth:`~curate.stage.Stage.model_refs`: an existing local path, or a
        Hub name the Hub can serve or the local cache holds); the tokenizer itself (``tokenizer: {path}``
        loaded once, with what the stages need of it); and that no two sinks share a folder.
        """
        reader = make_reader(manifest)
        try:
            shards = reader.shards()
        except ConfigError as e:
            raise manifest.error(("source", "paths"), str(e)) from None
        except Exception as e:  # noqa: BLE001 - any reader's listing failure is a problem with the source
            from curate.secrets import redact

            raise manifest.error(("source",), f"cannot list the input: {type(e).__name__}: {redact(str(e))}") from None
        plan = cls(manifest, shards)
        plan.column_flow()  # raises on a missing required column or a column parameter naming nothing
        for spec, stage in zip(manifest.stages, plan.stages):
            missing = [(m, extra) for m, extra in stage.requirements().items() if importlib.util.find_spec(m) is None]
            if missing:
                raise manifest.error(spec.loc, "needs " + ", ".join(
                    f"the module {m!r} (pip install 'curate-longctx[{extra}]')" for m, extra in missing))
            if stage.needs_tokenizer and manifest.tokenizer is None:
                raise manifest.error(spec.loc, "needs a tokenizer: add a top-level `tokenizer:` section "
                                     "(`path:` to a tokenizer folder, or `train: {}` to train one on the source)")
        plan.check_models()
        checks.check_tokenizer(manifest, plan.stages, plan.special_tokens())
        seen: dict[str, int] = {}
        for i, sink in enumerate(plan.sinks):
            if str(sink.directory) in seen:
                raise manifest.error(manifest.sinks[i].loc, f"writes to {sink.directory}, as sink "
                                     f"{seen[str(sink.directory)]} does; give one of them another `path`")
            seen[str(sink.directory)] = i
        return plan

    def check_models(self) -> None:
        """Raise one ConfigError listing every model reference (:meth:`~curate.stage.Stage.model_refs`)
        that is neither a local path nor loadable (see :func:`curate.checks.check_model_ref`), each with
        its manifest line and parameter."""
        problems = []
        for spec, stage in zip(self.manifest.stages, self.stages):
            try:
                refs = stage.model_refs()
            except ConfigError as e:
                problems.append(str(self.manifest.error(spec.loc, str(e))))
                continue
            for param, ref in refs.items():
                problem = checks.check_model_ref(ref, "model file or folder")
                if problem:
                    problems.append(str(self.manifest.error(spec.loc + (param,), problem)))
        if problems:
            raise ConfigError("\n".join(problems))

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
        """``(label, columns after it)`` from the source through every stage (see :meth:`reaches`)."""
        return [(label, reach.columns) for label, reach in self.reaches]

    @cached_property
    def reaches(self) -> list[tuple[str, checks.Reach]]:
        """``(label, what reaches the point after it)`` from the source through every stage.

        Raises one ConfigError listing, each with its manifest line, every stage whose required columns
        do not reach it and every column parameter of a stage (or sink ``partition_by``) that names a
        column, score label or metric that does not reach it (with a close match when there is one).
        """
        kind = self.reader.output_kind()
        reach = checks.source_reach(self.manifest, kind, self.shards)
        flow = [(f"source ({self.manifest.source.kind})", reach)]
        where = {s.label: f"stages[{i}] ({s.name})" for i, s in enumerate(self.manifest.stages)}
        problems: list[str] = []
        for i, (spec, stage) in enumerate(zip(self.manifest.stages, self.stages)):
            columns = reach.columns
            missing = [c for c in stage.requires if c not in columns]
            if missing:
                problems.append(str(self.manifest.error(
                    spec.loc, f"needs column(s) {missing}, but only {columns} reach it")))
            later = {s.label: where[s.label] for s in self.manifest.stages[i + 1:]}
            for loc, value, mode in checks.column_params(spec.name, spec.params):
                problem = checks.check_column(value, mode, reach, later)
                if problem:
                    problems.append(str(self.manifest.error(spec.loc + loc, problem)))
            reach = reach.after(stage, stage.columns_out(columns))
            flow.append((stage.label, reach))
        for sink in self.manifest.sinks:
            column = getattr(sink.params, "partition_by", None)
            problem = column and checks.check_column(column, "name", reach)
            if problem:
                problems.append(str(self.manifest.error(sink.loc + ("partition_by",), problem)))
        if problems:
            raise ConfigError("\n".join(problems))
        return flow

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """Digests of what decides the output bytes: manifest (less executor and output), packages,
        and the input shards' content keys."""
        resolved = self.manifest.resolved(with_executor=False)
        resolved.pop("output", None)
        resolved.pop("card", None)  # the dataset card's metadata does not shape a byte of the output
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

"""The Hub dataset repository layout of a finished run: configs and their ``data/<config>/`` folders.

Each sink becomes one config named after its folder (``parquet``, ``webdataset``, ``out``); a sink
written with ``partition_by`` (one folder per length bucket, language …) gives one config per partition
(``parquet-bucket_8``) plus one for the whole sink whose ``data_files`` name every partition's folder.
Config names keep ``[A-Za-z0-9._-]``; any other character becomes ``_`` and the name then ends with
``-`` and 8 hex digits of the original's sha256, so two different folders never share a config.

Data files are named the way the Hub's own converters name them, ``train-00000-of-00003.parquet`` (more
digits past 99,999 files), in the source's file order, and each config's ``data_files`` matches exactly
that build's names (``train-*-of-00003.parquet``), so files an earlier publish left on the Hub are never
read with them. They are **hard links** to the run's files (a copy that keeps the modification
time where linking is impossible): building the folder again changes nothing on disk, so a resumed
upload finds every file it already sent unchanged. When ``curate compact`` has compacted a sink (a
complete ``RUN/compacted/<sink>/`` made from the current output), its files are used instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from curate.run_outputs import SinkOutput

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: The builder ``datasets`` picks for each sink kind, and whether its files carry an exact Arrow schema.
BUILDERS = {"parquet": "parquet", "arrow": "arrow", "jsonl": "json", "webdataset": "webdataset"}


@dataclass
class HubConfig:
    """One config of the repository: its name, the files it holds (``sources`` → ``data/<name>/…``)
    and, for a whole partitioned sink, the partition configs it spans (``spans``)."""

    name: str
    output: SinkOutput
    group: str | None
    sources: list[Path] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    spans: list[HubConfig] = field(default_factory=list)
    compacted: bool = False

    @property
    def extension(self) -> str:
        return self.output.extension

    def data_files(self) -> list[dict[str, str]]:
        """The ``data_files`` entry of this config in the card's ``configs``."""
        parts = self.spans or [self]
        # exactly this build's files: a file left on the Hub by an earlier publish (another file count)
        # never matches, so a config cannot load old rows twice
        paths = [f"data/{c.name}/train-*-of-{_width(len(c.sources)) % len(c.sources)}.{self.extension}"
                 for c in parts]
        return [{"split": "train", "path": paths[0] if len(paths) == 1 else paths}]  # type: ignore[dict-item]

    def file_names(self) -> list[str]:
        n = len(self.sources)
        w = _width(n)
        return [f"train-{w % i}-of-{w % n}.{self.extension}" for i in range(n)]


def _width(n: int) -> str:
    """The %-format of file numbers: 5 digits, more when needed, so name order is file order."""
    return f"%0{max(5, len(str(n)))}d"


def config_name(text: str) -> str:
    """``text`` as a config name: safe characters kept, others ``_`` plus a hash suffix (see module)."""
    safe = _UNSAFE.sub("_", text).strip("._") or "data"
    if safe != text:
        safe = f"{safe[:80]}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return safe


def source_of(run_dir: Path, output: SinkOutput) -> tuple[SinkOutput, bool]:
    """``output``, or its compacted form when ``curate compact`` finished one from this very output."""
    from curate.compact import STATE, check_sources, compacted_directory
    from curate.errors import ConfigError

    dest = compacted_directory(run_dir, output)
    try:
        state = orjson.loads((dest / STATE).read_bytes())
        index = orjson.loads((dest / "index.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return output, False
    digest = hashlib.sha256((output.directory / "index.json").read_bytes()).hexdigest()
    if not state.get("complete") or state.get("settings", {}).get("source_index_sha256") != digest:
        return output, False
    compacted = SinkOutput(output.label, output.kind, output.params, dest, index)
    try:
        check_sources(compacted, compacted.groups())
    except ConfigError:  # a compacted file gone or changed: publish the run's own files
        return output, False
    return compacted, True


def plan_configs(run_dir: Path, outputs: list[SinkOutput], use_compacted: bool = True) -> list[HubConfig]:
    """The repository's configs, the first sink's first (the default); ConfigError when a file the
    index lists is missing or not the size it records."""
    from curate.compact import check_sources

    configs: list[HubConfig] = []
    taken: set[str] = set()
    for original in outputs:
        output, compacted = source_of(run_dir, original) if use_compacted else (original, False)
        base = _unique(config_name(original.directory.name), taken)
        groups = output.groups()
        check_sources(output, groups)  # every file there, with the size index.json records
        if not output.partitioned:
            entries = groups.get("", [])
            configs.append(HubConfig(base, output, None, [output.directory / e["name"] for e in entries],
                                     sum(e["samples"] for e in entries), sum(e["bytes"] for e in entries),
                                     compacted=compacted))
            continue
        parts = []
        for group, entries in groups.items():
            name = _unique(config_name(f"{original.directory.name}-{group}"), taken)
            parts.append(HubConfig(name, output, group, [output.directory / group / e["name"] for e in entries],
                                   sum(e["samples"] for e in entries), sum(e["bytes"] for e in entries),
                                   compacted=compacted))
        whole = HubConfig(base, output, None, [], sum(p.rows for p in parts), sum(p.bytes for p in parts),
                          spans=parts, compacted=compacted)
        configs += [whole, *parts]
    return configs


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate.casefold() in taken:  # a Hub folder name is also a path on case-insensitive disks
        candidate, i = f"{name}-{i}", i + 1
    taken.add(candidate.casefold())
    return candidate


def link_data(folder: Path, configs: list[HubConfig]) -> list[Path]:
    """Fill ``folder/data/<config>/`` with links to each config's files; remove any other file under
    ``data/`` (left by an earlier layout). Returns the paths written, relative to ``folder``."""
    data = folder / "data"
    wanted: dict[Path, Path] = {}
    for c in configs:
        for src, name in zip(c.sources, c.file_names()):
            wanted[data / c.name / name] = src
    for dst, src in wanted.items():
        _link(src, dst)
    if data.is_dir():
        for p in sorted(data.rglob("*"), reverse=True):
            if p.is_file() and p not in wanted:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    return sorted(p.relative_to(folder) for p in wanted)


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        a, b = src.stat(), dst.stat()
        if (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) or (a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns
                                                            and _sha(src) == _sha(dst)):
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a copy with the same mtime
        tmp = dst.with_name(".tmp-" + dst.name)
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_info(config: HubConfig) -> dict[str, Any] | None:
    """The card's ``dataset_info`` entry for a config whose files carry an exact Arrow schema (Parquet,
    Arrow IPC): features as ``datasets`` reads them, and the split's size; None for other formats."""
    import datasets

    if config.output.kind not in ("parquet", "arrow"):
        return None
    first = (config.spans[0] if config.spans else config).sources
    if not first:
        return None
    schema = _schema(config.output.kind, first[0])
    info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema),
                                splits=datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=config.rows)}),
                                download_size=config.bytes)
    out = info._to_yaml_dict()
    return {"config_name": config.name, **out}


def _schema(kind: str, path: Path):
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    with pa.memory_map(str(path), "r") as src:
        return pa.ipc.open_file(src).schema

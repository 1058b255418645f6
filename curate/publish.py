"""``curate publish RUN_DIR --repo org/name``: a finished run as a Hugging Face Hub dataset repository.

The folder is built first, always in the same place (``RUN/publish/<org>__<name>/``, or ``--folder``):

```
README.md            the dataset card (curate.dataset_card): YAML configs, features, sizes, tags; provenance
                     and stats tables; the plots
data/<config>/       train-00000-of-0000N.<ext>: hard links to the run's files (curate.hub_layout)
assets/*.png         the report's plots, shown in the card (when matplotlib is installed)
report.html          the self-contained run report
```

A repository holds one file format (``datasets`` reads a repository with one builder, inferred from
its default config's files): the sink chosen with ``--sink``, else the first Parquet sink, plus every
other sink of that format. Each sink is one config, or with ``partition_by`` one config per partition
plus one for the whole sink.

Before anything is uploaded, each config's row count is checked against ``stats.json`` (a sink's
``samples``; a partitioned sink's configs add up to it). ``--dry-run`` stops there. Otherwise the folder
is uploaded by :mod:`curate.hub_upload` (``huggingface_hub``'s commit API, in batches, data first and the
card last): the token comes from ``HF_TOKEN`` or the saved login, and a rerun after an interruption
skips every file the Hub already holds with the same bytes. Rebuilding the folder rewrites a file only
when its content changed (data files are links), so the uploader's cache of hashes stays valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from curate.errors import ConfigError
from curate.run_outputs import finished_outputs, read_resolved, read_stats, stage_order
from curate.rundir import AtomicFile


@dataclass
class PublishResult:
    """What :func:`publish` built (and uploaded)."""

    folder: Path
    repo_id: str
    configs: dict[str, int]  # config → rows
    files: list[Path]
    plots: list[str] = field(default_factory=list)
    uploaded: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is ``namespace/name`` as the Hub allows, else ConfigError (checked before
    anything is built, with the uploader's own rules)."""
    from curate.hub_upload import check_repo_id as check

    check(repo_id)
    return repo_id


def default_folder(run_dir: Path, repo_id: str) -> Path:
    return Path(run_dir) / "publish" / repo_id.replace("/", "__")


def choose_outputs(outputs: list, sink: str | None) -> tuple[list, list]:
    """The sinks one repository holds, and those left out. ``datasets`` reads a repository with one
    builder, inferred from its default config's files, so a repository holds one file format: the
    sink named by ``sink`` (folder name or kind), else the first Parquet sink, else the first sink, plus
    every other sink of that same format."""
    if sink is not None:
        named = [o for o in outputs if sink in (o.directory.name, o.label, o.kind)]
        if not named:
            raise ConfigError(f"--sink {sink!r}: no such sink (sinks: {', '.join(o.directory.name for o in outputs)})")
        first = named[0]
    else:
        first = next((o for o in outputs if o.kind == "parquet"), outputs[0])
    chosen = [first] + [o for o in outputs if o is not first and o.kind == first.kind]
    return chosen, [o for o in outputs if o.kind != first.kind]


def build(run_dir: str | Path, repo_id: str, *, folder: str | Path | None = None, use_compacted: bool = True,
          with_report: bool = True, sink: str | None = None,
          notice: Callable[[str], None] | None = None) -> PublishResult:
    """Build the repository folder for ``repo_id`` (see the module docstring); upload nothing."""
    from curate.dataset_card import CardParams, card_metadata, card_text, teachers
    from curate.hub_layout import dataset_info, link_data, plan_configs

    notice = notice or (lambda m: None)
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    outputs, left_out = choose_outputs(finished_outputs(run_dir), sink)
    stats = read_stats(run_dir)
    resolved = read_resolved(run_dir)
    target = Path(folder) if folder is not None else default_folder(run_dir, repo_id)
    target.mkdir(parents=True, exist_ok=True)
    configs = plan_configs(run_dir, outputs, use_compacted)
    _check_rows(configs, stats)
    files = link_data(target, configs)
    profiles = _profiles(configs, notice)
    plots: dict[str, str] = {}
    notes = [f"{o.label} ({o.kind}) is not in this repository: one repository holds one format; publish it "
             f"to another with --sink {o.directory.name}" for o in left_out]
    if with_report:
        plots = _report(run_dir, target, notice, notes)
    infos = {}
    for c in configs:
        info = dataset_info(c)
        if info is not None:
            infos[c.name] = info
    card = CardParams.model_validate(resolved.get("card") or {})
    if card.license is None:
        notes.append("the card has no license: add `card: {license: …}` to the manifest")
    has_images = any("images" in (o.index.get("columns") or []) for o in outputs)
    config_entries = [{"config_name": c.name, "data_files": c.data_files(), **({"default": True} if i == 0 else {})}
                      for i, c in enumerate(configs)]
    default_rows = configs[0].rows if configs else 0
    data = card_metadata(card, config_entries, infos, default_rows, has_images, resolved.get("name", "dataset"))
    fingerprint = _json(run_dir / "fingerprint")
    text = card_text(data, name=card.pretty_name or resolved.get("name", "dataset"),
                     summary=card.description or resolved.get("description"),
                     resolved_yaml=(run_dir / "manifest.resolved.yaml").read_text(encoding="utf-8"),
                     fingerprint=fingerprint, stats=stats, configs=config_entries,
                     config_rows={c.name: c.rows for c in configs},
                     profiles={c.name: profiles[c.name] for c in configs if c.name in profiles},
                     teacher_list=teachers(resolved), seed=resolved.get("seed"), plots=plots,
                     stage_order=stage_order(stats, resolved))
    write_if_changed(target / "README.md", text.encode("utf-8"))
    return PublishResult(target, repo_id, {c.name: c.rows for c in configs}, files, list(plots), notes=notes)


def publish(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            dry_run: bool = False, folder: str | Path | None = None, use_compacted: bool = True,
            with_report: bool = True, sink: str | None = None,
            notice: Callable[[str], None] | None = None) -> PublishResult:
    """:func:`build` the folder, then (unless ``dry_run``) upload it to the Hub dataset ``repo_id``."""
    result = build(run_dir, repo_id, folder=folder, use_compacted=use_compacted, with_report=with_report,
                   sink=sink, notice=notice)
    if not dry_run:
        from curate.hub_upload import upload_dataset_folder

        result.uploaded = upload_dataset_folder(result.folder, repo_id, private=private, revision=revision,
                                                log=notice)
    return result


def _check_rows(configs: list, stats: dict[str, Any]) -> None:
    """Each sink's configs hold exactly the rows ``stats.json`` counted for it."""
    outputs = stats.get("outputs", {})
    for c in configs:
        if c.group is not None:
            continue  # counted through the whole sink's config
        expected = outputs.get(c.output.label, {}).get("samples")
        if expected is not None and expected != c.rows:
            raise ConfigError(f"{c.output.directory}: holds {c.rows:,} rows, stats.json says {expected:,}; "
                              "the output does not match the run (rerun `curate run`, or `curate compact` again)")


def _profiles(configs: list, notice: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    try:
        from curate.output_profile import profile_output
    except ImportError:  # pragma: no cover - shipped with curate
        return {}
    out = {}
    for c in configs:
        if c.group is None:
            try:
                out[c.name] = profile_output(c.output.directory)
            except Exception as e:  # noqa: BLE001 - the card is still useful without the length tables
                notice(f"could not profile {c.output.directory}: {type(e).__name__}: {e}")
    return out


def _report(run_dir: Path, target: Path, notice: Callable[[str], None], notes: list[str]) -> dict[str, str]:
    """Write ``report.html`` and ``assets/*.png``; the plots' titles → paths for the card."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("no plots in the card: matplotlib is not installed (pip install 'curate-longctx[publish]')")
        return {}
    from curate.report import write_report

    result = write_report(run_dir, html_path=target / "report.html", png_dir=target / "assets")
    return {_plot_title(name): Path(p).relative_to(target).as_posix()
            for name, p in sorted(result.get("pngs", {}).items())}


def _plot_title(name: str) -> str:
    """``scores-heuristics-n_words`` → ``scores: heuristics / n_words`` (the report's PNG names)."""
    kind, _, rest = name.partition("-")
    kind = kind.replace("_", " ")
    return f"{kind}: {rest.replace('-', ' / ')}" if rest else kind


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless it already holds exactly that (keeps the mtime)."""
    if path.is_file() and path.read_bytes() == data:
        return False
    f = AtomicFile(path)
    f.write(data)
    f.commit()
    return True


def _json(path: Path) -> dict[str, Any]:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


__all__ = ["PublishResult", "build", "check_repo_id", "default_folder", "publish", "write_if_changed"]

"""The dataset card (``README.md``) of a published run: Hub metadata in YAML, then what made the data.

The YAML header is built with ``huggingface_hub``'s :class:`~huggingface_hub.DatasetCardData`: the
``configs`` (one per output kind, partition or length bucket, each with its ``data_files``; the first
is the default), ``dataset_info`` (features, split sizes) for the configs whose files carry an exact
Arrow schema (Parquet, Arrow), ``size_categories`` from the default config's row count, and
``license``, ``language``, ``task_categories``, ``tags`` and ``pretty_name`` from the manifest's ``card``
section. The body carries the resolved manifest (secrets already masked on disk), the fingerprint and
package versions, the teacher models with their prompt-template hashes, the seed, and the stats tables:
rows and tokens per stage, drops by reason, token lengths per config, images per sample and the
evidence-depth distribution where the output has them, with the report's plots when they were made.
Everything in the body that comes from the run is escaped for Markdown tables, so an id or a drop
reason cannot change the card's structure.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The Hub's size categories, by upper bound on the number of rows.
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"),
                   (1_000_000_000_000, "100B<n<1T")]


class CardParams(BaseModel):
    """The manifest's ``card`` section: metadata for the dataset card ``curate publish`` writes. It does
    not change the output, so it is not part of the run's fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pretty_name: str | None = Field(None, description="the dataset's display name on the Hub")
    license: str | None = Field(None, description="a Hub license id (apache-2.0, cc-by-4.0, other …)")
    language: list[str] = Field(default_factory=list, description="ISO 639-1 codes of the text (en, de …)")
    task_categories: list[str] = Field(default_factory=list, description="Hub task categories "
                                       "(default: text-generation, or image-text-to-text with images)")
    tags: list[str] = Field(default_factory=list, description="extra Hub tags (curate and long-context are added)")
    description: str | None = Field(None, description="a paragraph for the card's summary (default: the "
                                    "manifest's description)")

    @field_validator("language", "task_categories", "tags", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """``language: en`` means ``[en]``."""
        return [value] if isinstance(value, str) else value


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` value for ``rows`` rows."""
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def cell(value: Any) -> str:
    """``value`` as a Markdown table cell: pipes, backslashes, HTML and line breaks made inert."""
    text = str(value)
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("`", "\\`"), ("*", "\\*"),
                 ("_", "\\_"), ("[", "\\["), ("]", "\\]")):
        text = text.replace(a, b)
    text = " ".join(text.split())
    # a block marker at the start (heading, quote, list item, rule) would turn the text into structure
    if text[:1] in "#>+-=":
        text = "\\" + text
    head, dot, _ = text.partition(".") if "." in text[:10] else text.partition(")")
    if dot and head.isdigit():
        text = f"{head}\\{text[len(head):]}"
    return text


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fence(text: str, lang: str = "") -> str:
    """A fenced code block that ``text`` cannot close (the fence is longer than any backtick run in it)."""
    longest = max((len(run) for run in text.split("\n") for run in _backtick_runs(run)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _backtick_runs(line: str) -> list[str]:
    runs, current = [], ""
    for ch in line:
        if ch == "`":
            current += "`"
        elif current:
            runs.append(current)
            current = ""
    return runs + ([current] if current else [])


def teachers(resolved: dict[str, Any]) -> list[dict[str, Any]]:
    """The teacher models of a resolved manifest's stages, each with its prompt-template hash (the hash
    every cached answer and lineage record carries); ``template_sha`` is None when a template file named
    in the manifest can no longer be read."""
    from curate.registry import get_stage

    out = []
    for item in resolved.get("stages", []):
        (name, params), = item.items()
        spec = (params or {}).get("teacher")
        if not isinstance(spec, dict):
            continue
        digest = None
        try:
            from synthesizers.teachers.session import template_digest
            from synthesizers.teachers.task import load_template

            templates = getattr(get_stage(name), "templates", ())
            texts = {t: load_template(t, params.get("prompts") or {}) for t in templates}
            digest = template_digest(*(f"{n}\n{t}" for n, t in sorted(texts.items())))
        except Exception:  # noqa: BLE001 - a moved prompt file, a missing plugin: the card says unknown
            digest = None
        out.append({"stage": name, "backend": spec.get("backend"), "model": spec.get("model"),
                    "sampling": spec.get("sampling"), "template_sha": digest})
    return out


def card_metadata(card: CardParams, configs: list[dict[str, Any]], infos: dict[str, dict[str, Any]],
                  rows: int, has_images: bool, name: str) -> Any:
    """The :class:`~huggingface_hub.DatasetCardData` of the card's YAML header."""
    from huggingface_hub import DatasetCardData

    tasks = card.task_categories or (["image-text-to-text"] if has_images else ["text-generation"])
    tags = list(dict.fromkeys([*card.tags, "curate", "long-context"]))
    extra: dict[str, Any] = {"configs": configs}
    if infos:
        extra["dataset_info"] = [infos[c["config_name"]] for c in configs if c["config_name"] in infos]
    return DatasetCardData(pretty_name=card.pretty_name or name, license=card.license,
                           language=card.language or None, task_categories=tasks, tags=tags,
                           size_categories=[size_category(rows)], **extra)


def card_text(data: Any, *, name: str, summary: str | None, resolved_yaml: str, fingerprint: dict[str, Any],
              stats: dict[str, Any], configs: list[dict[str, Any]], config_rows: dict[str, int],
              profiles: dict[str, dict[str, Any]], teacher_list: list[dict[str, Any]], seed: Any,
              plots: dict[str, str], stage_order: list[str]) -> str:
    """The whole ``README.md``: YAML header from ``data``, then the body described in the module."""
    from huggingface_hub import DatasetCard

    parts = [f"# {cell(name)}", ""]
    if summary:
        parts += [cell(summary), ""]
    parts += [("Made with [curate](https://pypi.org/project/curate-longctx/) from the manifest below; every "
               "file in `data/` is listed by config in this card's header, and "
               "`datasets.load_dataset(<this repo>, <config>)` reads it."), ""]
    parts += ["## Configs", "", _table(["config", "rows", "files"],
                                       [[c["config_name"], f"{config_rows.get(c['config_name'], 0):,}",
                                         ", ".join(_paths(c))] for c in configs]), ""]
    parts += _provenance(fingerprint, teacher_list, seed)
    parts += _stage_tables(stats, stage_order)
    parts += _profile_tables(profiles)
    if plots:
        parts += ["## Plots", ""]
        for title, path in plots.items():
            parts += [f"![{cell(title)}]({path})", ""]
    parts += ["## Manifest", "", "The resolved manifest (every default filled in; secrets masked):", "",
              _fence(resolved_yaml, "yaml"), ""]
    card = DatasetCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                     body="\n".join(parts))
    return str(card)


def _paths(config: dict[str, Any]) -> list[str]:
    out = []
    for d in config["data_files"]:
        out += d["path"] if isinstance(d["path"], list) else [d["path"]]
    return out


def _provenance(fingerprint: dict[str, Any], teacher_list: list[dict[str, Any]], seed: Any) -> list[str]:
    out = ["## Provenance", "",
           _table(["what", "value"], [["fingerprint", fingerprint.get("digest", "")],
                                      ["manifest digest", fingerprint.get("manifest", "")],
                                      ["inputs digest", fingerprint.get("inputs", "")],
                                      ["seed", seed]]
                  + [[f"package {k}", v] for k, v in sorted(fingerprint.get("packages", {}).items())]), ""]
    if teacher_list:
        out += ["### Teacher models", "",
                _table(["stage", "backend", "model", "prompt-template hash", "sampling"],
                       [[t["stage"], t["backend"], t["model"], t["template_sha"] or "unknown",
                         ", ".join(f"{k}={v}" for k, v in sorted((t["sampling"] or {}).items()))]
                        for t in teacher_list]), ""]
    return out


def _stage_tables(stats: dict[str, Any], order: list[str]) -> list[str]:
    stages = {label: stats["stages"][label] for label in order}
    rows = [[label, f"{s['rows_in']:,}", f"{s['rows_out']:,}", f"{s.get('tokens_out', 0):,}",
             f"{s.get('seconds', 0):.1f}"] for label, s in stages.items()]
    out = ["## Stages", "", _table(["stage", "rows in", "rows out", "tokens out", "seconds"], rows), ""]
    drops = [[label, reason, f"{n:,}"] for label, s in stages.items() for reason, n in s.get("drops", {}).items()]
    if drops:
        out += ["### Drops by reason", "", _table(["stage", "reason", "rows"], drops), ""]
    return out


def _profile_tables(profiles: dict[str, dict[str, Any]]) -> list[str]:
    lengths, images, depths = [], [], []
    for config, prof in profiles.items():
        for group, g in prof.get("groups", {}).items():
            where = config if group == "all" else f"{config} / {group}"
            t = g.get("tokens")
            if t:
                lengths.append([where, f"{g['samples']:,}", f"{t['min']:,}", f"{t.get('p50') or 0:,.0f}",
                                f"{t.get('p90') or 0:,.0f}", f"{t['max']:,}", f"{t['sum']:,}"])
            hist = g.get("token_histogram")
            if hist and hist.get("counts"):
                edges = hist["edges"]
                bins = [f"{edges[i]:,.0f}–{edges[i + 1]:,.0f}: {n:,}" for i, n in enumerate(hist["counts"]) if n]
                lengths.append([where + " (histogram)", "", "", "", "", "", "; ".join(bins)])
            ips = g.get("images_per_sample")
            if ips:
                images.append([where, "; ".join(f"{k}: {v:,}" for k, v in sorted(ips.items(), key=lambda kv: int(kv[0])))])
            dep = g.get("evidence_depth")
            if dep and any(dep.get("counts", [])):
                e = dep["edges"]
                depths.append([where, "; ".join(f"{e[i]:.1f}–{e[i + 1]:.1f}: {n:,}"
                                                for i, n in enumerate(dep["counts"]))])
    out = []
    if lengths:
        out += ["## Token lengths", "", _table(["config", "rows", "min", "p50", "p90", "max", "total / histogram"],
                                                lengths), ""]
    if images:
        out += ["## Images per sample", "", _table(["config", "images: rows"], images), ""]
    if depths:
        out += ["## Evidence depth", "", _table(["config", "depth: rows"], depths), ""]
    return out


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]

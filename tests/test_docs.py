"""The docs stay true: the generated reference matches the code, documented YAML validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from curate.manifest import loads
from curate.reference import reference_markdown
from tests.conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_reference_is_current():
    assert (ROOT / "docs" / "manifest-reference.md").read_text() == reference_markdown(), (
        "regenerate with: curate stages --markdown > docs/manifest-reference.md")


def _yaml_blocks(path: Path) -> list[str]:
    return [b for b in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S) if "name:" in b]


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md"])
def test_documented_manifests_validate(doc):
    blocks = _yaml_blocks(ROOT / doc)
    assert blocks
    for block in blocks:
        loads(block, doc)


@pytest.mark.parametrize("manifest", sorted(p.name for p in (ROOT / "manifests").glob("*.yaml")))
def test_shipped_manifests_load(manifest):
    """Every recipe parses and validates (recipes/test_recipes.py runs each on real data)."""
    from curate.manifest import load

    load(ROOT / "manifests" / manifest)


def test_stages_command_lists_everything():
    text = cli("stages").stdout
    for name in ("heuristics", "select", "jsonl", "stdlib_docs", "parquet", "webdataset", "local"):
        assert name in text


def _user_docs() -> list[Path]:
    return [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "jobs" / "README.md",
            *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", [str(p.relative_to(ROOT)) for p in _user_docs()])
def test_docs_stand_alone(doc):
    """No link or mention leads outside the repository (design notes, issue numbers, sibling folders)."""
    path = ROOT / doc
    text = path.read_text()
    for bad in ("../shared", "shared/DESIGN", "DESIGN.md", "ALGORITHMS.md", "STYLE.md"):
        assert bad not in text, f"{doc} mentions {bad!r}"
    assert not re.search(r"\bissues? #?\d+", text, re.I), f"{doc} points at an issue number"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert resolved.exists(), f"{doc} links to a missing file: {target}"


SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson", ".gz", ".zst", ".bz2", ".xz"), "parquet": (".parquet", ".pq"),
            "webdataset": (".tar", ".tar.gz", ".tgz"), "arrow": (".arrow", ".feather", ".ipc")}


@pytest.mark.parametrize("manifest", sorted(p.name for p in (ROOT / "manifests").glob("*.yaml")))
def test_recipe_usage_comments_work_as_written(manifest, monkeypatch):
    """`#   VAR='…' curate run manifests/x.yaml`: the command exists, the manifest exists, and with the
    comment's variables set the manifest loads and its input pattern suits the source's kind."""
    from curate.manifest import load

    commands = {"run", "validate", "plan", "inspect", "stats", "stages", "run-shard", "status"}
    for line in (ROOT / "manifests" / manifest).read_text().splitlines():
        m = re.match(r"#\s+((?:\w+=\S+\s+)*)curate (\S+)\s*(\S+)?", line)
        if not m:
            continue
        assert m.group(2) in commands, line
        target = m.group(3)
        if not (target and target.startswith("manifests/")):
            continue
        assert (ROOT / target).exists(), line
        for name, value in re.findall(r"(\w+)=(\S+)", m.group(1)):
            monkeypatch.setenv(name, value.strip("'\""))
        loaded = load(ROOT / target)
        kind = loaded.source.kind
        for pattern in getattr(loaded.source.params, "paths", []) or []:
            if kind in SUFFIXES:
                assert pattern.endswith(SUFFIXES[kind]), f"{line}: {pattern!r} is not a {kind} input"

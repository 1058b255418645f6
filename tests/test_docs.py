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

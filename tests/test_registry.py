"""The stage registry: built-ins, third-party stages through entry points, close-match errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from curate.errors import ConfigError
from curate.registry import get_stage, stage_names


def test_builtins_are_registered():
    assert {"heuristics", "select"} <= set(stage_names())
    assert get_stage("select").name == "select"


def test_unknown_stage_lists_close_matches():
    with pytest.raises(ConfigError, match="did you mean 'heuristics'"):
        get_stage("heuristic")
    with pytest.raises(ConfigError, match="unknown stage 'zzz'") as e:
        get_stage("zzz")
    assert "did you mean" not in str(e.value)


def test_third_party_stage_through_entry_point(tmp_path, monkeypatch):
    """A package declaring `curate.stages` is found by name, validated and run by the real CLI."""
    pkg = tmp_path / "site"
    (pkg / "shout_stage").mkdir(parents=True)
    (pkg / "shout_stage" / "__init__.py").write_text(textwrap.dedent('''
        import pyarrow as pa
        import pyarrow.compute as pc
        from curate import Stage, StageParams

        class Shout(Stage):
            """Upper-cases the text (a third-party example)."""
            class Params(StageParams):
                times: int = 1
            requires = ("text",)

            def run(self, batches, ctx):
                for b in batches:
                    i = b.schema.get_field_index("text")
                    loud = pc.utf8_upper(b.column("text"))
                    parts = [loud] * self.params.times
                    yield b.set_column(i, "text", pc.binary_join_element_wise(*parts, " "))
    '''))
    dist = pkg / "shout_stage-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-stage\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[curate.stages]\nshout = shout_stage:Shout\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{':'.join(sys.path)}")
    assert "shout" in stage_names()
    assert get_stage("shout").Params(times=2).times == 2

    from tests.conftest import cli, write_jsonl, write_manifest

    write_jsonl(tmp_path / "in.jsonl", [{"text": "quiet words"}])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: shout
        source: {{kind: jsonl, paths: ["{tmp_path}/in.jsonl"]}}
        stages: [{{shout: {{times: 2}}}}]
        sink: {{kind: jsonl}}
        executor: {{kind: local, workers: 2}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    assert b"QUIET WORDS QUIET WORDS" in next((tmp_path / "run" / "jsonl").glob("*.jsonl")).read_bytes()
    bad = m.read_text().replace("times: 2", "tims: 2")
    m.write_text(bad)
    proc = cli("validate", str(m), check=False)
    assert proc.returncode == 2 and "stages[0] (shout).tims: unknown key (did you mean 'times'?)" in proc.stderr


def test_a_sink_kind_installed_later_in_the_process_is_found(tmp_path, monkeypatch):
    """Entry points are scanned once per sys.path: a package added to the path is seen at the next lookup."""
    import textwrap

    from curate.plugins import _KINDS, kinds_of

    assert "loud_sink" not in kinds_of("sink")  # scanned (and remembered) before the package exists
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "loud_sink_pkg.py").write_text(textwrap.dedent('''
        from curate.sinks.jsonl import JsonlSink

        class LoudSink(JsonlSink):
            """A third-party sink kind (a JSONL sink under another name)."""
    '''))
    dist = pkg / "loud_sink_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loud-sink-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[curate.sinks]\nloud_sink = loud_sink_pkg:LoudSink\n")
    monkeypatch.syspath_prepend(str(pkg))
    try:
        assert kinds_of("sink")["loud_sink"].kind == "loud_sink"
    finally:
        _KINDS["sink"].pop("loud_sink", None)

"""Manifest errors name the file, the YAML line and the field; secrets never reach the disk."""

from __future__ import annotations

import pytest

from curate.errors import ConfigError
from curate.manifest import load, loads
from tests.conftest import cli, write_manifest

GOOD = """\
name: t
source: {kind: jsonl, paths: ["{corpus}/*.jsonl"]}
stages:
  - heuristics: {min_words: 10}
  - select:
      where:
        - {column: scores.heuristics.n_words, min: 20}
sink: {kind: parquet}
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        loads(text, "m.yaml")
    return str(e.value)


def test_good_manifest_resolves_defaults(corpus):
    m = loads(GOOD.replace("{corpus}", str(corpus)), "m.yaml")
    resolved = m.resolved()
    assert resolved["stages"][0]["heuristics"]["min_words"] == 10
    assert resolved["stages"][0]["heuristics"]["max_words"] is None
    assert resolved["sink"]["compression"] == "zstd"
    assert m.output == "runs/t"


def test_unknown_stage_suggests_close_match():
    msg = _error(GOOD.replace("- select:", "- selekt:"))
    assert "m.yaml:5: stages[1]" in msg
    assert "unknown stage 'selekt'" in msg and "did you mean 'select'" in msg


def test_bad_type_names_line_and_field():
    msg = _error(GOOD.replace("min_words: 10", "min_words: many"))
    assert "m.yaml:4: stages[0] (heuristics).min_words:" in msg
    assert "integer" in msg


def test_nested_bad_type_names_line_and_field():
    msg = _error(GOOD.replace("min: 20", "min: lots"))
    assert "m.yaml:7: stages[1] (select).where[0].min:" in msg


def test_unknown_key_suggests_close_match():
    msg = _error(GOOD.replace("min_words: 10", "min_word: 10"))
    assert "m.yaml:4: stages[0] (heuristics).min_word: unknown key (did you mean 'min_words'" in msg


def test_unknown_top_level_key_and_sink_kind():
    msg = _error(GOOD + "exectuor: {kind: local}\n")
    assert "m.yaml:9: exectuor: unknown key (did you mean 'executor'?)" in msg
    msg = _error(GOOD.replace("kind: parquet", "kind: parket"))
    assert "m.yaml:8: sink.kind: unknown sink kind 'parket'; did you mean 'parquet'" in msg


def test_several_errors_reported_together():
    msg = _error(GOOD.replace("min_words: 10", "min_words: x").replace("- select:", "- selekt:"))
    assert msg.count("m.yaml:") == 2


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ConfigError, match="manifest not found"):
        load(tmp_path / "nope.yaml")


def test_missing_input_files_name_the_line(tmp_path):
    m = write_manifest(tmp_path / "m.yaml", GOOD.replace("{corpus}", str(tmp_path / "absent")))
    proc = cli("validate", str(m), check=False)
    assert proc.returncode == 2
    assert f"{m}:2: source.paths: no input files match" in proc.stderr.replace("\n", "")


def test_yaml_syntax_error_has_line():
    msg = _error("name: t\nsource: {kind: jsonl\nstages: []\n")
    assert msg.startswith("m.yaml:3: invalid YAML")


def test_env_interpolation_and_secret_redaction(monkeypatch, corpus, tmp_path):
    monkeypatch.setenv("CORPUS_DIR", str(corpus))
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    text = GOOD.replace("{corpus}", "${CORPUS_DIR}") + "description: ${HF_TOKEN}\n"
    m = loads(text, "m.yaml")
    assert m.source.params.paths == [f"{corpus}/*.jsonl"]
    assert m.description == "hf_supersecret123"  # the value is usable in-process…
    dumped = m.resolved_yaml()
    assert "hf_supersecret123" not in dumped  # …but the resolved manifest keeps the reference
    assert "${HF_TOKEN}" in dumped and str(corpus) in dumped


def test_unset_variable_without_default_is_an_error(monkeypatch):
    monkeypatch.delenv("NOPE_DIR", raising=False)
    msg = _error(GOOD.replace("{corpus}", "${NOPE_DIR}"))
    assert "m.yaml:2: source.paths[0]: environment variable ${NOPE_DIR} is not set" in msg
    ok = loads(GOOD.replace("{corpus}", "${NOPE_DIR:-/data}"), "m.yaml")
    assert ok.source.params.paths == ["/data/*.jsonl"]


def test_select_requires_some_rule():
    msg = _error(GOOD.replace("""  - select:
      where:
        - {column: scores.heuristics.n_words, min: 20}
""", "  - select: {}\n"))
    assert "stages[1] (select)" in msg and "needs `where` bounds" in msg


def test_stage_requiring_missing_column_is_caught_at_plan(tmp_path):
    """heuristics needs `text`; an interleaved source has `texts` — caught before any work."""
    import io
    import tarfile

    from curate.planner import Plan

    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as tf:
        data = b"hello world"
        info = tarfile.TarInfo("s0.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    m = loads(f"""\
name: t
source: {{kind: webdataset, paths: ["{tar}"], schema: interleaved}}
stages:
  - heuristics: {{min_words: 10}}
sink: {{kind: parquet}}
""", "m.yaml")
    with pytest.raises(ConfigError, match=r"m.yaml:4: stages\[0\]\.heuristics: needs column\(s\) \['text'\]"):
        Plan.build(m)


def test_secret_names_are_words_not_substrings(monkeypatch):
    from curate.manifest import _SECRET_NAME

    for name in ("HF_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "TOKEN"):
        assert _SECRET_NAME.search(name), name
    for name in ("TOKENIZER", "TOKENS_DIR", "KEYBOARD", "MONKEY_PATH"):
        assert not _SECRET_NAME.search(name), name


def test_secret_values_never_reach_the_resolved_manifest(monkeypatch):
    """Wherever a secret lands (a list item, a value copied into another field), it is not written."""
    monkeypatch.setenv("API_TOKEN", "tok_abcdef987654")
    text = GOOD.replace("{corpus}", "/data/${API_TOKEN}") + 'description: "key=${API_TOKEN}"\n'
    m = loads(text, "m.yaml")
    assert m.source.params.paths == ["/data/tok_abcdef987654/*.jsonl"]  # usable in-process
    m.name = "copied-tok_abcdef987654"  # a value that travelled to a field with no template
    dumped = m.resolved_yaml()
    assert "tok_abcdef987654" not in dumped
    assert "/data/${API_TOKEN}/*.jsonl" in dumped and "key=${API_TOKEN}" in dumped
    assert "copied-***" in dumped


def test_a_missing_optional_module_names_the_stage_and_the_extra(corpus, monkeypatch):
    import importlib.util

    from curate.planner import Plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kenlm" else real(name, *a))
    m = loads(f"""\
name: t
source: {{kind: jsonl, paths: ["{corpus}/*.jsonl"]}}
stages:
  - heuristics: {{}}
  - perplexity: {{model: /models/en.arpa}}
sink: {{kind: parquet}}
""", "m.yaml")
    with pytest.raises(ConfigError, match=r"m.yaml:5: stages\[1\]\.perplexity: needs the module 'kenlm' "
                                          r"\(pip install 'curate-longctx\[kenlm\]'\)"):
        Plan.build(m)

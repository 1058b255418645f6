"""Hostile manifests and arguments at the command line: every one is a clear message naming the file,
line and field (exit 2 for configuration errors), never a traceback, and nothing is silently ignored."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import cli, curate_run, write_jsonl, write_manifest


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    for f in range(2):
        write_jsonl(folder / f"p{f}.jsonl", [{"id": f"d{f}-{i}", "text": "word " * (20 + i)} for i in range(20)])
    return folder


def _base(inputs: Path, stage: str = "  - heuristics: {min_words: 10}") -> str:
    return (f'name: t\nsource: {{kind: jsonl, paths: ["{inputs}/*.jsonl"]}}\nstages:\n{stage}\n'
            "sink: {kind: parquet}\n")


def _refused(*args: str, env: dict | None = None) -> str:
    """Run ``curate ARGS``; it must exit 2 with a configuration error and no traceback. Its stderr."""
    proc = cli(*args, check=False, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "configuration error" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    return " ".join(proc.stderr.split())  # rich may wrap long lines


def _shas(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "parquet").rglob("*")) if p.is_file()}


# ============================================================================ YAML itself
def test_duplicate_keys_are_errors_with_both_lines(tmp_path, inputs):
    top = write_manifest(tmp_path / "top.yaml", "name: t\n" + _base(inputs))
    msg = _refused("validate", str(top))
    assert f"{top}:2: name: duplicate key (first given on line 1)" in msg
    nested = write_manifest(tmp_path / "nested.yaml", _base(inputs, "  - heuristics:\n      min_words: 10\n"
                                                                    "      min_words: 50"))
    msg = _refused("validate", str(nested))
    assert f"{nested}:6: stages[0].heuristics.min_words: duplicate key (first given on line 5)" in msg


def test_merge_keys_may_be_overridden_and_aliases_are_checked(tmp_path, inputs):
    ok = write_manifest(tmp_path / "ok.yaml", _base(inputs, "  - heuristics: &h\n      min_words: 10\n"
                                                            "  - heuristics:\n      <<: *h\n      min_words: 12"))
    assert "2 stage(s)" in cli("validate", str(ok)).stdout
    bad = write_manifest(tmp_path / "bad.yaml", _base(inputs, "  - heuristics: &h {min_words: 10}\n"
                                                             "  - heuristics:\n      <<: *h\n      min_wordz: 3"))
    msg = _refused("validate", str(bad))
    assert f"{bad}:7: stages[1] (heuristics).min_wordz: unknown key (did you mean 'min_words'" in msg


def test_a_bom_is_accepted_and_lines_stay_right(tmp_path, inputs):
    m = tmp_path / "bom.yaml"
    m.write_bytes(b"\xef\xbb\xbf" + _base(inputs, "  - heuristics: {min_words: many}").encode())
    assert f"{m}:4: stages[0] (heuristics).min_words:" in _refused("validate", str(m))


def test_non_utf8_bytes_are_a_configuration_error_with_the_line(tmp_path, inputs):
    m = tmp_path / "latin1.yaml"
    m.write_bytes(_base(inputs).encode() + b"description: caf\xe9\n")
    msg = _refused("validate", str(m))
    assert f"{m}:6: the manifest is not UTF-8 text (byte 0xe9" in msg


@pytest.mark.parametrize("text, expected", [
    ("", ": the manifest must be a mapping of top-level keys"),
    ("- a\n- b\n", ":1: the manifest must be a mapping of top-level keys"),
    ("just a scalar\n", ":1: the manifest must be a mapping of top-level keys"),
    ("name: t\nsource:\n\tkind: jsonl\n", ":3: invalid YAML: found character '\\t'"),
])
def test_malformed_documents(tmp_path, text, expected):
    m = tmp_path / "m.yaml"
    m.write_text(text)
    assert f"{m}{expected}" in _refused("validate", str(m))


def test_a_folder_or_missing_file_as_manifest(tmp_path):
    assert f"{tmp_path}: manifest not found" in _refused("validate", str(tmp_path))
    assert "manifest not found" in _refused("run", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


# ============================================================================ values
@pytest.mark.parametrize("value, expected", [
    ("yes", "expected a number, got the boolean true"),
    ("off", "expected a number, got the boolean false"),
    ("10.5", "fractional part"),
    ("-5", "greater than or equal to 0"),
    (".nan", "finite number"),
    ("[10]", "valid integer"),
    ('"many"', "valid integer"),
    ("99999999999999999999", "99999999999999999999 does not fit in 64 bits"),
    ('"9223372036854775808"', "does not fit in 64 bits"),
    ("1" + "0" * 60, "a 61-digit number does not fit in 64 bits"),
])
def test_bad_numbers_name_line_and_field(tmp_path, inputs, value, expected):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs, f"  - heuristics: {{min_words: {value}}}"))
    msg = _refused("validate", str(m))
    assert f"{m}:4: stages[0] (heuristics).min_words: " in msg and expected in msg


def test_numbers_past_64_bits_are_refused_wherever_they_are(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", "seed: 18446744073709551616\n" + _base(inputs))
    assert f"{m}:1: seed: 18446744073709551616 does not fit in 64 bits" in _refused("validate", str(m))
    m = write_manifest(tmp_path / "u.yaml", "seed: 18446744073709551615\n" + _base(inputs))  # unsigned: fine
    assert cli("validate", str(m), check=False).returncode == 0
    m = write_manifest(tmp_path / "s.yaml", _base(inputs).replace("kind: parquet", "kind: parquet, shard_bytes: 10EB"))
    assert "shard_bytes: 10000000000000000000 does not fit in 64 bits" in _refused("validate", str(m))
    m = write_manifest(tmp_path / "ok.yaml", "seed: 9223372036854775807\n" + _base(inputs))
    assert cli("validate", str(m), check=False).returncode == 0


def test_a_boolean_seed_and_executor_workers_are_refused(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", "seed: on\n" + _base(inputs))
    assert f"{m}:1: seed: expected a number, got the boolean true" in _refused("validate", str(m))
    m = write_manifest(tmp_path / "w.yaml", _base(inputs) + "executor: {kind: local, workers: yes}\n")
    assert f"{m}:6: executor (local).workers: expected a number" in _refused("validate", str(m))


@pytest.mark.parametrize("stages, expected", [
    ("stages:\n  heuristics: {min_words: 10}\n", ":3: stages: Input should be a valid list"),
    ("stages: [{heuristics: {}, select: {}}]\n", ":3: stages[0]: each stage is a one-key mapping"),
    ("stages: [{heuristics: 5}]\n", ":3: stages[0] (heuristics): stage parameters must be a mapping"),
    ("stages: [heuristic]\n", ":3: stages[0]: unknown stage 'heuristic'; did you mean 'heuristics'?"),
    ("stages: [{heuristics: {quarantine: null}}]\n",
     ":3: stages[0] (heuristics).quarantine: Input should be a valid boolean"),
])
def test_stage_list_shapes(tmp_path, inputs, stages, expected):
    m = write_manifest(tmp_path / "m.yaml", f'name: t\nsource: {{kind: jsonl, paths: ["{inputs}/*.jsonl"]}}\n'
                                            f"{stages}sink: {{kind: parquet}}\n")
    assert f"{m}{expected}" in _refused("validate", str(m))


def test_an_empty_sink_list_is_refused_before_any_work(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", f'name: t\nsource: {{kind: jsonl, paths: ["{inputs}/*.jsonl"]}}\n'
                                            "sink: []\n")
    assert f"{m}:3: sink: needs at least one sink" in _refused("run", str(m), "-o", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


# ============================================================================ ${VAR}
@pytest.mark.parametrize("template", ["${A_${CURATE_T_SET}}", "${CURATE_T_UNSET:-${CURATE_T_SET}}", "${}",
                                      "${CURATE T}"])
def test_malformed_or_nested_references_are_errors(tmp_path, inputs, template):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs) + f'description: "{template}/x"\n')
    msg = _refused("validate", str(m), env={"CURATE_T_SET": "B"})
    assert f"{m}:6: description: '{template}/x': a `${{` that does not start a ${{VAR}}" in msg


def test_unset_and_defaulted_variables(tmp_path, inputs):
    env = {"CURATE_T_IN": str(inputs)}
    m = write_manifest(tmp_path / "m.yaml", _base(inputs).replace(str(inputs), "${CURATE_T_IN}")
                       + "output: ${CURATE_T_NOPE}/r\n")
    msg = _refused("validate", str(m), env=env)
    assert f"{m}:6: output: environment variable ${{CURATE_T_NOPE}} is not set" in msg
    m.write_text(m.read_text().replace("${CURATE_T_NOPE}", "${CURATE_T_NOPE:-}"))
    assert "ok" in cli("validate", str(m), env=env).stdout


# ============================================================================ -o and --workers
def test_output_pointing_at_a_file_or_a_foreign_folder(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs))
    (tmp_path / "afile").write_text("x")
    assert "afile: exists and is not a folder" in _refused("run", str(m), "-o", str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    msg = _refused("run", str(m), "-o", str(tmp_path / "foreign"))
    assert "is not a curate run directory" in msg
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["keep.txt"]


def test_output_that_cannot_be_created(tmp_path, inputs):
    """A run directory whose parent is a file cannot be made, by root too (a read-only folder can)."""
    m = write_manifest(tmp_path / "m.yaml", _base(inputs))
    (tmp_path / "afile").write_text("x")
    assert "cannot create or write the run directory" in _refused("run", str(m), "-o", str(tmp_path / "afile" / "r"))
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_workers_below_one_are_refused(tmp_path, inputs, workers):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs))
    msg = _refused("run", str(m), "-o", str(tmp_path / "r"), "--workers", workers, "--no-progress")
    assert f"--workers {workers}: must be at least 1" in msg
    assert not (tmp_path / "r").exists()


def test_odd_run_directory_names_then_a_different_manifest_is_refused(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs))
    run = tmp_path / "r sp ü [x]*"
    assert curate_run(m, run, timeout=60).returncode == 0
    before = _shas(run)
    assert "heuristics" in cli("stats", str(run)).stdout
    assert "finished" in cli("status", str(run)).stdout
    assert cli("inspect", str(run), "-n", "1").returncode == 0
    changed = write_manifest(tmp_path / "changed.yaml", _base(inputs, "  - heuristics: {min_words: 11}"))
    msg = _refused("run", str(changed), "-o", str(run), "--no-progress")
    assert "made by a different run (manifest changed)" in msg and "--restart" in msg
    other = write_manifest(tmp_path / "other.yaml", _base(inputs).replace("name: t", "name: other"))
    assert "--restart" in _refused("run", str(other), "-o", str(run), "--no-progress")
    assert _shas(run) == before


# ============================================================================ reading run directories
def test_stats_status_inspect_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("hi")
    for where in (tmp_path / "x", tmp_path / "missing"):
        assert "no stats.json" in _refused("stats", str(where))
        assert "not a curate run directory" in _refused("status", str(where))
        msg = _refused("inspect", str(where))
        assert str(where) in msg and "run the same command again" not in msg


def test_half_written_run_directory_files(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs))
    run = tmp_path / "r"
    assert curate_run(m, run, timeout=60).returncode == 0
    (run / "stats.json").write_text('{"stages": ')
    assert f"{run / 'stats.json'}: damaged or half-written" in _refused("stats", str(run))
    assert "damaged or half-written" in _refused("inspect", str(run))
    (run / "stats.json").write_text("[1]")
    assert "not a curate stats file" in _refused("stats", str(run))
    (run / "manifest.resolved.yaml").write_text("name: [\n")
    assert f"{run / 'manifest.resolved.yaml'}:2: invalid YAML" in _refused("status", str(run))


def test_a_damaged_fingerprint_is_a_clear_error(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs))
    run = tmp_path / "r"
    assert curate_run(m, run, timeout=60).returncode == 0
    (run / "fingerprint").write_text("{")
    msg = _refused("run", str(m), "-o", str(run), "--no-progress")
    assert "fingerprint" in msg and "--restart" in msg
    cli("run", str(m), "-o", str(run), "--no-progress", "--restart")  # starts over
    assert (run / "stats.json").is_file()


# ============================================================================ Ctrl-C
def test_sigint_mid_run_then_a_plain_rerun_gives_the_same_bytes(tmp_path, inputs):
    m = write_manifest(tmp_path / "m.yaml", _base(inputs) + "executor: {kind: local, workers: 1}\n")
    assert curate_run(m, tmp_path / "clean", timeout=60).returncode == 0
    run = tmp_path / "run"
    slow = [{"point": "stage", "label": "heuristics", "shard": "00001", "after": 1, "action": "sleep",
             "seconds": 30}]
    proc = curate_run(m, run, faults=slow, background=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (run / "completions" / "p0-00000.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Run the same command again" in stderr and "Traceback" not in stderr
    assert not (run / "stats.json").exists() and not (run / "lock").exists()
    again = curate_run(m, run, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout
    assert _shas(run) == _shas(tmp_path / "clean") != {}
    stats = json.loads((run / "stats.json").read_text())["stages"]
    clean = json.loads((tmp_path / "clean" / "stats.json").read_text())["stages"]
    assert {k: (v["rows_in"], v["rows_out"]) for k, v in stats.items()} == \
        {k: (v["rows_in"], v["rows_out"]) for k, v in clean.items()}

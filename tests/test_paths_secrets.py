"""Sinks write only inside the run directory, partition values cannot escape their sink folder,
secret values never reach the disk, and WebDataset keeps each integer column's width."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate.errors import ConfigError
from curate.manifest import loads
from curate.plugins import kinds_of
from curate.sinks.base import write_index
from curate.sinks.paths import MAX_COMPONENT, check_sink_path, encode_component, partition_folder

MANIFEST = """\
name: t
source: {{kind: jsonl, paths: ["/data/*.jsonl"]}}
sink:
  - {{kind: parquet}}
  - {{kind: jsonl, path: {path}}}
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        loads(text, "m.yaml")
    return str(e.value)


def _sink(kind: str, root: Path, **params):
    cls = kinds_of("sink")[kind]
    return cls(cls.Params(**params), root)


# ---------------------------------------------------------------------------------------- sink paths
@pytest.mark.parametrize("path, why", [
    ('"../outside"', "'..' would leave the run directory"),
    ('"a/../../b"', "'..' would leave the run directory"),
    ('"/etc/curate"', "is absolute"),
    ('""', "must not be empty"),
    ('"  "', "must not be empty"),
    ('"."', "names the run directory itself"),
    ('"./"', "names the run directory itself"),
    ('"C:/out"', "a drive or URL scheme is not allowed"),
    ('"s3://bucket/out"', "a drive or URL scheme is not allowed"),
    ('"pipe:cat"', "a drive or URL scheme is not allowed"),
    ('"a\\\\b"', "use '/' to separate folders"),
    ('"a\\x00b"', "contains a control character"),
    ('"logs"', "'logs' is curate's own entry of the run directory"),
    ('"Stats/x"', "'Stats' is curate's own entry"),
    ('"completions/out"', "'completions' is curate's own entry"),
    ('"tokenizer"', "curate's own entry"),
    ('"stats.json"', "curate's own entry"),
    ('"out/.tmp-x"', "curate's temporary-file prefix"),
])
def test_unsafe_sink_paths_are_refused_with_file_line_and_field(path, why):
    msg = _error(MANIFEST.format(path=path))
    assert "m.yaml:5: sink[1] (jsonl).path: " in msg, msg
    assert why in msg, msg


@pytest.mark.parametrize("path, normal", [("out", "out"), ("./a//b/", "a/b"), ("x/logs", "x/logs"),
                                          ("corpus.v2/pq", "corpus.v2/pq"), ("données", "données")])
def test_safe_sink_paths_are_accepted_and_normalized(path, normal):
    m = loads(MANIFEST.format(path=json.dumps(path)), "m.yaml")
    assert m.sinks[1].params.path == normal
    assert m.resolved()["sink"][1]["path"] == normal


@pytest.mark.parametrize("first, second, why", [
    ("{kind: parquet}", "{kind: jsonl, path: parquet}", "writes to 'parquet', as sink[0] does"),
    ("{kind: parquet, path: out}", "{kind: jsonl, path: ./out/}", "writes to 'out', as sink[0] does"),
    ("{kind: parquet, path: Out}", "{kind: jsonl, path: out}", "writes to 'out', as sink[0] does"),
    ("{kind: parquet, path: out}", "{kind: jsonl, path: out/json}", "are nested folders"),
    ("{kind: parquet, path: a/out}", "{kind: jsonl, path: b/out}", "same last folder name"),
])
def test_two_sinks_in_one_folder_are_refused(first, second, why):
    text = f"name: t\nsource: {{kind: jsonl, paths: [\"/data/*.jsonl\"]}}\nsink:\n  - {first}\n  - {second}\n"
    msg = _error(text)
    assert msg.startswith("m.yaml:5: sink[1]"), msg
    assert why in msg and "give one of them another `path`" in msg, msg


def test_check_sink_path_direct():
    assert check_sink_path("a/./b//") == "a/b"
    for bad in ("..", "../x", "/x", "", "logs", "x:y", ".tmp-a"):
        with pytest.raises(ValueError):
            check_sink_path(bad)


# ---------------------------------------------------------------------------------------- partitions
HOSTILE = ["../../etc", "/abs", "a/b", "..", ".", "", None, "\x00", "x" * 300, "y" * 299 + "é",
           "données/日本語", "Aa", "aa", "AA", "%2F", "%null", "%empty", "a.", ".hidden", "con", "*?[]{}",
           "pipe:rm -rf", "C:\\win", "tab\tnew\nline", "\u212a"]  # KELVIN SIGN folds to k


def _inside(root: Path, path: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _hostile_batch() -> pa.RecordBatch:
    n = len(HOSTILE)
    return pa.RecordBatch.from_pydict({"id": [f"r{i}" for i in range(2 * n)], "part": HOSTILE + HOSTILE[::-1],
                                       "n": list(range(2 * n))})


@pytest.mark.parametrize("kind", ["parquet", "webdataset", "jsonl", "arrow"])
def test_hostile_partition_values_stay_inside_the_sink_folder(tmp_path, kind):
    run = tmp_path / "run"
    sink = _sink(kind, run, path="out", partition_by="part")
    w = sink.writer("00000")
    w.write(_hostile_batch())
    files = w.close()
    index = write_index(sink, files, ["id", "part", "n"])
    written = [p for p in tmp_path.rglob("*")]
    assert written and all(p == run or p == run / "out" or _inside(run / "out", p) for p in written), written
    # one folder per value, each directly inside the sink folder, names short and plain ASCII
    folders = sorted(p for p in (run / "out").iterdir() if p.is_dir())
    assert len(folders) == len(HOSTILE)
    for f in folders:
        assert f.parent == run / "out" and len(f.name.encode()) <= 2 * MAX_COMPONENT + 1
        assert f.name.isascii() and f.name.startswith("part_") and not f.name.startswith(".")
    # names differ even ignoring case (macOS, Windows), and even after Unicode case folding
    assert len({f.name.casefold() for f in folders}) == len(folders)
    # index.json keeps each folder's original value and counts
    parts = index["partitions"]
    assert sorted(v["value"] for v in parts.values() if v["value"] is not None) == sorted(
        v for v in HOSTILE if v is not None)
    assert sum(v["value"] is None for v in parts.values()) == 1
    for folder, info in parts.items():
        assert folder == partition_folder("part", info["value"]) and info["samples"] == 2
        assert info["type"] == "string"
        sub = json.loads((run / "out" / folder / "index.json").read_text())
        assert sub["total_samples"] == 2
    assert json.loads((run / "out" / "index.json").read_text()) == index
    if kind == "webdataset":  # webdataset expands braces and reads `pipe:` URLs: names give it neither
        import webdataset as wds

        for shard in index["shards"]:
            got = list(wds.WebDataset(str(run / "out" / shard["name"]), shardshuffle=False).decode())
            assert len(got) == 2 and got[0]["json"]["part"] == parts[shard["name"].split("/")[0]]["value"]


def test_hostile_partitions_read_back_with_datasets(tmp_path):
    import datasets

    sink = _sink("parquet", tmp_path, partition_by="part")
    w = sink.writer("00000")
    w.write(_hostile_batch())
    index = write_index(sink, w.close(), ["id", "part", "n"])
    for folder, info in index["partitions"].items():
        ds = datasets.load_dataset("parquet", data_files=str(sink.directory / folder / "*.parquet"),
                                   split="train", cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows == 2 and set(ds["part"]) == {info["value"]}, folder
    every = datasets.load_dataset("parquet", data_files=str(sink.directory / "*" / "*.parquet"),
                                  split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(every["n"]) == list(range(2 * len(HOSTILE)))


def test_non_string_partition_values(tmp_path):
    batch = pa.RecordBatch.from_pydict({
        "id": [f"r{i}" for i in range(7)],
        "i": pa.array([-3, 0, 7, None, 7, -3, 2**40], pa.int64()),
        "b": pa.array([True, False, None, True, True, False, False]),
        "f": pa.array([1.5, float("nan"), float("inf"), None, float("nan"), -0.0, 1e20]),
        "z": pa.array([0.0, -0.0, 0.0, -0.0, 0.0, 0.0, -0.0]),  # equal, but two folders, whatever the order
        "raw": pa.array([b"\x00\xff", b"", None, b"../", b"\x00\xff", b"a", b"A"], pa.binary()),
    })
    expected = {
        "i": {"i_-3": -3, "i_0": 0, "i_7": 7, "i_%null": None, "i_1099511627776": 2**40},
        "b": {"b_true": True, "b_false": False, "b_%null": None},
        "f": {"f_1.5": 1.5, "f_nan": "nan", "f_inf": "inf", "f_%null": None, "f_-0.0": -0.0,
              "f_1e%2B20": 1e20},
        "z": {"z_0.0": 0.0, "z_-0.0": -0.0},
        "raw": {"raw_%00%FF": "AP8=", "raw_%empty": "", "raw_%null": None, "raw_%2E.%2F": "Li4v",
                "raw_a": "YQ==", "raw_%41": "QQ=="},
    }
    for column, folders in expected.items():
        sink = _sink("parquet", tmp_path / column, partition_by=column)
        w = sink.writer("00000")
        w.write(batch)
        index = write_index(sink, w.close(), batch.schema.names)
        assert {k: v["value"] for k, v in index["partitions"].items()} == folders, column
        assert sum(v["samples"] for v in index["partitions"].values()) == 7  # NaN rows kept, in one folder
        if column == "z":
            assert [v["samples"] for v in index["partitions"].values()] == [3, 4]  # z_-0.0, z_0.0
        else:
            assert index["partitions"][f"{column}_%null"]["samples"] == 1


def test_partition_folders_are_deterministic_and_compatible():
    assert partition_folder("bucket", 8) == "bucket_8"  # `<column>_<value>`, unchanged for plain values
    assert partition_folder("lang", "en") == "lang_en"
    assert partition_folder("Lang", "EN") == "Lang_%45%4E"
    assert partition_folder("a/b", "..") == "a%2Fb_%2E%2E"
    assert encode_component(None) == "%null" and encode_component("") == "%empty"
    long = encode_component("z" * 300)
    assert len(long) <= MAX_COMPONENT and "~" in long and long == encode_component("z" * 300)
    assert encode_component("z" * 300) != encode_component("z" * 301)
    cut = encode_component("é" * 100)
    assert cut.split("~")[0].count("%") * 3 == len(cut.split("~")[0])  # no %XX triplet cut short
    from urllib.parse import unquote

    for value in ("../../etc", "données", "Aa", "a b", "%2F"):
        assert unquote(encode_component(value)) == value


def test_a_rerun_of_a_shard_replaces_its_partition_files(tmp_path):
    sink = _sink("parquet", tmp_path, partition_by="part")
    w = sink.writer("00001")
    w.write(pa.RecordBatch.from_pydict({"id": ["a", "b"], "part": ["../x", "y"]}))
    w.close()
    w = sink.writer("00001")
    w.write(pa.RecordBatch.from_pydict({"id": ["c"], "part": ["y"]}))
    files = w.close()
    assert [f["name"] for f in files] == ["part_y/00001-0000.parquet"]
    assert not list((sink.directory / partition_folder("part", "../x")).iterdir())


def test_partition_by_a_list_column_is_refused(tmp_path):
    sink = _sink("parquet", tmp_path, partition_by="ids")
    w = sink.writer("00000")
    with pytest.raises(TypeError, match="partition_by: column 'ids'"):
        w.write(pa.RecordBatch.from_pydict({"ids": [[1, 2]]}))


# ---------------------------------------------------------------------------------------- secrets
@pytest.fixture
def secrets(monkeypatch):
    from curate import secrets as mod

    monkeypatch.setattr(mod, "SECRET_VALUES", set())
    return mod


def test_redact_replaces_known_values_longest_first(secrets):
    secrets.register("abc")
    secrets.register("abcdef123")
    secrets.register("")  # ignored
    assert secrets.redact("x abcdef123 y abc z") == "x *** y *** z"
    assert secrets.redact("no secret here") == "no secret here"
    assert secrets.redact("") == ""
    assert secrets.redact(secrets.redact("abcdef123")) == "***"


def test_redact_escaped_forms_and_urls(secrets):
    secrets.register('p"a\\ss w/rd')
    assert secrets.redact(json.dumps({"k": 'p"a\\ss w/rd'})) == '{"k": "***"}'
    assert secrets.redact("https://host/?t=p%22a%5Css%20w%2Frd") == "https://host/?t=***"
    assert secrets.redact("see https://user:hunter2@example.com/x?y=a@b.c") == \
        "see https://***@example.com/x?y=a@b.c"
    assert secrets.redact("git+ssh://tok@github.com/o/r and http://a:b@c@d/e") == \
        "git+ssh://***@github.com/o/r and http://***@d/e"
    assert secrets.redact("mail me at a@b.c, see https://example.com/a@b") == \
        "mail me at a@b.c, see https://example.com/a@b"
    assert secrets.redact("https://u:p@h/", urls=False) == "https://u:p@h/"


def test_redact_obj_walks_dicts_lists_and_keys(secrets):
    secrets.register("s3cr3t-value")
    obj = {"a": ["x s3cr3t-value", ("s3cr3t-value", 3)], "s3cr3t-value": {"n": None, "f": 1.5},
           "b": b"bytes s3cr3t-value", "u": "https://me:pw@host/p"}
    out = secrets.redact_obj(obj)
    assert out == {"a": ["x ***", ("***", 3)], "***": {"n": None, "f": 1.5}, "b": b"bytes ***",
                   "u": "https://***@host/p"}
    assert obj["a"][0] == "x s3cr3t-value"  # a copy: the input is untouched
    assert secrets.redact_obj(b"\xff\xfe") == b"\xff\xfe"


def test_manifest_secrets_stay_off_disk(monkeypatch, tmp_path):
    from curate import secrets as mod

    monkeypatch.setenv("HF_TOKEN", "hf_very_secret_0042")
    m = loads("name: t\ndescription: 'token ${HF_TOKEN} at https://bob:pw1@hub.example/x'\n"
              "source: {kind: jsonl, paths: ['/data/*.jsonl']}\nsink: {kind: parquet}\n", "m.yaml")
    assert "hf_very_secret_0042" in mod.SECRET_VALUES
    dumped = m.resolved_yaml()
    assert "hf_very_secret_0042" not in dumped and "pw1" not in dumped and "${HF_TOKEN}" in dumped
    # the in-memory form workers rebuild from keeps literal URL credentials (only known values and
    # ${VAR} templates are touched there)
    assert "bob:pw1@" in m.resolved()["description"]
    # index.json: column names are redacted; partition values are row data (like the rows themselves,
    # which a sink writes as they are), so they round-trip unchanged and name their folder
    sink = _sink("parquet", tmp_path, partition_by="part")
    w = sink.writer("00000")
    w.write(pa.RecordBatch.from_pydict({"part": ["ok"]}))
    index = write_index(sink, w.close(), ["part", "hf_very_secret_0042"])
    assert index["columns"] == ["part", "***"]
    assert "hf_very_secret_0042" not in (sink.directory / "index.json").read_text()


# ---------------------------------------------------------------------------------------- webdataset widths
def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_webdataset_keeps_integer_widths(tmp_path):
    import webdataset as wds

    from curate.inspect_output import samples
    from curate.schema import SEQUENCES

    rows = [{"id": f"s{i}", "input_ids": list(range(i * 100, i * 100 + 50 + i)),
             "loss_mask": [1, 0] * 25 + [1] * i, "doc_offsets": [0, 20], "n_tokens": 50 + i,
             "n_image_tokens": 0, "lineage": [f"d{i}"]} for i in range(300)]
    rows[3]["input_ids"] = [2**31 - 1, -2**31, 0]
    rows[3]["loss_mask"] = [255, 0, 1]
    batch = pa.RecordBatch.from_pylist(rows, schema=SEQUENCES)
    extra = pa.RecordBatch.from_pydict({
        "id": ["x0", "x1", "x2"],
        "big": pa.array([[2**62, -1], [], [5]], pa.list_(pa.int64())),
        "small": pa.array([[-128, 127], [1], [0]], pa.large_list(pa.int8())),
        "u16": pa.array([[65535], [0, 1], None], pa.list_(pa.uint16())),
        "holes": pa.array([[1, None], [2], [3]], pa.list_(pa.int32())),
    })
    for name, b, widths in (("seq", batch, {"input_ids": "<i4", "loss_mask": "|u1", "doc_offsets": "<i4"}),
                            ("extra", extra, {"big": "<i8", "small": "|i1", "u16": "<u2", "holes": "<i4"})):
        sink = _sink("webdataset", tmp_path / name)
        w = sink.writer("00000")
        w.write(b)
        tar = sink.directory / w.close()[0]["name"]
        wanted = b.to_pylist()
        got = list(wds.WebDataset(str(tar), shardshuffle=False).decode())
        assert len(got) == len(wanted)
        for sample, row in zip(got, wanted):
            for col, dtype in widths.items():
                if f"{col}.npy" in sample:
                    arr = sample[f"{col}.npy"]
                    assert arr.dtype == np.dtype(dtype) and arr.tolist() == row[col], (col, row["id"])
                else:  # null list or null elements: kept in json as they are
                    assert sample["json"][col] == row[col] and (row[col] is None or None in row[col])
        back = list(samples(tar))  # `curate inspect` reads the same values
        assert [{c: r[c] for c in widths} for r in back] == [{c: r[c] for c in widths} for r in wanted]
        members = _members(tar)
        for key, data in members.items():
            if key.endswith(".npy"):
                col = key.rsplit(".", 2)[-2]
                assert np.load(io.BytesIO(data)).dtype == np.dtype(widths[col])


def test_webdataset_tar_is_smaller_with_native_widths(tmp_path):
    """A packed output: int32 ids and uint8 masks take 4 + 1 bytes per token, not 8 + 8."""
    from curate.schema import SEQUENCES

    rng = np.random.default_rng(0)
    rows = [{"id": f"s{i}", "input_ids": rng.integers(0, 50_000, 4096).tolist(), "loss_mask": [1] * 4096,
             "doc_offsets": [0, 1000, 4096], "n_tokens": 4096, "n_image_tokens": 0, "lineage": ["a", "b"]}
            for i in range(20)]
    sink = _sink("webdataset", tmp_path)
    w = sink.writer("00000")
    w.write(pa.RecordBatch.from_pylist(rows, schema=SEQUENCES))
    size = w.close()[0]["bytes"]
    payload = 20 * 4096 * (4 + 1)  # int64 + int64 would be 20 * 4096 * 16
    assert payload < size < payload * 1.25  # plus tar headers, .npy headers, json and record padding


def test_a_secret_in_the_input_path_appears_nowhere_under_the_run_directory(tmp_path):
    """A ${VAR} secret in the input folder and file names, with bad records, a cut .gz, quarantine, a
    failed first attempt and three sinks: no file under the run directory, no file name, no console
    line and no decoded Parquet value holds it."""
    import gzip
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from tests.conftest import make_text, write_jsonl, write_manifest

    secret = "s3cr3t-T0ken-value"
    folder = tmp_path / f"in-{secret}"
    write_jsonl(folder / f"a-{secret}.jsonl", [{"text": make_text(i, 5 + i)} for i in range(20)] + ["{broken"])
    data = gzip.compress(b"".join(json.dumps({"text": make_text(i)}).encode() + b"\n" for i in range(30)))
    (folder / "b.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])  # cut short: a truncation record
    m = write_manifest(tmp_path / "m.yaml", """
        name: secretive
        source: {kind: jsonl, paths: ["${DATA_ROOT}/in-${MY_API_KEY}/*"]}
        stages:
          - heuristics: {min_words: 10, quarantine: true}
          - select: {top: {column: scores.heuristics.n_words, fraction: 0.5}}
        sink:
          - {kind: parquet}
          - {kind: jsonl}
          - {kind: webdataset}
        executor: {kind: local, workers: 1}
        """)
    env = {**os.environ, "MY_API_KEY": secret, "DATA_ROOT": str(tmp_path), "COLUMNS": "200"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "curate", "run", str(m), "-o", str(run), "--no-progress"]
    fault = json.dumps([{"point": "stage", "label": "heuristics", "shard": "00000", "action": "raise"}])
    first = subprocess.run(cmd, env={**env, "CURATE_FAULTS": fault}, capture_output=True, text=True)
    assert first.returncode == 1, first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "truncated_input" in second.stderr  # the damaged file is reported …
    for proc in (first, second):
        assert secret not in proc.stdout + proc.stderr  # … without the secret
    seen = 0
    for path in run.rglob("*"):
        assert secret not in str(path.relative_to(run))
        if path.is_file():
            seen += 1
            assert secret.encode() not in path.read_bytes(), path
            if path.suffix == ".parquet":
                assert secret not in json.dumps(pq.read_table(path).to_pylist(), default=str), path
    assert seen > 20
    assert (run / "failures").glob("*.jsonl") and (run / "quarantine" / "heuristics").is_dir()

"""Outputs under hostile ids, column names, values and paths: every row reads back through `datasets`,
`webdataset` and `curate inspect` with its id and text intact, or the sink names the column it cannot
write; sink paths that no filesystem or run directory can hold are refused when the manifest is read."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import glob
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import ConfigError
from curate.manifest import loads
from curate.plugins import kinds_of
from curate.sinks.base import write_index
from curate.sinks.paths import check_sink_path
from tests.conftest import cli, curate_run, write_jsonl, write_manifest

#: Ids that break naive key, file-name or glob handling; "dup" twice, and pairs that collide once
#: case-folded, percent-decoded or stripped of separators.
HOSTILE_IDS = ["a.b", "a.b.c", "A.B", "x/y", "x_y", "back\\slash", "..", ".", "nul\x00id", "new\nline",
               "tab\there", "sp ace", " lead", "trail ", "l" * 300, "é" * 200, "ünï日本", "e\u0301", "\u00e9",
               "dup", "dup", "Aa", "aa", "a%2Fb", "a/b", "-", "", "{1,2}", "*?[]", "[/x] [bold]", "pipe:cat",
               "file:///etc/passwd", "0", "1e5", "null", "true", "\u202eevil", "😀"]


def _rows() -> list[dict]:
    return [{"id": i, "text": f"Row {k}, an id of {len(i)} characters: ] [ \\ \x00 \n . / end.", "n": k}
            for k, i in enumerate(HOSTILE_IDS)]


def _sink(kind: str, root: Path, **params):
    cls = kinds_of("sink")[kind]
    return cls(cls.Params(**params), root)


def _write(kind: str, root: Path, batches, **params):
    sink = _sink(kind, root, **params)
    w = sink.writer("00000")
    try:
        for b in batches:
            w.write(b)
        files = w.close()
    except BaseException:
        w.abort()
        raise
    return sink, files


def _wds(paths):
    import webdataset as wds

    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode())


def _load(kind: str, files, cache: Path):
    import datasets

    return datasets.load_dataset(kind, data_files=[glob.escape(str(f)) for f in files], split="train",
                                 cache_dir=str(cache))


# ------------------------------------------------------------------------------ the real CLI, end to end
def test_hostile_ids_round_trip_through_every_sink_in_a_hostile_run_directory(tmp_path):
    rows = _rows()
    write_jsonl(tmp_path / "in" / "p.jsonl", rows)
    manifest = write_manifest(tmp_path / "m.yaml", f"""
        name: adv
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        sink:
          - {{kind: parquet, path: "out [1]*/données", shard_samples: 7}}
          - {{kind: webdataset, shard_samples: 5}}
          - {{kind: jsonl, compression: gzip}}
          - {{kind: arrow}}
          - {{kind: jsonl, path: by-id, partition_by: id}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "run dir é [x]*"
    proc = curate_run(manifest, run)
    assert proc.returncode == 0, proc.stderr
    ids, texts, n = [r["id"] for r in rows], [r["text"] for r in rows], len(rows)

    # every output stays inside the run directory, index.json counts every row
    for folder in ("out [1]*/données", "webdataset", "jsonl", "arrow", "by-id"):
        index = json.loads((run / folder / "index.json").read_text())
        assert index["total_samples"] == n, folder
        for shard in index["shards"]:
            assert (run / folder / shard["name"]).resolve().is_relative_to(run.resolve())

    pq_files = sorted((run / "out [1]*" / "données").glob("*.parquet"))
    assert len(pq_files) == 6
    ds = _load("parquet", pq_files, tmp_path / "cache")
    assert ds["id"] == ids and ds["text"] == texts

    js = _load("json", sorted((run / "jsonl").glob("*.jsonl.gz")), tmp_path / "cache")
    assert js["id"] == ids and js["text"] == texts

    table = pa.ipc.open_file(str(run / "arrow" / "00000-0000.arrow")).read_all()
    assert table.column("id").to_pylist() == ids

    tars = sorted((run / "webdataset").glob("*.tar"))
    got = _wds(tars)
    assert len(got) == n
    assert [g["json"]["id"] for g in got] == ids and [g["txt"] for g in got] == texts
    assert len({(g["__url__"], g["__key__"]) for g in got}) == n
    assert all("." not in g["__key__"] and "/" not in g["__key__"] for g in got)

    # one folder per distinct id (never outside the sink folder), the original id kept in index.json
    parts = json.loads((run / "by-id" / "index.json").read_text())["partitions"]
    assert sorted(v["value"] for v in parts.values()) == sorted(set(ids))
    assert parts[next(k for k, v in parts.items() if v["value"] == "dup")]["samples"] == 2
    for folder, info in parts.items():
        assert (run / "by-id" / folder).parent == run / "by-id" and len(folder.encode()) <= 255
        lines = (run / "by-id" / folder / "00000-0000.jsonl").read_text().splitlines()
        assert {json.loads(line)["id"] for line in lines} == {info["value"]}

    # curate inspect reads each of them back, ids shown as Python literals
    for folder in ("out [1]*/données", "webdataset", "jsonl", "arrow"):
        shown = cli("inspect", str(run / folder), "-n", str(n + 5), "--width", "20")
        assert shown.stdout.count("─ sample ") == n, folder
        for literal in ("'a.b'", "'x/y'", "'nul\\x00id'", "'new\\nline'", "'[/x] [bold]'", "'*?[]'"):
            assert literal in shown.stdout, (folder, literal)


def test_a_rerun_in_a_hostile_run_directory_resumes_to_the_same_bytes(tmp_path):
    write_jsonl(tmp_path / "in" / "p.jsonl", _rows())
    manifest = write_manifest(tmp_path / "m.yaml", f"""
        name: adv
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        sink:
          - {{kind: webdataset, path: "w*[ab]", shard_samples: 4}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "r [ab]* ü"
    assert curate_run(manifest, run).returncode == 0
    first = {p.name: p.read_bytes() for p in (run / "w*[ab]").iterdir()}
    (run / "w*[ab]" / "00000-0001.tar").unlink()  # a lost file and a temporary left by a kill
    (run / "w*[ab]" / ".tmp-00000-0003.tar").write_bytes(b"partial")
    (run / "completions").joinpath("p0-00000.json").unlink()
    again = curate_run(manifest, run)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in (run / "w*[ab]").iterdir()} == first


def test_run_and_stats_print_a_run_directory_that_looks_like_markup(tmp_path):
    write_jsonl(tmp_path / "in" / "p.jsonl", _rows()[:3])
    manifest = write_manifest(tmp_path / "m.yaml", f"""
        name: adv
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        sink: {{kind: parquet, path: "o[bold]"}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "r[/x]"
    proc = curate_run(manifest, run)
    assert (run / "o[bold]" / "index.json").exists()
    assert proc.returncode == 0, proc.stderr
    assert str(run / "o[bold]") in proc.stdout.replace("\n", "")
    assert cli("stats", str(run)).returncode == 0


def test_inspect_shows_text_that_looks_like_markup(tmp_path):
    sink, _ = _write("parquet", tmp_path, [pa.RecordBatch.from_pydict(
        {"id": ["[/x]"], "text": ["closing [/x] and [bold]not bold[/bold]"]})])
    write_index(sink, [{"name": "00000-0000.parquet", "samples": 1, "bytes": 0, "sha256": ""}], ["id", "text"])
    shown = cli("inspect", str(sink.directory), check=False)
    assert shown.returncode == 0, shown.stderr
    assert "[bold]not bold[/bold]" in shown.stdout


# ------------------------------------------------------------------------------ sinks directly
def test_long_and_binary_ids_across_many_files_keep_unique_keys(tmp_path):
    n = 600
    ids = [("é" * 150 + f"/{i}.x\x00" if i % 3 else f"dup.{i % 2}") for i in range(n)]
    batch = pa.RecordBatch.from_pydict({"id": ids, "text": [f"t{i}\n.{i}" for i in range(n)]})
    sink, files = _write("webdataset", tmp_path, [batch.slice(0, 250), batch.slice(250)], shard_samples=97)
    assert sum(f["samples"] for f in files) == n and len(files) == 7
    got = _wds(sink.directory / f["name"] for f in files)
    assert [g["json"]["id"] for g in got] == ids and [g["txt"] for g in got] == [f"t{i}\n.{i}" for i in range(n)]
    assert len({g["__key__"] for g in got}) == n


def test_integer_lists_with_hostile_column_names_stay_one_sample_each(tmp_path):
    """A column name is part of a member name: one that webdataset would split off as another sample
    ('/'), truncate (NUL), lower-case, leave undecoded ('__'), or that overflows a tar name goes into
    `json` instead."""
    names = ["tok.ids", "json", "txt", "ünï", "a b", "a/b", "A", "a\x00b", "new\nline", "c" * 120, "__key__"]
    n = 4
    cols = {"id": [f"r.{i}/x" for i in range(n)], "text": [f"text {i}" for i in range(n)]}
    for k, name in enumerate(names):
        cols[name] = pa.array([[k, i, -i] for i in range(n)], pa.list_(pa.int32()))
    sink, files = _write("webdataset", tmp_path, [pa.RecordBatch.from_pydict(cols)])
    got = _wds([sink.directory / files[0]["name"]])
    assert len(got) == n
    for i, g in enumerate(got):
        assert g["json"]["id"] == f"r.{i}/x" and g["txt"] == f"text {i}"
        for k, name in enumerate(names):
            if name in ("tok.ids", "json", "txt", "ünï", "a b"):
                assert g[f"{name}.npy"].tolist() == [k, i, -i] and str(g[f"{name}.npy"].dtype) == "int32", name
            else:
                assert g["json"][name] == [k, i, -i], name
    # the same rows through the other sinks, names intact (`datasets` itself cuts a name at NUL)
    del cols["a\x00b"]
    for kind in ("parquet", "jsonl"):
        sink, files = _write(kind, tmp_path / kind, [pa.RecordBatch.from_pydict(cols)])
        ds = _load("parquet" if kind == "parquet" else "json", [sink.directory / files[0]["name"]],
                   tmp_path / "cache")
        assert ds.num_rows == n and ds["a/b"][2] == [5, 2, -2] and ds["c" * 120][3] == [9, 3, -3], kind


def test_binary_columns_are_base64_in_json_sinks(tmp_path):
    raw = [b"\x00\xff", b"", None, "é".encode()]
    batch = pa.RecordBatch.from_pydict({"id": ["a", "b", "c", "d"], "text": ["x", "y", "z", "w"],
                                        "blob": pa.array(raw, pa.binary())})
    expect = [None if b is None else base64.b64encode(b).decode() for b in raw]
    sink, files = _write("webdataset", tmp_path / "w", [batch])
    assert [g["json"]["blob"] for g in _wds([sink.directory / files[0]["name"]])] == expect
    sink, files = _write("jsonl", tmp_path / "j", [batch])
    lines = (sink.directory / files[0]["name"]).read_text().splitlines()
    assert [json.loads(line)["blob"] for line in lines] == expect


@pytest.mark.parametrize("kind", ["jsonl", "webdataset"])
@pytest.mark.parametrize("column, array", [
    ("price", pa.array([decimal.Decimal("1.10"), None], pa.decimal128(5, 2))),
    ("wait", pa.array([dt.timedelta(seconds=3), None], pa.duration("s"))),
    ("deep", pa.array([{"d": decimal.Decimal("2")}, None], pa.struct([("d", pa.decimal128(4, 0))]))),
])
def test_a_value_json_cannot_hold_is_an_error_naming_the_column(tmp_path, kind, column, array):
    batch = pa.RecordBatch.from_pydict({"id": ["a", "b"], "text": ["x", "y"], column: array})
    with pytest.raises(TypeError, match=f"{kind} sink: column '{column}' \\("):
        _write(kind, tmp_path, [batch])
    assert not [p for p in (tmp_path / kind).iterdir() if p.name.startswith(".tmp-")]
    for other in ("parquet", "arrow"):  # the columnar formats hold them
        sink, files = _write(other, tmp_path / other, [batch])
        assert files[0]["samples"] == 2


def test_webdataset_keeps_a_meta_that_is_not_json_and_a_non_image_images_column(tmp_path):
    batch = pa.RecordBatch.from_pydict({
        "id": ["a", "b", "c", "d"], "text": ["x", "y", "z", "w"],
        "meta": ["not json", '{"k": [1, "two"]}', None, "NaN"],
        "images": pa.array([["cat.jpg", None], [], None, ["d"]], pa.list_(pa.string())),
    })
    sink, files = _write("webdataset", tmp_path, [batch])
    got = _wds([sink.directory / files[0]["name"]])
    assert [g["json"]["meta"] for g in got] == ["not json", {"k": [1, "two"]}, None, "NaN"]
    assert [g["json"]["images"] for g in got] == [["cat.jpg", None], [], None, ["d"]]
    assert [g["txt"] for g in got] == ["x", "y", "z", "w"]


def test_parquet_and_json_read_back_hostile_ids_and_texts_exactly(tmp_path):
    rows = _rows()
    batch = pa.RecordBatch.from_pylist([{"id": r["id"], "text": r["text"], "source": "s/..\\x", "meta": None}
                                        for r in rows])
    for kind, loader, params in (("parquet", "parquet", {}), ("jsonl", "json", {"compression": "zstd"}),
                                 ("jsonl", "json", {})):
        sink, files = _write(kind, tmp_path / f"{kind}{len(params)}", [batch], shard_samples=11)
        ds = _load(loader, [sink.directory / f["name"] for f in files], tmp_path / "cache")
        assert ds["id"] == [r["id"] for r in rows] and ds["text"] == [r["text"] for r in rows], kind
        assert set(ds["source"]) == {"s/..\\x"}


# ------------------------------------------------------------------------------ sink paths
@pytest.mark.parametrize("path", ["lock", "LOCK", "locks", "locks/p0", "Locks/x", "x" * 256, "ok/" + "é" * 128])
def test_sink_paths_a_run_directory_or_filesystem_cannot_hold_are_refused(path):
    with pytest.raises(ValueError):
        check_sink_path(path)
    text = (f"name: t\nsource: {{kind: jsonl, paths: [\"/data/*.jsonl\"]}}\n"
            f"sink:\n  - {{kind: parquet}}\n  - {{kind: jsonl, path: {json.dumps(path)}}}\n")
    with pytest.raises(ConfigError) as e:
        loads(text, "m.yaml")
    assert "m.yaml:5: sink[1] (jsonl).path: " in str(e.value)


@pytest.mark.parametrize("path", ["x" * 255, "é" * 127, "locked", "a/lock", "out [1]*?/{a,b}", "ünï/日本"])
def test_long_and_glob_like_sink_paths_are_written_inside_the_run(tmp_path, path):
    assert check_sink_path(path) == path
    run = tmp_path / "run [*]"
    sink, files = _write("parquet", run, [pa.RecordBatch.from_pydict({"id": ["a/b", "..", "x"],
                                                                      "text": ["1", "2", "3"]})],
                         path=path, partition_by="id")
    write_index(sink, files, ["id", "text"])
    assert sink.directory == run / path and (sink.directory / "index.json").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 7 and all(p.resolve().is_relative_to((run / path).resolve()) for p in written)
    assert sorted(pq.read_table(p).column("id")[0].as_py() for p in written if p.suffix == ".parquet") == \
        ["..", "a/b", "x"]


def test_a_run_with_a_sink_in_lock_is_refused_before_it_starts(tmp_path):
    write_jsonl(tmp_path / "in" / "p.jsonl", _rows()[:2])
    manifest = write_manifest(tmp_path / "m.yaml", f"""
        name: adv
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        sink: {{kind: parquet, path: lock}}
        """)
    proc = curate_run(manifest, tmp_path / "run")
    assert proc.returncode == 2 and "'lock' is curate's own entry of the run directory" in proc.stderr
    assert not (tmp_path / "run" / "completions").exists()


def test_an_image_list_without_mime_is_written_as_bin_members(tmp_path):
    """`datasets`' Image layout (bytes, path) has no mime: each image is a .bin member, none is lost."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    batch = pa.RecordBatch.from_pydict({"id": ["a"], "text": ["t"], "images": pa.array(
        [[{"bytes": b"\x89PNG-ish", "path": "x.png"}, None]], pa.list_(image))})
    sink, files = _write("webdataset", tmp_path, [batch])
    got = _wds(sink.directory / f["name"] for f in files)
    assert len(got) == 1 and got[0]["000.bin"] == b"\x89PNG-ish"
    assert got[0]["json"]["images"] == [{"file": "000.bin", "path": "x.png"}, None]

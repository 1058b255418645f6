"""Adversarial inputs for the readers: every bad record is named (file, line, field) or counted, never
dropped silently, and never a bare traceback.

Compressed files cut inside their first bytes and at every offset, damaged later bz2/xz streams, JSON
lines of every wrong shape, hostile ids and file names, columnar files with odd column types or names,
tars with repeated or unnamed members, and Arrow IPC files cut anywhere.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import json
import lzma
import tarfile
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from curate.errors import ConfigError
from curate.plugins import kinds_of
from tests.conftest import curate_run, make_text, write_manifest
from tests.test_readers import failures, read_all

DAMAGE = ("truncated_input", "corrupt_input", "unreadable_file")


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _lines(n: int, prefix: str = "r") -> bytes:
    return b"".join(orjson.dumps({"id": f"{prefix}{i}", "text": make_text(i, 3 + i % 9)}) + b"\n" for i in range(n))


COMPRESS = {
    "gz": lambda d: gzip.compress(d, mtime=0),
    "zst": lambda d: zstandard.ZstdCompressor().compress(d),
    "bz2": lambda d: bz2.compress(d, 1),
    "xz": lzma.compress,
}


def _reader(kind: str, **params):
    cls = kinds_of("source")[kind]
    return cls(cls.Params(**params))


# ------------------------------------------------------------------------------ JSON Lines: shapes
def test_wrong_text_and_id_types_name_line_and_field(tmp_path):
    lines = [
        {"id": "a", "text": "good one"},        # 1
        {"id": "b", "text": None},              # 2 null text: named as null, not as absent
        {"id": "c", "text": ["x", "y"]},        # 3
        {"id": "d", "text": 3.5},               # 4
        {"id": "e", "text": {"t": "x"}},        # 5
        {"id": "f", "text": True},              # 6
        {"id": None, "text": "null id"},        # 7
        {"text": "no id at all"},               # 8
        {"id": "g", "body": "no text"},         # 9
        {"id": "h", "text": "\u3000\t \n"},      # 10 only whitespace (ideographic space too)
        {"id": "i", "text": "good two"},        # 11
    ]
    path = _write(tmp_path / "t.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in lines))
    got, ctxs, rd = read_all("jsonl", tmp_path / "r", paths=[str(path)], id_field="id")
    assert [r["id"] for r in got] == ["a", "i"]
    fails = failures(rd)
    assert [(f["line"], f["reason"]) for f in fails] == [
        (2, "missing_text_field"), (3, "text_not_a_string"), (4, "text_not_a_string"), (5, "text_not_a_string"),
        (6, "text_not_a_string"), (7, "missing_id_field"), (8, "missing_id_field"), (9, "missing_text_field"),
        (10, "empty_text")]
    assert all(f["file"] == str(path) for f in fails)
    assert fails[0]["detail"] == "field 'text' is null"
    assert fails[1]["detail"] == "field 'text' is list"
    assert fails[5]["detail"] == "field 'id' is null" and fails[6]["detail"] == "no field 'id'"
    assert fails[7]["detail"] == "no field 'text'"
    assert dict(ctxs[0].stats["read"].drops) == {"missing_text_field": 2, "text_not_a_string": 4,
                                                  "missing_id_field": 2, "empty_text": 1}


@pytest.mark.parametrize("shard_bytes", [10**9, 64])
def test_crlf_bom_blank_and_non_object_lines_keep_exact_line_numbers(tmp_path, shard_bytes):
    rows = [b'\xef\xbb\xbf{"text": "first, after a BOM"}',  # 1
            b"",                                           # 2 blank
            b"   \t",                                      # 3 blank
            b"123",                                        # 4
            b"null",                                       # 5
            b'"just a string"',                            # 6
            b'[{"text": "in a list"}]',                    # 7
            b'{"text": "crlf kept \\r\\n inside"}',        # 8
            b"\xef\xbb\xbf" + b'{"text": "a BOM not at the start"}',  # 9
            b'{"text": "last"}']                           # 10
    path = _write(tmp_path / "crlf.jsonl", b"\r\n".join(rows) + b"\r\n")
    got, ctxs, rd = read_all("jsonl", tmp_path / "r", paths=[str(path)], shard_bytes=shard_bytes)
    assert [(r["id"], r["text"]) for r in got] == [
        ("crlf.jsonl:1", "first, after a BOM"), ("crlf.jsonl:8", "crlf kept \r\n inside"), ("crlf.jsonl:10", "last")]
    assert [(f["line"], f["reason"]) for f in failures(rd)] == [
        (4, "not_an_object"), (5, "not_an_object"), (6, "not_an_object"), (7, "not_an_object"), (9, "invalid_json")]
    assert sum(sum(c.stats["read"].drops.values()) for c in ctxs) == 5


def test_invalid_utf8_lone_surrogates_and_control_bytes(tmp_path):
    rows = [b'{"text": "ok \\u00e9 \\ud83d\\ude00"}',   # 1 escaped pair: fine
            b'{"text": "bad \xc3\x28 byte"}',            # 2 invalid UTF-8
            b'{"text": "cut \xe2\x82"}',                 # 3 a multi-byte char cut short
            b'{"text": "lone \\ud800 surrogate"}',      # 4 lone surrogate escape
            b'{"text": "ok", "m": "\\udfff"}',          # 5 lone surrogate in another field
            b"\x00\x00\x00",                             # 6 NUL bytes
            b'{"text": "nul \\u0000 escaped is text"}',  # 7 fine
            b'{"text": "raw \x01 control"}',             # 8 raw control char in a string: invalid JSON
            b'{"text": "overlong \xc0\xaf"}',            # 9 overlong encoding
            b'{"text": "end"}']                          # 10
    path = _write(tmp_path / "u.jsonl", b"\n".join(rows) + b"\n")
    got, _, rd = read_all("jsonl", tmp_path / "r", paths=[str(path)])
    assert [r["id"] for r in got] == ["u.jsonl:1", "u.jsonl:7", "u.jsonl:10"]
    assert got[0]["text"] == "ok é 😀" and got[1]["text"] == "nul \x00 escaped is text"
    fails = failures(rd)
    assert [(f["line"], f["reason"]) for f in fails] == [
        (2, "invalid_utf8"), (3, "invalid_utf8"), (4, "invalid_json"), (5, "invalid_json"), (6, "invalid_json"),
        (8, "invalid_json"), (9, "invalid_utf8")]
    assert fails[0]["record"] == '{"text": "bad \\xc3( byte"}'  # the raw bytes, escaped, in failures/


def test_a_huge_line_among_small_ones(tmp_path):
    big = "w" * (6 << 20)
    data = (orjson.dumps({"text": "small 1"}) + b"\n" + orjson.dumps({"text": big}) + b"\n"
            + b'{"text": "broken\n' + orjson.dumps({"text": "small 4"}) + b"\n")
    path = _write(tmp_path / "h.jsonl", data)
    for shard_bytes in (10**9, 1 << 20):  # the big line crosses several byte ranges
        got, _, rd = read_all("jsonl", tmp_path / f"r{shard_bytes}", paths=[str(path)], shard_bytes=shard_bytes,
                              batch_bytes=1000)
        assert [r["id"] for r in got] == ["h.jsonl:1", "h.jsonl:2", "h.jsonl:4"]
        assert got[1]["text"] == big
        assert [(f["line"], f["reason"]) for f in failures(rd)] == [(3, "invalid_json")]


# ---------------------------------------------------------------------- compressed JSON Lines: cuts
@pytest.mark.parametrize("codec", list(COMPRESS))
def test_compressed_file_cut_inside_its_magic_is_a_counted_truncation(tmp_path, codec):
    full = COMPRESS[codec](_lines(20))
    for n in range(1, 8):
        path = _write(tmp_path / str(n) / f"a.jsonl.{codec}", full[:n])
        got, _, rd = read_all("jsonl", tmp_path / f"r{n}", paths=[str(path)], id_field="id")  # no ConfigError
        fails = failures(rd)
        assert got == [] and len(fails) == 1, (n, fails)
        expected = ("corrupt_input", "truncated_input") if codec == "gz" and n == 1 else ("truncated_input",)
        assert fails[0]["reason"] in expected and fails[0]["file"] == str(path) and fails[0]["line"] == 0


@pytest.mark.parametrize("codec", list(COMPRESS))
def test_compressed_file_cut_at_every_offset(tmp_path, codec):
    data = _lines(40)
    full = COMPRESS[codec](data)
    ids = [orjson.loads(line)["id"] for line in data.splitlines()]
    step = max(1, len(full) // 60)
    for cut in range(1, len(full), step):
        path = _write(tmp_path / str(cut) / f"a.jsonl.{codec}", full[:cut])
        got, _, rd = read_all("jsonl", tmp_path / f"r{cut}", paths=[str(path)], id_field="id")
        got_ids = [r["id"] for r in got]
        assert got_ids == ids[:len(got_ids)], cut  # a prefix, each whole
        fails = failures(rd)
        assert len(fails) == 1 and fails[0]["reason"] in DAMAGE and fails[0]["file"] == str(path), (cut, fails)
        assert fails[0]["line"] == len(got_ids), cut  # the last whole line


@pytest.mark.parametrize("codec", ["bz2", "xz"])
def test_a_damaged_later_bz2_or_xz_stream_is_counted_not_dropped(tmp_path, codec):
    first, second = _lines(30, "a"), _lines(30, "b")
    compress = COMPRESS[codec]
    whole = compress(first) + compress(second)
    path = _write(tmp_path / "ok" / f"a.jsonl.{codec}", whole)
    got, _, rd = read_all("jsonl", tmp_path / "r-ok", paths=[str(path)], id_field="id")
    assert len(got) == 60 and failures(rd) == []  # every stream is read

    for name, damage in (("head", slice(0, 4)), ("body", slice(24, 40))):
        stream = bytearray(compress(second))
        stream[damage] = b"\x55" * (damage.stop - damage.start)
        path = _write(tmp_path / name / f"a.jsonl.{codec}", compress(first) + bytes(stream))
        got, _, rd = read_all("jsonl", tmp_path / f"r-{name}", paths=[str(path)], id_field="id")
        assert [r["id"] for r in got][:30] == [f"a{i}" for i in range(30)]
        fails = failures(rd)
        assert [f["reason"] for f in fails] == ["corrupt_input"], (name, fails)
        assert fails[0]["file"] == str(path) and fails[0]["line"] == len(got)

    path = _write(tmp_path / "junk" / f"a.jsonl.{codec}", whole + b"trailing junk")
    got, _, rd = read_all("jsonl", tmp_path / "r-junk", paths=[str(path)], id_field="id")
    assert len(got) == 60 and [f["reason"] for f in failures(rd)] == ["corrupt_input"]


def test_xz_stream_padding_is_not_damage(tmp_path):
    path = _write(tmp_path / "a.jsonl.xz", lzma.compress(_lines(10)) + bytes(8) + lzma.compress(_lines(5, "b")))
    got, _, rd = read_all("jsonl", tmp_path / "r", paths=[str(path)], id_field="id")
    assert len(got) == 15 and failures(rd) == []


# ---------------------------------------------------------------------------------- hostile ids
def test_hostile_ids_pass_through_unchanged_end_to_end(tmp_path):
    ids = ["a/b", "../../etc/passwd", "nul\x00byte", "new\nline", "tab\tand\rcr", "x" * 20_000, "é中😀",
           "dup", "dup", " ", "*?[]{}", "C:\\win\\path"]
    rows = [orjson.dumps({"id": i, "text": make_text(k)}) for k, i in enumerate(ids)]
    rows.insert(4, b'{"id": "bad-utf8", "text": "\xff"}')
    path = _write(tmp_path / "in" / "ids.jsonl", b"\n".join(rows) + b"\n")
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: ids
        source: {{kind: jsonl, paths: ["{path}"], id_field: id}}
        sink: [{{kind: parquet}}, {{kind: jsonl}}]
        executor: {{kind: local, workers: 1}}
        """)
    proc = curate_run(m, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert pq.read_table(sorted(run.glob("parquet/*.parquet"))).column("id").to_pylist() == ids
    jsonl_ids = [json.loads(line)["id"] for p in sorted(run.glob("jsonl/*.jsonl")) for line in p.open()]
    assert jsonl_ids == ids
    stats = json.loads((run / "stats.json").read_text())
    assert stats["duplicate_ids"] == {"rows": 1, "ids": 1}
    read = stats["stages"]["read"]
    assert read["drops"] == {"invalid_utf8": 1} and read["rows_out"] == len(ids)
    fail = json.loads((run / "failures" / "p0-00000.jsonl").read_text())
    assert fail["file"] == str(path) and fail["line"] == 5


# --------------------------------------------------------------------------------- hostile paths
NAMES = ["with space.jsonl", "ünï código 中.jsonl", "brackets[1].jsonl", "q?.jsonl", "star*.jsonl",
         "braces{a,b}.jsonl", "hash#pct%20.jsonl"]


def test_hostile_file_names_are_read_and_named_exactly(tmp_path):
    folder = tmp_path / "dir [x] {y}"
    for name in NAMES:
        _write(folder / name, orjson.dumps({"text": f"text of {name}"}) + b"\n" + b'{"text": broken\n')
    for name in NAMES:  # each file by its exact name
        path = folder / name
        got, _, rd = read_all("jsonl", tmp_path / f"one-{NAMES.index(name)}", paths=[str(path)])
        assert [(r["id"], r["text"]) for r in got] == [(f"{name}:1", f"text of {name}")]
        assert [(f["file"], f["line"]) for f in failures(rd)] == [(str(path), 2)]
    got, _, rd = read_all("jsonl", tmp_path / "all", paths=[str(folder)])  # the folder: every file once
    assert sorted(r["source"] for r in got) == sorted(NAMES)
    assert sorted(f["file"] for f in failures(rd)) == sorted(str(folder / n) for n in NAMES)


def test_a_pattern_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(ConfigError) as e:
        _reader("jsonl", paths=[str(tmp_path / "none [1]" / "*.jsonl")]).shards()
    assert "none [1]" in str(e.value)


# ------------------------------------------------------------------------------ Parquet and Arrow
def _arrow_bytes(table: pa.Table, stream: bool = False, chunk: int = 10) -> bytes:
    sink = pa.BufferOutputStream()
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with opener(sink, table.schema) as w:
        w.write_table(table, max_chunksize=chunk)
    return sink.getvalue().to_pybytes()


def _both(tmp_path: Path, table: pa.Table, name: str) -> list[tuple[str, Path]]:
    pq.write_table(table, _write(tmp_path / name / "a.parquet", b""))
    arrow = _write(tmp_path / name / "a.arrow", _arrow_bytes(table))
    return [("parquet", tmp_path / name / "a.parquet"), ("arrow", arrow)]


@pytest.mark.parametrize("kind", [pa.list_(pa.int64()), pa.struct([("a", pa.int64())]),
                                  pa.map_(pa.string(), pa.int64())])
def test_an_id_column_with_no_text_form_is_a_config_error(tmp_path, kind):
    values = {"list": [[1], [2]], "struct": [{"a": 1}, {"a": 2}], "map": [[("k", 1)], [("k", 2)]]}
    table = pa.table({"text": ["a", "b"], "doc": pa.array(values[str(kind).split("<")[0]], kind)})
    for reader_kind, path in _both(tmp_path, table, "t"):
        with pytest.raises(ConfigError) as e:
            _reader(reader_kind, paths=[str(path)], id_field="doc").shards()
        assert str(path) in str(e.value) and "source.id_field" in str(e.value) and "'doc'" in str(e.value)
    with pytest.raises(ConfigError):
        _reader("parquet", paths=[str(tmp_path / "t" / "a.parquet")], id_field="doc", schema="table").shards()


def test_duplicate_column_names_are_a_config_error(tmp_path):
    for i, names in enumerate((["text", "text"], ["text", "x", "x"])):
        table = pa.Table.from_arrays([pa.array(["a", "b"])] * len(names), names=names)
        for reader_kind, path in _both(tmp_path, table, f"d{i}"):
            with pytest.raises(ConfigError) as e:
                _reader(reader_kind, paths=[str(path)]).shards()
            assert str(path) in str(e.value) and "more than once" in str(e.value)
    # a repeated column that is not read does not matter
    table = pa.Table.from_arrays([pa.array(["a", "b"])] * 3, names=["text", "x", "x"])
    for reader_kind, path in _both(tmp_path, table, "d9"):
        got, _, _ = read_all(reader_kind, tmp_path / f"r9{reader_kind}", paths=[str(path)], meta_fields=[])
        assert [r["text"] for r in got] == ["a", "b"]


def test_binary_meta_columns_are_base64_not_a_crash(tmp_path):
    table = pa.table({"text": ["a", "b", "c"], "jpg": [b"\xff\xd8\x00", None, b""],
                      "parts": pa.array([[b"\x01"], [], None], pa.list_(pa.binary())), "n": [1, 2, 3]})
    for reader_kind, path in _both(tmp_path, table, "b"):
        got, _, rd = read_all(reader_kind, tmp_path / f"r{reader_kind}", paths=[str(path)])
        assert [json.loads(r["meta"]) for r in got] == [
            {"jpg": base64.b64encode(b"\xff\xd8\x00").decode(), "n": 1, "parts": ["AQ=="]},
            {"jpg": None, "n": 2, "parts": []}, {"jpg": "", "n": 3, "parts": None}]
        assert failures(rd) == []


def test_columns_named_like_curates_own_keep_their_values(tmp_path):
    table = pa.table({"text": ["a", "b"], "source": [7, 8], "scores": [0.5, 0.25], "meta": ["free text", None],
                      "lang": ["en", "fr"]})
    for reader_kind, path in _both(tmp_path, table, "o"):
        got, _, _ = read_all(reader_kind, tmp_path / f"r{reader_kind}", paths=[str(path)])
        assert [r["source"] for r in got] == ["a." + reader_kind] * 2
        assert [json.loads(r["meta"]) for r in got] == [
            {"source": 7, "scores": 0.5, "meta": "free text", "lang": "en"},
            {"source": 8, "scores": 0.25, "lang": "fr"}]


def test_a_meta_string_column_that_is_not_a_json_object_is_kept(tmp_path):
    table = pa.table({"text": ["a", "b", "c", "d"], "meta": ['{"k": 1}', "[1, 2]", "not json", None],
                      "x": [1, 2, 3, 4]})
    for reader_kind, path in _both(tmp_path, table, "m"):
        got, _, _ = read_all(reader_kind, tmp_path / f"r{reader_kind}", paths=[str(path)])
        assert [json.loads(r["meta"]) for r in got] == [
            {"k": 1, "x": 1}, {"meta": "[1, 2]", "x": 2}, {"meta": "not json", "x": 3}, {"x": 4}]


def test_a_null_or_blank_text_row_in_every_batch_is_counted_by_row(tmp_path):
    texts = [make_text(i) if i % 7 else (None if i % 2 else " \n") for i in range(60)]
    table = pa.table({"text": texts})
    for reader_kind, path in _both(tmp_path, table, "n"):
        got, ctxs, rd = read_all(reader_kind, tmp_path / f"r{reader_kind}", paths=[str(path)], batch_rows=8)
        bad = [i for i, t in enumerate(texts) if not (t or "").strip()]
        assert [r["id"] for r in got] == [f"a.{reader_kind}:{i}" for i in range(60) if i not in bad]
        assert [f["line"] for f in failures(rd)] == bad
        assert sum(ctxs[0].stats["read"].drops.values()) == len(bad)


@pytest.mark.parametrize("stream", [False, True])
def test_arrow_ipc_cut_at_many_offsets_never_crashes(tmp_path, stream):
    texts = [make_text(i, 5) for i in range(60)]
    data = _arrow_bytes(pa.table({"text": texts}), stream=stream)
    for cut in range(0, len(data), max(1, len(data) // 50)):
        path = _write(tmp_path / str(cut) / "a.arrow", data[:cut])
        try:
            got, _, rd = read_all("arrow", tmp_path / f"r{cut}", paths=[str(path)])
        except ConfigError as e:  # no readable schema: named at listing
            assert str(path) in str(e)
            continue
        assert [r["text"] for r in got] == texts[:len(got)], cut
        fails = failures(rd)
        assert len(fails) <= 1 and all(f["reason"] == "unreadable_file" and f["file"] == str(path) for f in fails)
        if fails and got:
            assert fails[0]["line"] == len(got) - 1


def test_parquet_cut_at_many_offsets_is_named(tmp_path):
    table = pa.table({"text": [make_text(i) for i in range(200)]})
    pq.write_table(table, tmp_path / "full.parquet", row_group_size=50)
    data = (tmp_path / "full.parquet").read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 40)):
        path = _write(tmp_path / str(cut) / "a.parquet", data[:cut])
        with pytest.raises(ConfigError) as e:
            _reader("parquet", paths=[str(path)]).shards()
        assert str(path) in str(e.value)


def test_binary_ids_that_are_not_utf8_fail_alone_with_their_row(tmp_path):
    """A binary id column with bytes that are not UTF-8 costs only those rows (``invalid_utf8`` with the
    row), not the rest of their batch or row group; null ids stay ``missing_id_field``."""
    raw = [f"id{i}".encode() for i in range(20)]
    raw[3], raw[12], raw[13], raw[19] = b"\xff", b"ok\xc3", None, b"\xed\xa0\x80"  # bad, cut, null, surrogate
    table = pa.table({"text": [make_text(i) for i in range(20)], "doc": pa.array(raw, pa.binary())})
    arrow = _write(tmp_path / "a.arrow", _arrow_bytes(table, chunk=10))
    parquet = tmp_path / "b.parquet"
    pq.write_table(table, parquet, row_group_size=20)
    dictionary = tmp_path / "c.parquet"  # read back as a dictionary of binary values
    pq.write_table(table.set_column(1, "doc", table.column("doc").dictionary_encode()), dictionary)
    views = [("parquet", dictionary)]
    if hasattr(pa, "binary_view"):
        viewed = table.set_column(1, "doc", table.column("doc").cast(pa.binary_view()))
        views.append(("arrow", _write(tmp_path / "d.arrow", _arrow_bytes(viewed, chunk=20))))
    for kind, path in (("arrow", arrow), ("parquet", parquet), *views):
        got, _, rd = read_all(kind, tmp_path / path.stem, paths=[str(path)], id_field="doc")
        assert [r["id"] for r in got] == [f"id{i}" for i in range(20) if i not in (3, 12, 13, 19)], path
        assert [(f["reason"], f["line"]) for f in failures(rd)] == [
            ("invalid_utf8", 3), ("invalid_utf8", 12), ("missing_id_field", 13), ("invalid_utf8", 19)], path


# ----------------------------------------------------------------------------------- WebDataset
def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_repeated_member_starts_a_new_sample_instead_of_overwriting(tmp_path):
    path = _write(tmp_path / "a.tar", _tar([("s0.txt", b"first"), ("s0.json", b'{"n": 0}'), ("s0.txt", b"second"),
                                            ("s1.txt", b"third"), ("s1.TXT", b"fourth")]))
    got, _, rd = read_all("webdataset", tmp_path / "r", paths=[str(path)])
    assert [(r["id"], r["text"]) for r in got] == [("a.tar:s0", "first"), ("a.tar:s0", "second"),
                                                   ("a.tar:s1", "third"), ("a.tar:s1", "fourth")]
    assert json.loads(got[0]["meta"]) == {"n": 0} and got[1]["meta"] is None and failures(rd) == []


def test_members_that_are_not_key_dot_ext_are_counted(tmp_path):
    path = _write(tmp_path / "a.tar", _tar([("README", b"about"), ("s0.txt", b"zero"), ("._s0.txt", b"\x00\x05"),
                                            ("d/.hidden", b"x"), ("é 中/s1.txt", b"one")]))
    got, ctxs, rd = read_all("webdataset", tmp_path / "r", paths=[str(path)])
    assert [(r["id"], r["text"]) for r in got] == [("a.tar:s0", "zero"), ("a.tar:é 中/s1", "one")]
    assert ctxs[0].stats["read"].metrics["members_ignored"].count == 2  # README, ._s0.txt
    assert [(f["line"], f["reason"]) for f in failures(rd)] == [(1, "missing_text_field")]  # sample "d/"


def test_tar_text_members_of_every_bad_kind(tmp_path):
    path = _write(tmp_path / "a.tar", _tar([
        ("s0.txt", b"fine"), ("s1.txt", b"bad \xff utf8"), ("s2.txt", b" \n\t "), ("s3.json", b'{"only": "meta"}'),
        ("s4.txt", b"t"), ("s4.json", b"\xff"), ("s5.txt", b"t"), ("s5.json", b"null"), ("s6.txt", b"last")]))
    got, ctxs, rd = read_all("webdataset", tmp_path / "r", paths=[str(path)])
    assert [r["text"] for r in got] == ["fine", "last"]
    assert [(f["line"], f["reason"]) for f in failures(rd)] == [
        (1, "invalid_utf8"), (2, "empty_text"), (3, "missing_text_field"), (4, "invalid_json"), (5, "not_an_object")]
    assert all(f["file"] == str(path) for f in failures(rd))
    assert sum(ctxs[0].stats["read"].drops.values()) == 5


@pytest.mark.parametrize("mode", ["", "gz", "bz2", "xz"])
def test_tar_cut_at_many_offsets_keeps_a_prefix_and_counts_the_cut(tmp_path, mode):
    members = [(f"s{i:03d}.{ext}", (make_text(i, 30).encode() if ext == "txt" else b'{"n": %d}' % i))
               for i in range(40) for ext in ("txt", "json")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{mode}" if mode else "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    full = buf.getvalue()
    suffix = f".tar.{mode}" if mode else ".tar"
    texts = [make_text(i, 30) for i in range(40)]
    for cut in range(1, len(full), max(1, len(full) // 40)):
        path = _write(tmp_path / str(cut) / f"a{suffix}", full[:cut])
        try:
            got, _, rd = read_all("webdataset", tmp_path / f"r{cut}", paths=[str(path)])
        except ConfigError as e:  # too short to be a tar (or its compression) at all
            assert str(path) in str(e) and cut < 512
            continue
        assert [r["text"] for r in got] == texts[:len(got)], cut
        fails = failures(rd)
        if len(got) < 40:
            assert len(fails) == 1 and fails[0]["reason"] in DAMAGE and fails[0]["file"] == str(path), (cut, fails)


def test_a_multi_member_tar_gz_is_read_to_its_end_and_its_cuts_counted(tmp_path):
    """bgzip / ``pigz -i`` / concatenated ``.tar.gz`` parts: one gzip member after another. Every sample
    is read (tarfile's own gzip stream stops after the first member); a cut inside a later member is a
    counted truncation with every whole sample before it kept."""
    plain = _tar([(f"s{i:03d}.{ext}", (make_text(i, 30).encode() if ext == "txt" else b'{"n": %d}' % i))
                  for i in range(60) for ext in ("txt", "json")])
    parts = [plain[a:a + 4096] for a in range(0, len(plain), 4096)]  # members split anywhere, even mid-header
    multi = b"".join(gzip.compress(part) for part in parts)
    texts = [make_text(i, 30) for i in range(60)]
    path = _write(tmp_path / "whole" / "a.tar.gz", multi)
    got, _, rd = read_all("webdataset", tmp_path / "r", paths=[str(path)])
    assert [r["text"] for r in got] == texts
    assert failures(rd) == []
    for cut in (len(multi) // 3, len(multi) * 2 // 3):
        path = _write(tmp_path / str(cut) / "a.tar.gz", multi[:cut])
        got, _, rd = read_all("webdataset", tmp_path / f"r{cut}", paths=[str(path)])
        assert 0 < len(got) < 60 and [r["text"] for r in got] == texts[:len(got)]
        fails = failures(rd)
        assert len(fails) == 1 and fails[0]["reason"] == "truncated_input" and fails[0]["file"] == str(path)
    junk = _write(tmp_path / "junk" / "a.tar.gz", multi[:len(multi) // 2] + b"\x1f\x8bnot gzip at all" * 4)
    got, _, rd = read_all("webdataset", tmp_path / "rj", paths=[str(junk)])
    assert [r["text"] for r in got] == texts[:len(got)] and len(got) < 60
    assert [f["reason"] for f in failures(rd)] in (["corrupt_input"], ["truncated_input"])


# ------------------------------------------------------------------------------------ end to end
def test_a_mixed_bad_corpus_end_to_end_counts_every_record(tmp_path):
    folder = tmp_path / "in put [1]"
    good = _lines(50)
    _write(folder / "plain.jsonl", good[:-7])  # cut inside the last line
    _write(folder / "a.jsonl.gz", gzip.compress(good)[:-20])
    _write(folder / "b.jsonl.bz2", bz2.compress(good) + b"junk")
    _write(folder / "c.jsonl.zst", zstandard.ZstdCompressor().compress(b"\r\n".join(
        [b'{"id": "z0", "text": "fine"}', b'{"id": "z1", "text": null}', b"[]", b'{"id": "z2", "text": "\xfe"}',
         b"", b'{"id": "z3", "text": "also fine"}']) + b"\r\n"))
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: mixed
        source: {{kind: jsonl, paths: ["{folder}"], id_field: id}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "run"
    proc = curate_run(m, run)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    fails = [json.loads(line) for p in sorted((run / "failures").glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    by_file = sorted((Path(f["file"]).name, f["reason"]) for f in fails)
    assert by_file == [("a.jsonl.gz", "truncated_input"), ("b.jsonl.bz2", "corrupt_input"),
                       ("c.jsonl.zst", "invalid_utf8"), ("c.jsonl.zst", "missing_text_field"),
                       ("c.jsonl.zst", "not_an_object"), ("plain.jsonl", "truncated_input")]
    assert all(f["file"].startswith(str(folder)) and f["line"] is not None for f in fails)
    read = json.loads((run / "stats.json").read_text())["stages"]["read"]
    out = pq.read_table(sorted(run.glob("parquet/*.parquet"))).column("id").to_pylist()
    assert read["rows_out"] == len(out) and {"z0", "z3"} <= set(out) and out.count("r0") == 3
    assert read["rows_in"] - read["rows_out"] == sum(read["drops"].values())


@pytest.mark.parametrize("bulk", [True, False])
def test_integer_ids_beyond_64_bits_stay_exact(tmp_path, monkeypatch, bulk):
    """orjson reads such integers as floats: two ids differing in their last digit would collide."""
    import curate.readers.jsonl as jsonl_module

    monkeypatch.setattr(jsonl_module, "_BULK", bulk)
    big = [123456789012345678901234567890, 123456789012345678901234567891, -(2 ** 70), 2 ** 64, 7, 1.5]
    path = _write(tmp_path / "big.jsonl", "".join(json.dumps({"id": v, "text": f"doc {i}"}) + "\n"
                                                  for i, v in enumerate(big)).encode())
    got, _, _ = read_all("jsonl", tmp_path / "r", paths=[str(path)], id_field="id")
    assert [r["id"] for r in got] == [str(v) for v in big]


def test_utf16_and_bare_cr_files_are_named_before_the_run(tmp_path):
    """Both would read as garbage or as one huge line: refused up front with what to do about them."""
    lines = "".join(json.dumps({"id": f"r{i}", "text": f"doc {i}"}) + "\n" for i in range(3))
    for name, data, words in (("le.jsonl", lines.encode("utf-16"), "UTF-16"),
                              ("be.jsonl", lines.encode("utf-16-be"), "UTF-16"),
                              ("cr.jsonl", lines.replace("\n", "\r").encode(), "bare CR")):
        path = _write(tmp_path / name, data)
        with pytest.raises(ConfigError, match=words) as err:
            _reader("jsonl", paths=[str(path)]).shards()
        assert str(path) in str(err.value)
    one = _write(tmp_path / "one.jsonl", b'{"id": "a", "text": "one record"}\r')  # a single record: fine
    assert [r["text"] for r in read_all("jsonl", tmp_path / "r", paths=[str(one)])[0]] == ["one record"]

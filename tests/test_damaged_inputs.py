"""Damaged and odd inputs: every whole record before the damage is kept, the damage is named or counted.

Real files cut at random offsets (several seeds per format), corrupt and empty files, files of the wrong
kind, null ids, malformed WebDataset members, byte-order marks, and the cost of byte-range shards.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
import zlib
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from curate.context import RunContext
from curate.errors import ConfigError
from curate.plugins import kinds_of
from curate.rundir import RunDir
from tests.conftest import cli, make_text, write_jsonl, write_manifest
from tests.test_readers import failures, read_all

SEEDS = range(5)


# ------------------------------------------------------------------------------------------ inputs
def _records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"r{i}", "text": make_text(i, rng.randint(3, 60))} for i in range(n)]


def _jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def _compress(data: bytes, codec: str) -> bytes:
    return gzip.compress(data, mtime=0) if codec == "gz" else zstandard.ZstdCompressor().compress(data)


def _decodable_prefix(cut: bytes, codec: str) -> bytes:
    """What an independent decoder gets out of a cut stream before it runs out of input."""
    if codec == "gz":
        return zlib.decompressobj(31).decompress(cut)
    return zstandard.ZstdDecompressor().decompressobj().decompress(cut)


def _whole_ids(prefix: bytes) -> list[str]:
    """Ids of the records whose line (with its newline) lies entirely in ``prefix``."""
    whole = prefix[:prefix.rfind(b"\n") + 1]
    return [orjson.loads(line)["id"] for line in whole.splitlines() if line.strip()]


def _mid_line_cut(data: bytes, rng: random.Random) -> int:
    """A cut strictly inside a line that leaves at least its closing brace out."""
    while True:
        cut = rng.randint(len(data) // 10, len(data) - 2)
        if data[cut - 1:cut] != b"\n" and data[cut:cut + 1] != b"\n":
            return cut


def _tar_bytes(samples: list[dict]) -> tuple[bytes, list[tuple[str, int, int]]]:
    """A tar of ``samples`` and, per member, ``(key, header offset, data end)``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext, data in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = [(m.name.split(".")[0], m.offset, m.offset_data + m.size) for m in tf.getmembers()]
    return data, members


def _samples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"__key__": f"s{i:04d}", "txt": make_text(i, rng.randint(5, 150)).encode(),
             "json": json.dumps({"n": i}).encode()} for i in range(n)]


def _only(rd: RunDir, reason: str) -> dict:
    found = [f for f in failures(rd) if f["reason"] == reason]
    assert len(found) == 1, failures(rd)
    return found[0]


def _reader(kind: str, **params):
    cls = kinds_of("source")[kind]
    return cls(cls.Params(**params))


# ------------------------------------------------------------------- 1. truncated compressed JSONL
@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_cut_compressed_jsonl_keeps_every_whole_record(tmp_path, codec):
    for seed in SEEDS:
        rng = random.Random(seed)
        data = _jsonl_bytes(_records(1500, seed))
        full = _compress(data, codec)
        cut = full[:rng.randint(40, len(full) - 8)]
        path = write_bytes(tmp_path / f"s{seed}" / f"a.jsonl.{codec}", cut)
        got, ctxs, rd = read_all("jsonl", tmp_path / f"r{seed}", paths=[str(path)], id_field="id")
        prefix = _decodable_prefix(cut, codec)
        expected = _whole_ids(prefix)
        assert [r["id"] for r in got] == expected, seed
        fail = _only(rd, "truncated_input")
        assert fail["file"] == str(path) and fail["offset"] == len(cut)
        assert fail["line"] == prefix.count(b"\n")  # the last whole line
        partial = prefix[prefix.rfind(b"\n") + 1:]
        assert fail["lost"] == (1 if partial.strip() else None)
        assert fail["record"] == (partial.decode(errors="backslashreplace") if partial.strip() else None)
        assert [f["reason"] for f in failures(rd)] == ["truncated_input"]  # never an invalid_json
        assert dict(ctxs[0].stats["read"].drops) == {"truncated_input": 1}


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_plain_jsonl_cut_mid_line_is_a_truncation_not_invalid_json(tmp_path):
    for seed in SEEDS:
        rng = random.Random(seed)
        data = _jsonl_bytes(_records(400, seed))
        cut = _mid_line_cut(data, rng)
        path = write_bytes(tmp_path / f"s{seed}" / "a.jsonl", data[:cut])
        for shard_bytes in (10**9, 2048):  # one shard, and byte ranges (the last one holds the cut)
            got, _, rd = read_all("jsonl", tmp_path / f"r{seed}-{shard_bytes}", paths=[str(path)],
                                  id_field="id", shard_bytes=shard_bytes)
            assert [r["id"] for r in got] == _whole_ids(data[:cut])
            fail = _only(rd, "truncated_input")
            assert fail["file"] == str(path) and fail["offset"] == cut and fail["lost"] == 1
            assert fail["line"] == data[:cut].count(b"\n")
            assert len(failures(rd)) == 1


def test_whole_last_line_without_newline_is_a_record(tmp_path):
    data = _jsonl_bytes(_records(5, 0))[:-1]
    path = write_bytes(tmp_path / "a.jsonl", data)
    got, _, rd = read_all("jsonl", tmp_path / "r", paths=[str(path)], id_field="id")
    assert [r["id"] for r in got] == [f"r{i}" for i in range(5)] and failures(rd) == []


def test_corrupt_and_multi_frame_zstd(tmp_path):
    data = _jsonl_bytes(_records(600, 1))
    half = data.rfind(b"\n", 0, len(data) // 2) + 1
    cctx = zstandard.ZstdCompressor()
    frames = cctx.compress(data[:half]) + cctx.compress(data[half:])
    path = write_bytes(tmp_path / "two" / "a.jsonl.zst", frames)
    got, _, rd = read_all("jsonl", tmp_path / "r1", paths=[str(path)], id_field="id")
    assert len(got) == 600 and failures(rd) == []  # every frame, not only the first

    frame = bytearray(cctx.compress(data))
    frame[len(frame) // 2:len(frame) // 2 + 64] = bytes(64)
    path = write_bytes(tmp_path / "bad" / "a.jsonl.zst", bytes(frame))
    got, _, rd = read_all("jsonl", tmp_path / "r2", paths=[str(path)], id_field="id")
    fail = _only(rd, "corrupt_input")
    assert fail["file"] == str(path) and fail["offset"] is not None and len(got) < 600
    assert [r["id"] for r in got] == [f"r{i}" for i in range(len(got))]


def test_cut_compressed_and_plain_jsonl_end_to_end(tmp_path):
    """Through the CLI: exit 0, whole records kept, truncations in failures/, stats add up."""
    folder = tmp_path / "in"
    expected: list[str] = []
    for n, codec in enumerate(("gz", "zst")):
        data = _jsonl_bytes([{**r, "id": f"{codec}{r['id']}"} for r in _records(3000, n)])
        full = _compress(data, codec)
        cut = full[:len(full) * 3 // 5]
        write_bytes(folder / f"{codec}.jsonl.{codec}", cut)
        prefix = _decodable_prefix(cut, codec)
        assert prefix[prefix.rfind(b"\n") + 1:].strip()  # a partial line is cut
        expected += _whole_ids(prefix)
    data = _jsonl_bytes([{**r, "id": f"plain{r['id']}"} for r in _records(300, 9)])
    cut = _mid_line_cut(data, random.Random(3))
    write_bytes(folder / "plain.jsonl", data[:cut])
    expected += _whole_ids(data[:cut])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: cut
        source: {{kind: jsonl, paths: ["{folder}/*"], id_field: id, shard_bytes: 4096}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress")
    out = pq.read_table(sorted(run.glob("parquet/*.parquet"))).column("id").to_pylist()
    assert sorted(out) == sorted(expected)
    fails = [json.loads(line) for p in sorted((run / "failures").glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    assert sorted(Path(f["file"]).name for f in fails) == ["gz.jsonl.gz", "plain.jsonl", "zst.jsonl.zst"]
    assert all(f["reason"] == "truncated_input" and f["offset"] > 0 and f["lost"] == 1 for f in fails)
    read = json.loads((run / "stats.json").read_text())["stages"]["read"]
    assert read["drops"] == {"truncated_input": 3}
    assert read["rows_out"] == len(expected)
    assert read["rows_in"] - read["rows_out"] == sum(read["drops"].values())


# -------------------------------------------------------------------------------- truncated tars
def test_cut_tar_keeps_every_sample_it_can_tell_is_whole(tmp_path):
    samples = _samples(120, 0)
    data, members = _tar_bytes(samples)
    keys = [s["__key__"] for s in samples]
    first_header = {}
    for key, offset, _ in members:
        first_header.setdefault(key, offset)
    data_end = {key: end for key, _, end in members}
    for seed in SEEDS:
        rng = random.Random(seed)
        for cut in (rng.randint(1024, len(data) - 2048), rng.randint(1024, len(data) - 2048)):
            path = write_bytes(tmp_path / f"s{seed}-{cut}" / "a.tar", data[:cut])
            got, _, rd = read_all("webdataset", tmp_path / f"r{seed}-{cut}", paths=[str(path)])
            got_keys = [r["id"].split(":", 1)[1] for r in got]
            # kept: a prefix of the samples, each whole; sure to be kept: each followed by a whole header
            assert got_keys == keys[:len(got_keys)]
            assert all(data_end[k] <= cut for k in got_keys)
            sure = [k for i, k in enumerate(keys[:-1]) if first_header[keys[i + 1]] + 512 <= cut]
            assert got_keys[:len(sure)] == sure and len(got_keys) - len(sure) <= 1
            assert [r["text"] for r in got] == [s["txt"].decode() for s in samples[:len(got)]]
            fail = _only(rd, "truncated_input")
            assert fail["file"] == str(path) and fail["offset"] == cut
            assert fail["line"] == len(got) - 1
            whole_by_data = [k for k in keys if data_end[k] <= cut]
            if len(whole_by_data) > len(got):  # a whole sample not kept is counted as lost
                assert fail["lost"] == 1


def test_cut_tar_end_to_end(tmp_path):
    samples = _samples(60, 4)
    data, members = _tar_bytes(samples)
    key, offset, end = next(m for m in members[len(members) // 2:] if m[2] - m[1] > 600)
    cut = offset + 512 + (end - offset - 512) // 2  # inside the data of a member
    write_bytes(tmp_path / "in" / "a.tar", data[:cut])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: tarcut
        source: {{kind: webdataset, paths: ["{tmp_path}/in/*.tar"]}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress")
    out = pq.read_table(sorted(run.glob("parquet/*.parquet"))).column("text").to_pylist()
    whole = sorted({k for k, _, end in members if end <= cut})
    assert out == [s["txt"].decode() for s in samples if s["__key__"] in whole][:len(out)]
    assert len(whole) - len(out) <= 1
    fail = json.loads((run / "failures" / "p0-00000.jsonl").read_text().splitlines()[0])
    assert fail["reason"] == "truncated_input" and fail["file"].endswith("a.tar") and fail["offset"] == cut
    read = json.loads((run / "stats.json").read_text())["stages"]["read"]
    assert read["rows_in"] - read["rows_out"] == sum(read["drops"].values()) >= 1


def test_tar_cut_in_its_end_block_loses_nothing(tmp_path):
    samples = _samples(10, 2)
    data, members = _tar_bytes(samples)
    cut = max(end for _, _, end in members)
    cut += -cut % 512 + 100  # 100 bytes into the end-of-archive block
    path = write_bytes(tmp_path / "a.tar", data[:cut])
    got, _, rd = read_all("webdataset", tmp_path / "r", paths=[str(path)])
    assert len(got) == 10
    fail = _only(rd, "truncated_input")
    assert fail["lost"] == 0 and fail["line"] == 9


# ----------------------------------------------------------------- 2. empty or unreadable files
def test_empty_and_corrupt_columnar_files_and_tars_name_the_file(tmp_path):
    table = pa.table({"text": [make_text(i) for i in range(50)]})
    pq.write_table(table, tmp_path / "good.parquet")
    good_parquet = (tmp_path / "good.parquet").read_bytes()
    cases = {
        ("parquet", "empty.parquet"): b"",
        ("parquet", "footer.parquet"): good_parquet[:-12] + b"garbage!PAR1",
        ("parquet", "cut.parquet"): good_parquet[:len(good_parquet) // 2],
        ("arrow", "empty.arrow"): b"",
        ("arrow", "cut.arrow"): _arrow_file(table)[:200],
        ("webdataset", "empty.tar"): b"",
        ("webdataset", "garbage.tar"): b"x" * 2048,
    }
    for (kind, name), content in cases.items():
        path = write_bytes(tmp_path / kind / name, content)
        with pytest.raises(ConfigError) as e:
            _reader(kind, paths=[str(path)]).shards()
        assert str(path) in str(e.value), (name, str(e.value))


def _arrow_file(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=10)
    return sink.getvalue().to_pybytes()


def test_validate_names_the_empty_file(tmp_path):
    write_bytes(tmp_path / "in" / "a.parquet", b"")
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: empty
        source: {{kind: parquet, paths: ["{tmp_path}/in/*.parquet"]}}
        sink: {{kind: parquet}}
        """)
    proc = cli("validate", str(m), check=False)
    text = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert proc.returncode != 0
    assert "a.parquet: not a Parquet file: looks like an empty file (0 bytes)" in text
    assert "Traceback" not in text


def test_unreadable_row_group_is_counted_and_the_others_are_read(tmp_path):
    table = pa.table({"text": [make_text(i) for i in range(400)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=100, compression="zstd")
    md = pq.ParquetFile(tmp_path / "a.parquet").metadata
    col = md.row_group(1).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    raw = bytearray((tmp_path / "a.parquet").read_bytes())
    raw[start:start + col.total_compressed_size] = b"\x55" * col.total_compressed_size
    path = write_bytes(tmp_path / "in" / "a.parquet", bytes(raw))
    got, ctxs, rd = read_all("parquet", tmp_path / "r", paths=[str(path)])
    assert [r["id"] for r in got] == [f"a.parquet:{i}" for i in (*range(100), *range(200, 400))]
    fail = _only(rd, "unreadable_file")
    assert fail["file"] == str(path) and fail["offset"] == start
    assert fail["lost"] == 100 and fail["line"] == 99
    assert ctxs[0].stats["read"].drops["unreadable_file"] == 100


def test_cut_arrow_stream_is_counted_at_read_time(tmp_path):
    table = pa.table({"text": [make_text(i) for i in range(300)]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=50)
    data = sink.getvalue().to_pybytes()
    path = write_bytes(tmp_path / "a.arrow", data[:len(data) * 2 // 3])
    got, _, rd = read_all("arrow", tmp_path / "r", paths=[str(path)])
    assert [r["text"] for r in got] == table.column("text").to_pylist()[:len(got)] and len(got) % 50 == 0
    fail = _only(rd, "unreadable_file")
    assert fail["file"] == str(path) and fail["line"] == len(got) - 1


# -------------------------------------------------------------------- 3. files of the wrong kind
def test_files_of_another_kind_are_a_config_error_naming_file_and_format(tmp_path):
    table = pa.table({"text": ["a document"]})
    pq.write_table(table, tmp_path / "p.bin")
    parquet = (tmp_path / "p.bin").read_bytes()
    jsonl = _jsonl_bytes(_records(3, 0))
    tar, _ = _tar_bytes(_samples(2, 0))
    cases = [
        ("jsonl", "data.jsonl", parquet, "looks like Parquet; use kind: parquet"),
        ("jsonl", "data.jsonl", gzip.compress(jsonl), "gzip"),
        ("jsonl", "data.jsonl.gz", jsonl, "JSON Lines text"),
        ("jsonl", "data.jsonl.zst", gzip.compress(jsonl), "gzip"),
        ("jsonl", "data.jsonl", tar, "looks like a tar archive; use kind: webdataset"),
        ("parquet", "data.parquet", tar, "looks like a tar archive; use kind: webdataset"),
        ("parquet", "data.parquet", jsonl, "looks like JSON Lines text; use kind: jsonl"),
        ("parquet", "data.parquet", _arrow_file(table), "use kind: arrow"),
        ("arrow", "data.arrow", parquet, "looks like Parquet; use kind: parquet"),
        ("webdataset", "data.tar", parquet, "looks like Parquet; use kind: parquet"),
        ("webdataset", "data.tar", jsonl, "use kind: jsonl"),
    ]
    for i, (kind, name, content, says) in enumerate(cases):
        path = write_bytes(tmp_path / str(i) / name, content)
        with pytest.raises(ConfigError) as e:
            _reader(kind, paths=[str(path)]).shards()
        assert str(path) in str(e.value) and says in str(e.value), (kind, name, str(e.value))


def test_wrong_kind_stops_validate(tmp_path):
    pq.write_table(pa.table({"text": ["x"]}), write_bytes(tmp_path / "in" / "a.jsonl", b""))
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: wrong
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"]}}
        sink: {{kind: parquet}}
        """)
    proc = cli("validate", str(m), check=False)
    text = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert proc.returncode != 0 and "a.jsonl: not JSON Lines: looks like Parquet; use kind: parquet" in text


# ------------------------------------------------------------------- 4. null ids in columnar files
def test_null_id_in_columnar_inputs_is_a_counted_record(tmp_path):
    table = pa.table({"text": [make_text(i) for i in range(6)], "doc": ["a", None, "c", None, "e", "f"]})
    pq.write_table(table, tmp_path / "a.parquet")
    (tmp_path / "a.arrow").write_bytes(_arrow_file(table))
    for kind, name in (("parquet", "a.parquet"), ("arrow", "a.arrow")):
        got, _, rd = read_all(kind, tmp_path / kind, paths=[str(tmp_path / name)], id_field="doc")
        assert [r["id"] for r in got] == ["a", "c", "e", "f"]
        assert [(f["reason"], f["line"], f["file"]) for f in failures(rd)] == [
            ("missing_id_field", 1, str(tmp_path / name)), ("missing_id_field", 3, str(tmp_path / name))]


# --------------------------------------------------------- 5. malformed .json member in a WebDataset
def test_malformed_json_member_skips_the_sample_and_goes_on(tmp_path):
    samples = _samples(4, 0)
    samples[1]["json"] = b'{"n": 1, broken'
    samples[2]["json"] = b"[1, 2]"
    data, _ = _tar_bytes(samples)
    path = write_bytes(tmp_path / "a.tar", data)
    got, _, rd = read_all("webdataset", tmp_path / "r", paths=[str(path)])
    assert [json.loads(r["meta"])["n"] for r in got] == [0, 3]
    fails = failures(rd)
    assert [(f["reason"], f["line"], f["file"]) for f in fails] == [
        ("invalid_json", 1, str(path)), ("not_an_object", 2, str(path))]
    assert "s0001" in fails[0]["detail"] and fails[0]["record"] == '{"n": 1, broken'


# ----------------------------------------------------------------------- 6. byte-order marks
@pytest.mark.parametrize("codec", [None, "gz", "zst"])
def test_utf8_bom_before_the_first_record(tmp_path, codec):
    rows = [json.dumps(r) for r in _records(3, 0)]
    rows[0] = "\ufeff" + rows[0]
    suffix = f".jsonl.{codec}" if codec else ".jsonl"
    path = write_jsonl(tmp_path / f"a{suffix}", rows, codec)
    got, _, rd = read_all("jsonl", tmp_path / "r", paths=[str(path)], id_field="id")
    assert [r["id"] for r in got] == ["r0", "r1", "r2"] and failures(rd) == []


# ------------------------------------------------------------ 8. byte ranges read each byte ~once
def test_byte_range_shards_read_each_byte_about_once(tmp_path, monkeypatch):
    import fsspec
    from fsspec.implementations.memory import MemoryFile

    rng = random.Random(5)
    lines = [orjson.dumps({"text": make_text(i, rng.randint(2, 90))}) for i in range(3000)]
    bad = {5, 1234, 2500, 2998}  # 0-based
    for i in bad:
        lines[i] = b'{"text": broken'
    data = b"\n".join(lines) + b"\n"
    shard_bytes = 8192
    while not 4096 <= len(data) % shard_bytes:  # the last range is a real one
        data += orjson.dumps({"text": "padding line"}) + b"\n"
    fs = fsspec.filesystem("memory")
    fs.pipe("/ranges/big.jsonl", data)

    counted = {"bytes": 0}

    def counting(name):
        original = getattr(io.BytesIO, name)

        def wrapper(self, *args):
            out = original(self, *args)
            counted["bytes"] += len(out)
            return out
        return wrapper

    for name in ("read", "readline", "read1"):
        monkeypatch.setattr(MemoryFile, name, counting(name), raising=False)

    reader = _reader("jsonl", paths=["memory://ranges/big.jsonl"], shard_bytes=shard_bytes)
    shards = reader.shards()
    listing = counted["bytes"]
    assert len(shards) == -(-len(data) // shard_bytes) > 40
    assert [s.name for s in shards] == [f"{i:05d}" for i in range(len(shards))]
    assert [s.to_dict() for s in shards] == [s.to_dict() for s in reader.shards()]  # stable
    counted["bytes"] = listing
    rd = RunDir(tmp_path / "run")
    rd.create()
    ids = []
    for shard in shards:
        ctx = RunContext(0, shard, rd)
        for batch in reader.read(shard, ctx):
            ids += batch.column("id").to_pylist()
        ctx.close()
    assert counted["bytes"] <= 2 * len(data)
    n_lines = data.count(b"\n")
    assert ids == [f"big.jsonl:{i}" for i in range(1, n_lines + 1) if i - 1 not in bad]  # each once, in order
    assert sorted(f["line"] for f in failures(rd)) == sorted(i + 1 for i in bad)


@pytest.mark.parametrize("codec", ["bz2", "xz"])
def test_cut_bz2_and_xz_jsonl_keep_every_whole_record(tmp_path, codec):
    import bz2
    import lzma

    compress = {"bz2": lambda d: bz2.compress(d, 1), "xz": lzma.compress}[codec]
    decoder = {"bz2": bz2.BZ2Decompressor, "xz": lzma.LZMADecompressor}[codec]
    for seed in SEEDS[:3]:
        rng = random.Random(seed)
        full = compress(_jsonl_bytes(_records(3000, seed)))
        cut = full[:rng.randint(len(full) // 3, len(full) - 8)]
        path = write_bytes(tmp_path / f"s{seed}" / f"a.jsonl.{codec}", cut)
        got, _, rd = read_all("jsonl", tmp_path / f"r{seed}", paths=[str(path)], id_field="id")
        assert [r["id"] for r in got] == _whole_ids(decoder().decompress(cut)), seed
        fail = _only(rd, "truncated_input")
        assert fail["file"] == str(path)
        assert [f["reason"] for f in failures(rd)] == ["truncated_input"]


def test_cut_tar_gz_is_a_counted_truncation(tmp_path):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(200):
            data = json.dumps({"n": i}).encode()
            for ext, payload in (("txt", f"text number {i} ".encode() * 20), ("json", data)):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    full = buf.getvalue()
    path = write_bytes(tmp_path / "in" / "a.tar.gz", full[: len(full) // 2])
    got, _, rd = read_all("webdataset", tmp_path / "r", paths=[str(tmp_path / "in")])
    assert 0 < len(got) < 200
    assert [r["id"].split(":")[-1] for r in got] == [f"s{i:04d}" for i in range(len(got))]
    assert _only(rd, "truncated_input")["file"] == str(path)


@pytest.mark.parametrize("keep", [10, 300, 700])
def test_tar_gz_cut_before_its_first_sample_is_a_truncation(tmp_path, keep):
    """A .tar.gz cut so early that no sample is whole (inside the gzip header's end, the first tar header
    or the first member) is a truncated file, as a later cut is — not an unreadable one."""
    samples = _samples(40, seed=3)
    data, _ = _tar_bytes(samples)
    full = gzip.compress(data, mtime=0)
    path = write_bytes(tmp_path / "in" / "a.tar.gz", full[:keep])
    got, _, rd = read_all("webdataset", tmp_path / "r", paths=[str(tmp_path / "in")])
    assert got == []
    fail = _only(rd, "truncated_input")
    assert fail["file"] == str(path) and fail["line"] is None
    assert "compressed stream ends early" in fail["detail"]

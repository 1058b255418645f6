"""Readers: every format, field mapping, byte-range shards, and bad records sent to failures/."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.context import RunContext
from curate.plugins import kinds_of
from curate.rundir import RunDir
from tests.conftest import make_text, write_jsonl


def read_all(kind: str, tmp_path: Path, **params):
    """List the shards of a source and read them all, as a worker would."""
    reader_cls = kinds_of("source")[kind]
    reader = reader_cls(reader_cls.Params(**params))
    rd = RunDir(tmp_path / "run")
    rd.create()
    rows, contexts = [], []
    for shard in reader.shards():
        ctx = RunContext(0, shard, rd)
        for batch in reader.read(shard, ctx):
            assert batch.schema.names[:2] == (["id", "texts"] if reader.output_kind() == "interleaved" else ["id", "text"])
            rows += batch.to_pylist()
        ctx.close()
        contexts.append(ctx)
    return rows, contexts, rd


def failures(rd: RunDir) -> list[dict]:
    return [orjson.loads(line) for p in sorted(rd.failures.glob("*.jsonl")) for line in p.read_bytes().splitlines()]


@pytest.mark.parametrize("compress", [None, "gz", "zst"])
def test_jsonl_plain_and_compressed(tmp_path, compress):
    rows = [{"id": i, "text": make_text(i), "lang": "en"} for i in range(30)]
    suffix = {"gz": ".jsonl.gz", "zst": ".jsonl.zst", None: ".jsonl"}[compress]
    write_jsonl(tmp_path / f"a{suffix}", rows, compress)
    got, _, _ = read_all("jsonl", tmp_path, paths=[str(tmp_path / f"*{suffix}")], id_field="id")
    assert [r["id"] for r in got] == [str(i) for i in range(30)]
    assert got[3]["text"] == make_text(3)
    assert json.loads(got[0]["meta"]) == {"lang": "en"}
    assert got[0]["source"] == f"a{suffix}"


def test_bad_records_go_to_failures_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "a good document here"}).encode(),  # 1
        b'{"text": "unterminated',  # 2 invalid JSON
        b'{"text": "caf\xe9 latin-1 bytes"}',  # 3 not UTF-8
        json.dumps({"body": "no text field"}).encode(),  # 4
        json.dumps({"text": "   "}).encode(),  # 5 empty
        b"",  # 6 blank line: not a record
        json.dumps([1, 2]).encode(),  # 7 not an object
        json.dumps({"text": 42}).encode(),  # 8
        json.dumps({"text": "another good one"}).encode(),  # 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    got, contexts, rd = read_all("jsonl", tmp_path, paths=[str(path)])
    assert [r["id"] for r in got] == ["bad.jsonl:1", "bad.jsonl:9"]
    fails = failures(rd)
    assert [(f["line"], f["reason"]) for f in fails] == [
        (2, "invalid_json"), (3, "invalid_utf8"), (4, "missing_text_field"), (5, "empty_text"),
        (7, "not_an_object"), (8, "text_not_a_string")]
    assert all(f["file"] == str(path) for f in fails)
    drops = contexts[0].stats["read"].drops
    assert sum(drops.values()) == 6 and drops["invalid_json"] == 1


def test_byte_range_shards_match_whole_file(tmp_path):
    rows = [{"text": make_text(i, 5 + i % 50)} for i in range(2000)]
    rows[777] = "{broken"
    write_jsonl(tmp_path / "big.jsonl", rows)
    whole, _, rd1 = read_all("jsonl", tmp_path / "w", paths=[str(tmp_path / "big.jsonl")])
    split, ctxs, rd2 = read_all("jsonl", tmp_path / "s", paths=[str(tmp_path / "big.jsonl")], shard_bytes=4096)
    assert len(ctxs) > 20
    assert whole == split  # same ids (file:line), texts and order
    assert [f["line"] for f in failures(rd2)] == [778] == [f["line"] for f in failures(rd1)]


@pytest.mark.parametrize("seed", range(3))
def test_byte_ranges_with_long_lines_and_small_blocks(tmp_path, monkeypatch, seed):
    """Lines longer than a range (ranges with no line start), blank lines, and range starts that fall on,
    just after or inside a line, with blocks smaller than a range: every line once, exact numbers."""
    import random

    from curate.readers import jsonl

    monkeypatch.setattr(jsonl, "_BLOCK", 997)
    monkeypatch.setattr(jsonl, "_TAIL", 7)
    rng = random.Random(seed)
    rows = [{"text": make_text(i, rng.choice([1, 5, 40, 900]))} if rng.random() > 0.05 else "" for i in range(300)]
    rows[rng.randrange(300)] = "{broken"
    write_jsonl(tmp_path / "big.jsonl", rows)
    whole, _, rd1 = read_all("jsonl", tmp_path / "w", paths=[str(tmp_path / "big.jsonl")])
    split, ctxs, rd2 = read_all("jsonl", tmp_path / "s", paths=[str(tmp_path / "big.jsonl")],
                                shard_bytes=rng.choice([511, 1024, 3000]))
    assert len(ctxs) > 20 and whole == split
    assert [f["line"] for f in failures(rd2)] == [f["line"] for f in failures(rd1)]


def test_unset_shard_bytes_sizes_ranges_from_the_input_alone(tmp_path):
    """An unset ``shard_bytes`` cuts plain files into the input's total / 16 (8–256 MB): a corpus of a few
    tens of MB becomes several shards for the workers to share; small files stay one shard; compressed
    files are one shard each and do not count; an explicit size wins."""
    from curate.readers.jsonl import JsonlReader, range_bytes

    assert range_bytes(None, 0) == range_bytes(None, 45_000_000) == 8_000_000
    assert range_bytes(None, 200_000_000) == 12_500_000
    assert range_bytes(None, 10**12) == 256_000_000
    assert range_bytes(1234, 10**12) == 1234
    line = orjson.dumps({"text": "x" * 990}) + b"\n"
    big = tmp_path / "big.jsonl"
    big.write_bytes(line * 17_000)  # ~17 MB
    small = tmp_path / "small.jsonl"
    small.write_bytes(line * 10)
    with gzip.open(tmp_path / "packed.jsonl.gz", "wb") as fh:
        fh.write(line * 50_000)  # 50 MB uncompressed, one shard
    shards = JsonlReader(JsonlReader.Params(paths=[str(tmp_path)])).shards()
    ranges = [(Path(s.uri).name, s.start, s.stop) for s in shards]
    assert ranges == [("big.jsonl", 0, 8_000_000), ("big.jsonl", 8_000_000, 16_000_000),
                      ("big.jsonl", 16_000_000, big.stat().st_size), ("packed.jsonl.gz", 0, None),
                      ("small.jsonl", 0, None)]
    explicit = JsonlReader(JsonlReader.Params(paths=[str(big)], shard_bytes="6MB")).shards()
    assert [(s.start, s.stop) for s in explicit][:2] == [(0, 6_000_000), (6_000_000, 12_000_000)]
    rows, _, _ = read_all("jsonl", tmp_path / "r", paths=[str(big)])
    assert len(rows) == 17_000 and rows[-1]["id"].endswith(":17000")


def test_batches_are_bounded_by_bytes(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x" * 10_000} for _ in range(50)])
    reader_cls = kinds_of("source")["jsonl"]
    reader = reader_cls(reader_cls.Params(paths=[str(tmp_path / "a.jsonl")], batch_bytes=30_000))
    rd = RunDir(tmp_path / "run")
    shard = reader.shards()[0]
    sizes = [b.num_rows for b in reader.read(shard, RunContext(0, shard, rd))]
    assert max(sizes) == 3 and sum(sizes) == 50


def test_parquet_row_group_shards_and_null_text(tmp_path):
    texts = [make_text(i) for i in range(100)]
    texts[10] = None
    texts[20] = ""
    table = pa.table({"text": texts, "url": [f"u{i}" for i in range(100)], "n": list(range(100))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=25)
    got, ctxs, rd = read_all("parquet", tmp_path, paths=[str(tmp_path / "a.parquet")], shard_rows=25)
    assert len(ctxs) == 4
    assert len(got) == 98 and got[0]["id"] == "a.parquet:0" and got[-1]["id"] == "a.parquet:99"
    assert json.loads(got[1]["meta"]) == {"n": 1, "url": "u1"}
    assert [(f["line"], f["reason"]) for f in failures(rd)] == [(10, "missing_text_field"), (20, "empty_text")]


def test_parquet_shards_by_size_unless_rows_are_asked_for(tmp_path):
    """Unset, row groups are grouped by their data size (the files' total / 16, 8–256 MB a shard), so a
    few tens of MB of Parquet still gives the workers several shards; ``shard_rows`` groups by rows; a
    row group is never split, and every row is read once with its row number."""
    from curate.readers.parquet import ParquetReader

    n = 4000
    table = pa.table({"text": [f"{i:08d} " + "y" * 4990 for i in range(n)]})  # ~20 MB of text
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100)  # 40 groups of ~0.5 MB
    pq.write_table(table.slice(0, 10), tmp_path / "one.parquet")  # one row group
    params = {"paths": [str(tmp_path / "big.parquet"), str(tmp_path / "one.parquet")]}
    by_size = ParquetReader(ParquetReader.Params(**params)).shards()
    big = [(s.start, s.stop, s.extra["first_row"]) for s in by_size if s.uri.endswith("big.parquet")]
    assert len(big) == 3 and big[0][:2] == (0, 16) and big[-1][1] == 40  # 8 MB = 16 groups of ~0.5 MB
    assert [b[2] for b in big] == [0, 1600, 3200]
    assert [(s.start, s.stop) for s in by_size if s.uri.endswith("one.parquet")] == [(0, 1)]
    by_rows = ParquetReader(ParquetReader.Params(**params, shard_rows=1000)).shards()
    assert [(s.start, s.stop) for s in by_rows if s.uri.endswith("big.parquet")] == [(0, 10), (10, 20), (20, 30),
                                                                                   (30, 40)]
    with pytest.raises(ValueError, match="shard_rows or shard_bytes, not both"):
        ParquetReader.Params(**params, shard_rows=10, shard_bytes="1MB")
    rows, _, _ = read_all("parquet", tmp_path / "r", paths=[str(tmp_path / "big.parquet")])
    assert len(rows) == n and [r["text"][:8] for r in rows] == [f"{i:08d}" for i in range(n)]
    assert rows[-1]["id"] == f"big.parquet:{n - 1}"


def test_arrow_and_hf_disk_and_load_dataset(tmp_path):
    import datasets

    rows = {"content": [make_text(i) for i in range(40)], "doc": [f"x{i}" for i in range(40)]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    got, ctxs, _ = read_all("hf_disk", tmp_path / "r1", paths=[str(tmp_path / "saved")], text_field="content",
                            id_field="doc", meta_fields=[])
    assert len(ctxs) == 2 and [r["id"] for r in got] == rows["doc"] and got[0]["meta"] is None

    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_file(sink, ds.data.schema) as w:
        w.write_table(ds.data.table)
    got, _, _ = read_all("arrow", tmp_path / "r2", paths=[str(tmp_path / "t.arrow")], text_field="content")
    assert [r["text"] for r in got] == rows["content"]

    write_jsonl(tmp_path / "local" / "data.jsonl", [{"text": t} for t in rows["content"]])
    got, _, _ = read_all("hf", tmp_path / "r3", path="json", data_files=[str(tmp_path / "local" / "data.jsonl")])
    assert [r["text"] for r in got] == rows["content"]
    assert got[0]["id"] == "json:0"

    # several streaming shards: rows are counted per shard, ids stay unique across shards
    write_jsonl(tmp_path / "local" / "more.jsonl", [{"text": t} for t in rows["content"][:5]])
    got, ctxs, _ = read_all("hf", tmp_path / "r4", path="json", data_files=[str(tmp_path / "local" / "data.jsonl"),
                                                                          str(tmp_path / "local" / "more.jsonl")])
    assert len(ctxs) == 2 and len(got) == 45 and len({r["id"] for r in got}) == 45


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG written by hand (zlib + CRC), so the test needs no imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_documents_and_interleaved(tmp_path):
    png = _png(4, 3, (200, 10, 10))
    _tar(tmp_path / "a.tar", [
        {"__key__": "s0", "txt": b"a caption about a red square", "json": b'{"url": "x"}', "png": png},
        {"__key__": "s1", "json": b"{}"},  # no text
        {"__key__": "s2", "txt": b"second caption"},
    ])
    got, ctxs, rd = read_all("webdataset", tmp_path / "d", paths=[str(tmp_path / "a.tar")])
    assert [r["text"] for r in got] == ["a caption about a red square", "second caption"]
    assert json.loads(got[0]["meta"]) == {"url": "x"}
    assert [f["reason"] for f in failures(rd)] == ["missing_text_field"]
    assert ctxs[0].stats["read"].metrics["image_members_ignored"].count == 1

    got, _, _ = read_all("webdataset", tmp_path / "i", paths=[str(tmp_path / "a.tar")], schema="interleaved")
    assert got[0]["texts"] == [None, "a caption about a red square"]
    image = got[0]["images"][0]
    assert image["bytes"] == png and image["mime"] == "image/png" and got[0]["images"][1] is None
    assert got[1]["images"] == [None]


def test_stdlib_docs_source_is_real_and_stable(tmp_path):
    got, ctxs, _ = read_all("stdlib_docs", tmp_path, shards=3)
    again, _, _ = read_all("stdlib_docs", tmp_path / "again", shards=3)
    assert len(ctxs) == 3 and len(got) > 100 and got == again
    by_id = {r["id"]: r for r in got}
    assert "stdlib:json/__init__.py" in by_id and "JSON" in by_id["stdlib:json/__init__.py"]["text"]


def test_fsspec_urls_for_every_file_format(tmp_path):
    """Inputs addressed by fsspec URL (here the in-memory filesystem) read like local files."""
    import fsspec

    fs = fsspec.filesystem("memory")
    rows = [{"text": make_text(i)} for i in range(12)]
    fs.pipe("/bucket/a.jsonl", b"".join(orjson.dumps(r) + b"\n" for r in rows))
    table = pa.table({"text": [r["text"] for r in rows]})
    with fs.open("/bucket/b.parquet", "wb") as fh:
        pq.write_table(table, fh)
    with fs.open("/bucket/c.arrow", "wb") as fh, pa.ipc.new_file(fh, table.schema) as w:
        w.write_table(table)
    for kind, name in (("jsonl", "a.jsonl"), ("parquet", "b.parquet"), ("arrow", "c.arrow")):
        got, _, _ = read_all(kind, tmp_path / kind, paths=[f"memory://bucket/{name[0]}*"])
        assert [r["text"] for r in got] == [r["text"] for r in rows], kind


def test_derived_seeds_are_stable_and_distinct(tmp_path):
    from curate.readers.base import Shard

    rd = RunDir(tmp_path)
    a = RunContext(7, Shard("00000", "key-a", "x"), rd)
    b = RunContext(7, Shard("00001", "key-b", "y"), rd)
    draw = lambda ctx, stage: ctx.rng(stage).integers(0, 2**62, 4).tolist()  # noqa: E731
    assert draw(a, "utk") == draw(a, "utk") == draw(RunContext(7, Shard("00009", "key-a", "z"), rd), "utk")
    assert draw(a, "utk") != draw(b, "utk") and draw(a, "utk") != draw(a, "pack")
    assert draw(a, "utk") != draw(RunContext(8, Shard("00000", "key-a", "x"), rd), "utk")
    # the same in a fresh interpreter (no hash() salt, no process state)
    import subprocess
    import sys

    code = ("from curate.seeds import rng; print(rng(7, 'utk', 'key-a').integers(0, 2**62, 4).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(draw(a, "utk"))

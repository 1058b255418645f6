"""Writers: sizing by samples and bytes, atomic names, real sha256, formats read back unchanged."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.inspect_output import samples
from curate.plugins import kinds_of
from curate.schema import documents_batch, with_scores
from curate.sinks.base import write_index
from tests.conftest import make_text


def _batches(n: int, size: int = 50):
    for start in range(0, n, size):
        ids = [f"d{i}" for i in range(start, min(n, start + size))]
        b = documents_batch(ids, [make_text(i) for i in range(start, start + len(ids))], ["src"] * len(ids),
                            [{"i": i} for i in range(start, start + len(ids))])
        yield with_scores(b, "h", {"n": pa.array(range(len(ids)), pa.int64())})


def _sink(kind: str, tmp_path, **params):
    cls = kinds_of("sink")[kind]
    return cls(cls.Params(**params), tmp_path)


@pytest.mark.parametrize("kind", ["parquet", "arrow", "jsonl", "webdataset"])
def test_sizing_by_samples_and_roundtrip(tmp_path, kind):
    sink = _sink(kind, tmp_path, shard_samples=120)
    w = sink.writer("00007")
    for b in _batches(500):
        w.write(b)
    files = w.close()
    assert [f["samples"] for f in files] == [120, 120, 120, 120, 20]
    assert [f["name"] for f in files][:2] == [f"00007-0000.{sink.extension}", f"00007-0001.{sink.extension}"]
    for f in files:
        assert hashlib.sha256((sink.directory / f["name"]).read_bytes()).hexdigest() == f["sha256"]
        assert (sink.directory / f["name"]).stat().st_size == f["bytes"]
    assert not list(sink.directory.glob(".tmp-*"))
    index = write_index(sink, files, ["id", "text"])
    assert index["total_samples"] == 500
    rows = list(samples(sink.directory))
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(500)]
    assert rows[7]["text"] == make_text(7)
    meta = rows[3]["meta"]
    assert (json.loads(meta) if isinstance(meta, str) else meta) == {"i": 3}


def test_sizing_by_bytes(tmp_path):
    sink = _sink("webdataset", tmp_path, shard_bytes="200KB")
    w = sink.writer("00000")
    for b in _batches(2000, 20):
        w.write(b)
    files = w.close()
    assert len(files) > 3 and sum(f["samples"] for f in files) == 2000
    assert all(f["bytes"] < 300_000 for f in files)


def test_rerun_of_a_shard_replaces_its_old_files(tmp_path):
    sink = _sink("parquet", tmp_path, shard_samples=100)
    w = sink.writer("00001")
    for b in _batches(450):
        w.write(b)
    w.close()
    (sink.directory / ".tmp-00001-0009.parquet").write_bytes(b"partial")  # as a kill leaves it
    w = sink.writer("00001")
    for b in _batches(150):
        w.write(b)
    files = w.close()
    assert sorted(p.name for p in sink.directory.iterdir()) == [f["name"] for f in files]


def test_parquet_keeps_nested_scores_and_loads_with_datasets(tmp_path):
    import datasets

    sink = _sink("parquet", tmp_path)
    w = sink.writer("00000")
    for b in _batches(100):
        w.write(b)
    files = w.close()
    table = pq.read_table(sink.directory / files[0]["name"])
    assert table.schema.field("scores").type == pa.struct([("h", pa.struct([("n", pa.int64())]))])
    ds = datasets.load_dataset("parquet", data_files=str(sink.directory / "*.parquet"), split="train")
    assert ds[5]["scores"] == {"h": {"n": 5}}


def test_webdataset_members(tmp_path):
    import webdataset as wds

    from curate.schema import SEQUENCES

    sink = _sink("webdataset", tmp_path)
    w = sink.writer("00000")
    seq = pa.RecordBatch.from_pylist([{"id": "s0", "input_ids": [5, 6, 7], "loss_mask": [1, 1, 0],
                                       "doc_offsets": [0, 3], "n_tokens": 3, "n_image_tokens": 0,
                                       "lineage": ["d1"]}], schema=SEQUENCES)
    w.write(seq)
    files = w.close()
    sample = next(iter(wds.WebDataset(str(sink.directory / files[0]["name"]), shardshuffle=False).decode()))
    assert sample["input_ids.npy"].tolist() == [5, 6, 7]
    assert sample["json"]["lineage"] == ["d1"] and sample["json"]["n_tokens"] == 3


def test_interleaved_rows_round_trip_through_webdataset(tmp_path):
    """Images become their own tar members by position; reading the tar back restores the row."""
    from curate.inspect_output import samples as read_back
    from curate.schema import INTERLEAVED, validate
    from tests.test_readers import _png

    png = _png(2, 2, (0, 128, 255))
    row = {"id": "r0", "texts": ["intro", None, "after the image"],
           "images": [None, {"bytes": png, "mime": "image/png", "sha256": hashlib.sha256(png).hexdigest(),
                             "width": 2, "height": 2}, None], "source": "s", "meta": '{"k": 1}'}
    batch = pa.RecordBatch.from_pylist([row], schema=INTERLEAVED)
    validate(batch, "interleaved")
    sink = _sink("webdataset", tmp_path)
    w = sink.writer("00000")
    w.write(batch)
    files = w.close()
    import tarfile

    with tarfile.open(sink.directory / files[0]["name"]) as tf:
        names = tf.getnames()
        assert names == ["00000-0000_0000000.001.png", "00000-0000_0000000.json"]
        assert tf.extractfile(names[0]).read() == png
    back = next(read_back(sink.directory / files[0]["name"]))
    assert back["texts"] == row["texts"] and back["images"][1]["file"] == "001.png" and back["meta"] == {"k": 1}


def test_validate_rejects_misaligned_interleaved_rows():
    from curate.schema import INTERLEAVED, validate

    bad = pa.RecordBatch.from_pylist([{"id": "x", "texts": ["a", "b"], "images": [None], "source": None,
                                       "meta": None}], schema=INTERLEAVED)
    with pytest.raises(ValueError, match="differ in length"):
        validate(bad, "interleaved")


def test_partitioned_sink_writes_one_folder_per_value(tmp_path):
    sink = _sink("parquet", tmp_path, partition_by="bucket")
    batch = pa.RecordBatch.from_pydict({"id": [f"r{i}" for i in range(10)], "bucket": [8, 9, 8, 10, 8, 9, 8, 8, 9, 10]})
    w = sink.writer("00003")
    w.write(batch)
    files = w.close()
    assert [f["name"] for f in files] == ["bucket_10/00003-0000.parquet", "bucket_8/00003-0000.parquet",
                                          "bucket_9/00003-0000.parquet"]  # in folder-name order
    index = write_index(sink, files, ["id", "bucket"])
    assert index["partitions"] == {k: {"value": v, "type": "int64", "samples": n,
                                       "bytes": index["partitions"][k]["bytes"]}
                                   for k, v, n in (("bucket_10", 10, 2), ("bucket_8", 8, 5), ("bucket_9", 9, 3))}
    assert all("partition" not in e for e in index["shards"])
    sub = json.loads((sink.directory / "bucket_8" / "index.json").read_text())
    assert sub["total_samples"] == 5 and sub["shards"][0]["name"] == "00003-0000.parquet"
    assert pq.read_table(sink.directory / "bucket_9" / "00003-0000.parquet").column("id").to_pylist() == ["r1", "r5", "r8"]


def test_atomic_file_stream_counts_and_hashes_what_pyarrow_writes(tmp_path):
    """A pyarrow writer given ``AtomicFile.stream()`` writes natively; size is known while writing, the
    sha256 (taken at close) is the file's, and the bytes equal those written through the file object."""
    from curate.rundir import AtomicFile

    table = pa.table({"id": [f"d{i}" for i in range(5000)], "text": ["x" * (i % 300) for i in range(5000)]})
    files = {}
    for how in ("object", "stream"):
        f = AtomicFile(tmp_path / f"{how}.parquet")
        writer = pq.ParquetWriter(f.stream() if how == "stream" else f, table.schema, compression="zstd")
        writer.write_table(table.slice(0, 2500))
        assert f.size > 0  # pages of the first row group are out
        writer.write_table(table.slice(2500))
        writer.close()
        path = f.commit()
        data = path.read_bytes()
        assert f.size == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
        files[how] = data
    assert files["object"] == files["stream"]
    assert pq.read_table(tmp_path / "stream.parquet").equals(table)

    f = AtomicFile(tmp_path / "closed-by-writer.bin")  # a writer that closes the stream itself
    stream = f.stream()
    stream.write(b"abcdef")
    stream.close()
    assert f.size == 6
    f.commit()
    assert f.size == 6 and f.sha256 == hashlib.sha256(b"abcdef").hexdigest()

    f = AtomicFile(tmp_path / "mixed.arrow")
    f.stream().write(b"abc")
    with pytest.raises(RuntimeError, match="after stream"):
        f.write(b"more")
    f.abort()
    assert not list(tmp_path.glob("*mixed*"))
    g = AtomicFile(tmp_path / "other.bin")
    g.write(b"abc")
    with pytest.raises(RuntimeError, match="after write"):
        g.stream()
    g.abort()


def test_atomic_file_stream_is_hashed_while_written_and_again_when_that_fails(tmp_path, monkeypatch):
    """The thread that follows a stream's file hashes every byte, whatever the pauses and sizes of the
    writes; if it fails, close hashes the file again; abort and a dropped file stop the thread."""
    import threading
    import time

    from curate import rundir
    from curate.rundir import AtomicFile

    rng = random.Random(3)
    before = threading.active_count()
    for round_ in range(4):
        f = AtomicFile(tmp_path / f"r{round_}.bin")
        stream = f.stream()
        expect = hashlib.sha256()
        for _ in range(rng.randint(1, 40)):
            chunk = rng.randbytes(rng.choice([1, 4095, 65536, 1 << 20, (3 << 20) + 7]))
            stream.write(chunk)
            expect.update(chunk)
            if rng.random() < 0.3:
                time.sleep(0.015)  # the follower catches up and waits
        path = f.commit()
        assert f.sha256 == expect.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f.size == path.stat().st_size
    assert threading.active_count() == before

    # a follower that fails (here: reports it could not finish) leaves the hashing to close
    monkeypatch.setattr(rundir._Follower, "finish", lambda self: (rundir._Follower.abandon(self), False)[1])
    f = AtomicFile(tmp_path / "fallback.bin")
    f.stream().write(b"x" * 5_000_000)
    f.commit()
    assert f.sha256 == hashlib.sha256(b"x" * 5_000_000).hexdigest() and f.size == 5_000_000
    monkeypatch.undo()

    # many files open at once (a partitioned sink): a few are followed, the rest hashed at close
    files = [AtomicFile(tmp_path / f"many-{i}.bin") for i in range(3 * rundir._Follower.MAX_LIVE)]
    for i, g in enumerate(files):
        g.stream().write(bytes([i]) * 200_000)
    assert threading.active_count() <= before + rundir._Follower.MAX_LIVE
    assert sum(g._follower is not None for g in files) == rundir._Follower.MAX_LIVE
    for i, g in enumerate(files):
        g.commit()
        assert g.sha256 == hashlib.sha256(bytes([i]) * 200_000).hexdigest() and g.size == 200_000
    assert threading.active_count() == before

    f = AtomicFile(tmp_path / "aborted.bin")
    f.stream().write(b"abc")
    f.abort()
    assert not f.tmp.exists() and threading.active_count() == before
    f = AtomicFile(tmp_path / "dropped.bin")  # neither closed nor aborted: its thread ends by itself
    f.stream().write(b"abc")
    del f
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_a_file_whose_encoder_cannot_start_leaves_nothing_open(tmp_path, monkeypatch):
    """An encoder that fails while opening its file (after taking the stream) does not leave the
    temporary file, its stream or its hashing thread behind."""
    import threading

    from curate.sinks.parquet import ParquetEncoder

    before = threading.active_count()

    def failing(self, fh, schema, params):
        fh.stream()  # as pq.ParquetWriter does, then fails
        raise OSError("disk full while writing the header")

    monkeypatch.setattr(ParquetEncoder, "__init__", failing)
    sink = _sink("parquet", tmp_path, shard_samples=10)
    w = sink.writer("00001")
    with pytest.raises(OSError, match="disk full"):
        for batch in _batches(3):
            w.write(batch)
        w.close()  # the first flush opens the file
    w.abort()
    assert not [p for p in sink.directory.iterdir() if p.name.startswith(".tmp-")]
    assert threading.active_count() == before

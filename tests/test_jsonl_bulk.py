"""JSONL bulk parsing: the bulk path gives exactly what the per-line path gives.

The per-line path (``jsonl._BULK = False``) sends every line through ``_parse``, the reader's reference
semantics; the bulk path (the default) parses whole blocks with orjson in a read-ahead thread and sends
only the lines it cannot take through ``_parse``. On valid input of every shape both give equal batches
(values, cuts and ``nbytes``, hence equal Parquet bytes); on input with bad lines at random places, and
on files cut at a random byte, both give the same rows and the same failures (file, line, reason,
detail, record) — and the lines named are the lines that were made bad.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import threading
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
import zstandard

from curate.context import RunContext
from curate.plugins import kinds_of
from curate.readers import jsonl
from curate.readers.base import DocumentBuilder
from curate.readers.jsonl_blocks import BatchCutter, Fields, parse_block, read_ahead
from curate.readers.stdlib_docs import _root, module_text, stdlib_files
from curate.rundir import RunDir

ODD = ["é", "ß", "中文", "😀", "\u2028", "\x00", "\t", "\\", '"', "\r\n", "\u00a0", "𝔘𝔫𝔦"]


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Real prose: paragraphs of some of the running Python's standard-library docstrings."""
    out: list[str] = []
    for rel in stdlib_files()[::20]:  # a twentieth: the whole library takes seconds to parse
        out += [p.strip() for p in module_text(os.path.join(_root(), rel)).split("\n\n") if len(p.strip()) > 40]
    assert len(out) > 500
    return out


def _text(rng: random.Random, pool: list[str]) -> str:
    parts = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
    for _ in range(rng.randint(0, 3)):  # non-ASCII (astral too: len() counts characters), controls, escapes
        at = rng.randrange(len(parts))
        parts[at] += rng.choice(ODD) * rng.randint(1, 3)
    return "\n\n".join(parts)


def _meta_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null", "big"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return rng.choice(["en", "ü", "a\"b", "", "x" * rng.randint(1, 30), "😀"])
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.1, 1e300, -2.5e-8, 3.0, rng.random()])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "big":
        return 2**63 - 1
    if kind == "list":
        return [_meta_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{rng.randint(0, 9)}": _meta_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _valid_line(i: int, rng: random.Random, pool: list[str], with_id: bool) -> bytes:
    record = {"text": _text(rng, pool)}
    if with_id or rng.random() < 0.3:  # ids present (of any JSON type), or absent when not asked for
        record["id"] = rng.choice([f"doc-{i}", i, float(i) + 0.5, f"é{i}", True, [i]])
    for _ in range(rng.randint(0, 3)):  # extra fields, nested meta, in random order
        record[rng.choice(["url", "lang", "meta", "score", "z", "Ä", "a b"])] = _meta_value(rng)
    keys = list(record)
    rng.shuffle(keys)
    record = {k: record[k] for k in keys}
    style = rng.randrange(3)
    if style == 0:
        line = orjson.dumps(record)  # raw UTF-8
    elif style == 1:
        line = json.dumps(record).encode()  # \uXXXX escapes, surrogate pairs for astral characters
    else:
        line = json.dumps(record, ensure_ascii=False, separators=(" ,", ":  ")).encode()  # odd spacing
    return line + (b"\r" if rng.random() < 0.05 else b"")


#: One bad line of each kind, with the reason the reader must give it (id_field set).
BAD = [
    (b'{"id": "b", "text": "caf\xe9"}', "invalid_utf8"),
    (b'\xff\xfe{"id": 1}', "invalid_utf8"),
    (b'{"id": "b", "text": "unterminated}', "invalid_json"),
    (b"{broken", "invalid_json"),
    (b'{"id": "b", "text": "\\ud800 lone surrogate"}', "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b"42", "not_an_object"),
    (b"null", "not_an_object"),
    (b'{"id": "b", "body": "no text"}', "missing_text_field"),
    (b'{"id": "b", "text": null}', "missing_text_field"),
    (b'{"id": "b", "text": 5}', "text_not_a_string"),
    (b'{"id": "b", "text": ["a"]}', "text_not_a_string"),
    (b'{"id": "b", "text": ""}', "empty_text"),
    (b'{"id": "b", "text": " \\n\\t\\u3000"}', "empty_text"),
    (b'{"text": "no id here"}', "missing_id_field"),
    (b'{"id": null, "text": "null id"}', "missing_id_field"),
]
BLANK = [b"", b"   ", b"\r", b"\t \r"]


def _read(path: Path, tmp: Path, bulk: bool, monkeypatch, **params) -> tuple[list[pa.RecordBatch], list[dict]]:
    """Every batch of every shard (in order) and every failure entry, read with the bulk or per-line path."""
    monkeypatch.setattr(jsonl, "_BULK", bulk)
    cls = kinds_of("source")["jsonl"]
    reader = cls(cls.Params(paths=[str(path)], **params))
    rd = RunDir(tmp / ("bulk" if bulk else "line"))
    rd.create()
    batches = []
    for shard in reader.shards():
        ctx = RunContext(0, shard, rd)
        batches += list(reader.read(shard, ctx))
        ctx.close()
    fails = [orjson.loads(line) for p in sorted(rd.failures.glob("*.jsonl")) for line in p.read_bytes().splitlines()]
    return batches, fails


def _same_batches(a: list[pa.RecordBatch], b: list[pa.RecordBatch]) -> None:
    assert [x.num_rows for x in a] == [y.num_rows for y in b]
    assert [x.nbytes for x in a] == [y.nbytes for y in b]  # what the sinks' buffers count
    for x, y in zip(a, b, strict=True):
        assert x.schema == y.schema and x.equals(y)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_id", [True, False])
def test_bulk_equals_line_by_line_on_varied_valid_input(tmp_path, monkeypatch, paragraphs, seed, with_id):
    rng = random.Random(seed)
    lines = [_valid_line(i, rng, paragraphs, with_id) for i in range(1500)]
    for _ in range(20):  # blank lines keep their numbers
        lines.insert(rng.randrange(len(lines)), rng.choice(BLANK))
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "in" / "varied.jsonl"
    path.parent.mkdir()
    path.write_bytes(data)
    monkeypatch.setattr(jsonl, "_BLOCK", rng.choice([997, 4096, 65536]))  # lines across block ends
    params = {"id_field": "id" if with_id else None, "batch_rows": rng.choice([7, 100, 2048]),
              "batch_bytes": rng.choice([3000, 50_000, 16_000_000]), "shard_bytes": rng.choice([20_000, 10**9])}
    bulk, bulk_fails = _read(path, tmp_path, True, monkeypatch, **params)
    line, line_fails = _read(path, tmp_path, False, monkeypatch, **params)
    _same_batches(bulk, line)
    assert bulk_fails == line_fails == []
    rows = [r for b in bulk for r in b.to_pylist()]
    assert len(rows) == 1500
    # the values are today's: id, text, source and meta as the per-line parse makes them
    first = orjson.loads(next(x for x in lines if x.strip()))
    assert rows[0]["text"] == first["text"] and rows[0]["source"] == "varied.jsonl"
    rest = {k: v for k, v in first.items() if k not in ("text", "id" if with_id else "text")}
    assert rows[0]["meta"] == (orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode() if rest else None)
    if not with_id:
        numbers = [n for n, x in enumerate(lines, 1) if x.strip()]
        assert [r["id"] for r in rows] == [f"varied.jsonl:{n}" for n in numbers]


def test_the_bulk_path_takes_the_valid_lines_and_only_those(paragraphs):
    """parse_block leaves to the per-line path exactly the blank and bad lines, whatever their number."""
    rng = random.Random(7)
    lines = [_valid_line(i, rng, paragraphs, True) for i in range(300)]
    odd = sorted(rng.sample(range(300), 40))
    for at in odd:
        lines[at] = rng.choice(BLANK + [b for b, _ in BAD])
    block = parse_block(10, lines, Fields("text", "id", None, "a.jsonl"))
    assert block.rest == odd
    assert len(block.ids) == len(block.texts) == len(block.metas) == len(block.chars) == 300 - len(odd)


@pytest.mark.parametrize("seed", range(4))
def test_bad_lines_at_random_places_keep_their_exact_line_numbers(tmp_path, monkeypatch, paragraphs, seed):
    rng = random.Random(100 + seed)
    lines = [_valid_line(i, rng, paragraphs, True) for i in range(6000)]
    expected = {}
    for at in rng.sample(range(6000), 150):
        bad, reason = rng.choice(BAD)
        lines[at] = bad
        expected[at + 1] = reason
    for at in rng.sample(sorted(set(range(6000)) - {n - 1 for n in expected}), 30):
        lines[at] = rng.choice(BLANK)
    path = tmp_path / "in" / "bad.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setattr(jsonl, "_BLOCK", 1 << 16)
    params = {"id_field": "id", "batch_rows": 500, "shard_bytes": rng.choice([300_000, 10**9])}
    bulk, bulk_fails = _read(path, tmp_path, True, monkeypatch, **params)
    line, line_fails = _read(path, tmp_path, False, monkeypatch, **params)
    _same_batches(bulk, line)
    assert bulk_fails == line_fails
    assert {f["line"]: f["reason"] for f in bulk_fails} == expected
    assert all(f["file"] == str(path) and f["record"] for f in bulk_fails)
    assert sum(b.num_rows for b in bulk) == 6000 - 150 - 30


def _compress(data: bytes, codec: str | None) -> bytes:
    if codec == "gz":
        return gzip.compress(data, mtime=0)
    if codec == "zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.mark.parametrize("codec", [None, "gz", "zst"])
def test_a_file_cut_at_a_random_byte_reads_alike(tmp_path, monkeypatch, paragraphs, codec):
    for seed in range(3):
        rng = random.Random(200 + seed)
        lines = [_valid_line(i, rng, paragraphs, True) for i in range(1500)]
        bad_at = rng.sample(range(1500), 20)
        for at in bad_at:
            lines[at] = rng.choice(BAD)[0]
        whole = _compress(b"\n".join(lines) + b"\n", codec)
        cut = rng.randrange(len(whole) // 3, len(whole) - 1)
        suffix = f".jsonl.{codec}" if codec else ".jsonl"
        path = tmp_path / f"in{seed}" / f"cut{suffix}"
        path.parent.mkdir()
        path.write_bytes(whole[:cut])
        monkeypatch.setattr(jsonl, "_BLOCK", 1 << 15)
        params = {"id_field": "id", "batch_rows": 300, "shard_bytes": rng.choice([100_000, 10**9])}
        bulk, bulk_fails = _read(path, tmp_path / f"r{seed}", True, monkeypatch, **params)
        line, line_fails = _read(path, tmp_path / f"r{seed}", False, monkeypatch, **params)
        _same_batches(bulk, line)
        assert bulk_fails == line_fails
        damage = [f for f in bulk_fails if f["reason"] in ("truncated_input", "corrupt_input")]
        if codec:  # a cut stream is always named; a plain cut only when the partial line is not valid JSON
            assert len(damage) == 1 and damage[0]["reason"] == "truncated_input"
        assert len(damage) <= 1
        kept = sum(b.num_rows for b in bulk)
        assert kept > 0 and all(f["line"] <= 1500 for f in bulk_fails)
        if damage:  # every whole line before the damage was read: documents and bad lines add up
            last = damage[0]["line"]
            assert kept + sum(1 for f in bulk_fails if f["line"] <= last and f is not damage[0]) == last


def test_a_bom_before_the_first_line_and_a_last_line_without_newline(tmp_path, monkeypatch):
    for data in (b'\xef\xbb\xbf{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}',
                 b'\xef\xbb\xbf{"id": 1, "text": "only"}', b'\xef\xbb\xbf\n{"id": 1, "text": "x"}\n'):
        path = tmp_path / "in" / "bom.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        bulk, bulk_fails = _read(path, tmp_path / "b", True, monkeypatch, id_field="id")
        line, line_fails = _read(path, tmp_path / "l", False, monkeypatch, id_field="id")
        _same_batches(bulk, line)
        assert bulk_fails == line_fails


def test_batch_cutter_cuts_where_document_builder_cuts(paragraphs):
    """Rows added one by one and in runs give DocumentBuilder's batches: same cuts, arrays and nbytes."""
    rng = random.Random(3)
    docs = [(f"id-{i}", _text(rng, paragraphs), "a.jsonl", rng.choice([None, '{"k":1}', '{"é":"😀"}']))
            for i in range(3000)]
    docs += [(f"even-{i}", "é😀" * 50, "a.jsonl", None) for i in range(300)]  # sums that hit a limit exactly
    for rows, limit in ((2048, 16_000_000), (10, 10**9), (10**6, 5000), (37, 4000), (10**6, 1000)):
        ref, ours = DocumentBuilder(rows, limit), BatchCutter(rows, limit)
        want = [b for doc in docs if (b := ref.add(*doc)) is not None] + [ref.flush()]
        want = [b for b in want if b is not None]
        got, i = [], 0
        lines = [orjson.dumps({"id": d[0], "text": d[1], **(orjson.loads(d[3]) if d[3] else {})}) for d in docs]
        while i < len(docs):  # runs of rows from parsed blocks, and single rows, mixed
            n = rng.randint(1, 200)
            if rng.random() < 0.3:
                got += [b for doc in docs[i:i + n] if (b := ours.add(*doc)) is not None]
            else:
                block = parse_block(1, lines[i:i + n], Fields("text", "id", None, "a.jsonl"))
                assert block.rest == []
                got += ours.extend(block, 0, len(block.ids), "a.jsonl")
            i += n
        got.append(ours.flush())
        _same_batches([b for b in got if b is not None], want)


def test_parquet_bytes_are_equal(tmp_path, monkeypatch, paragraphs):
    """Both paths through the Parquet sink (several files, several row groups each): identical files."""
    rng = random.Random(11)
    path = tmp_path / "in" / "p.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(_valid_line(i, rng, paragraphs, True) for i in range(4000)) + b"\n")
    sink_cls = kinds_of("sink")["parquet"]
    monkeypatch.setattr(sink_cls, "buffer_bytes", 100_000)
    files = {}
    for bulk in (True, False):
        batches, _ = _read(path, tmp_path / str(bulk), bulk, monkeypatch, id_field="id", batch_rows=300)
        out = tmp_path / f"out-{bulk}"
        writer = sink_cls(sink_cls.Params(path="parquet", shard_bytes="300KB"), out).writer("00000")
        for b in batches:
            writer.write(b)
        entries = writer.close()
        files[bulk] = [(e["name"], e["samples"], e["sha256"]) for e in entries]
    assert len(files[True]) > 1 and files[True] == files[False]


def test_read_ahead_raises_in_order_and_stops_its_thread_when_closed():
    def items():
        yield from range(5)
        raise ValueError("after five")

    got = []
    with pytest.raises(ValueError, match="after five"):
        for x in read_ahead(items, depth=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]

    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    before = threading.active_count()
    it = read_ahead(endless, depth=3)
    assert [next(it) for _ in range(10)] == list(range(10))
    it.close()  # the consumer stops early: the thread ends, having made at most depth + 1 more
    assert threading.active_count() == before
    assert len(produced) <= 10 + 3 + 1


def test_closing_the_reader_early_stops_reading(tmp_path, paragraphs):
    rng = random.Random(5)
    path = tmp_path / "in" / "e.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(_valid_line(i, rng, paragraphs, True) for i in range(3000)) + b"\n")
    cls = kinds_of("source")["jsonl"]
    reader = cls(cls.Params(paths=[str(path)], id_field="id", batch_rows=10))
    shard = reader.shards()[0]
    rd = RunDir(tmp_path / "run")
    rd.create()
    before = threading.active_count()
    batches = reader.read(shard, RunContext(0, shard, rd))
    assert next(batches).num_rows == 10
    assert threading.active_count() == before + 1
    batches.close()
    assert threading.active_count() == before


def test_joined_column_bytes_equal_a_plain_join():
    from curate.arrays import joined as _joined
    from curate.arrays import utf8 as _utf8

    rng = random.Random(5)
    for n in (0, 1, 7, 300):
        values = [rng.randbytes(rng.choice([0, 1, 5, 4000])) for _ in range(n)]
        assert _joined(values, sum(map(len, values))).to_pybytes() == b"".join(values)
    values = [rng.randbytes(rng.choice([0, 7, 300_000])) for _ in range(12)] + [rng.randbytes(1 << 20)]
    assert _joined(values, sum(map(len, values))).to_pybytes() == b"".join(values)  # pyarrow's pool
    texts = ["", "héllo", "日本語", None, "x" * 70_000]
    arr = _utf8([None if t is None else t.encode() for t in texts])
    arr.validate(full=True)
    assert arr.to_pylist() == texts

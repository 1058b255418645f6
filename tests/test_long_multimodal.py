"""long_multimodal: samples at their token budgets (text + image tokens recounted independently), needles
at the requested depth with answers that point at them, the same bytes across reruns, worker counts and
an injected fault, and hostile rows counted with their reasons."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.context import RunContext
from curate.image_tokens import ImageTokenParams
from curate.images import image_size
from curate.readers.base import Shard
from curate.registry import get_stage
from curate.rundir import RunDir
from curate.schema import INTERLEAVED, validate
from curate.tokenizer import CurateTokenizer
from tests.conftest import cli, make_text, write_manifest
from tests.helpers_tokenizer import prepare_tokenizer
from tests.test_faults import _run as run_in_process


# ---------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def photos():
    """(name, JPEG bytes, caption): real photos plus a few generated pictures."""
    from curate.testing import real_images

    return real_images(size=192)


def _png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _claims(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width × height`` pixels (its data is far too short for that)."""
    import struct
    import zlib

    data = bytearray(_png(8, 8, 0))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _image(data: bytes, mime: str, sized: bool) -> dict:
    w, h = image_size(data) if sized else (None, None)
    return {"bytes": data, "mime": mime, "sha256": hashlib.sha256(data).hexdigest(), "width": w, "height": h}


def _pairs(photos) -> list[dict]:
    return [{"id": f"pair-{name}", "texts": [None, caption], "images": [_image(data, "image/jpeg", k % 2 == 0), None],
             "source": "pairs", "meta": None} for k, (name, data, caption) in enumerate(photos)]


def _docs(n: int, start: int = 0) -> list[dict]:
    """Interleaved documents: texts of 40–220 words with 0–3 generated images between them."""
    rows = []
    for i in range(start, start + n):
        texts, images = [], []
        for part in range(1 + i % 3):
            texts.append(make_text(i * 5 + part, 40 + (i * 37 + part * 11) % 180))
            images.append(None)
            if (i + part) % 2 == 0:
                data = _png(48 + (i * 13) % 160, 40 + (i * 29 + part) % 200, i * 10 + part)
                texts.append(None)
                images.append(_image(data, "image/png", part % 2 == 1))
        rows.append({"id": f"doc-{i}", "texts": texts, "images": images, "source": "docs", "meta": None})
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmm")
    prepare_tokenizer(root, [])
    rd = RunDir(root)
    rd.create()
    return rd


@pytest.fixture(scope="module")
def tok(run_dir):
    return CurateTokenizer.load_run(run_dir.root / "tokenizer")


def _run(rd: RunDir, rows: list[dict], seed: int = 0, batch_rows: int = 7, **params):
    cls = get_stage("long_multimodal")
    stage = cls(cls.Params(**params))
    ctx = RunContext(seed, Shard("00000", "k", "mem"), rd)
    stage.setup(ctx)
    batches = pa.Table.from_pylist(rows, schema=INTERLEAVED).to_batches(max_chunksize=batch_rows)
    out = list(stage.run(iter(batches), ctx))
    ctx.close()
    table = pa.Table.from_batches(out) if out else None
    return table, ctx.stats[stage.label]


def _n(tok, text: str) -> int:
    return len(tok.encode_arrays([text])[0])


def _recount(tok, counter, row: dict) -> tuple[int, int]:
    """(all tokens, image tokens) of an output row, counted here: texts with the run tokenizer, images from
    their header bytes alone, question and answer included."""
    n_text = sum(_n(tok, t) for t in row["texts"] if t is not None)
    n_image = sum(counter.count_image({"bytes": im["bytes"]}) for im in row["images"] if im is not None)
    qa = _n(tok, row["question"]) + _n(tok, row["answer"]) if row["question"] is not None else 0
    return n_text + n_image + qa, n_image


# ---------------------------------------------------------------------- budgets
def test_every_sample_is_within_one_percent_of_its_target(run_dir, tok, photos):
    targets = [600, 1000, 1700]
    rows = _docs(60) + _pairs(photos)
    table, st = _run(run_dir, rows, targets=targets, remainder="drop")
    validate(table, "interleaved")
    counter = ImageTokenParams().counter()
    out = table.to_pylist()
    assert len(out) >= 10
    exact = 0
    for row in out:
        k = int(row["id"].rsplit("-", 1)[1])
        assert row["target_tokens"] == targets[k % len(targets)]  # in turn
        total, n_image = _recount(tok, counter, row)
        assert (total, n_image) == (row["n_tokens"], row["n_image_tokens"])
        assert abs(total - row["target_tokens"]) <= 0.01 * row["target_tokens"]
        exact += total == row["target_tokens"]
        assert row["question"] is None and row["answer"] is None
        assert n_image > 0 or not any(row["images"])
        meta = json.loads(row["meta"])
        assert meta["lineage"] and set(meta["lineage"]) <= {r["id"] for r in rows}
    assert exact >= 0.8 * len(out)
    assert st.drops["short_sample"] == 1  # the end of the shard
    assert st.metrics["texts_cut"].total >= len(out) // 2


def test_with_remainder_kept_every_text_and_image_comes_out_once_in_order(run_dir, photos):
    rows = _docs(40) + _pairs(photos)
    table, st = _run(run_dir, rows, targets=[700, 1100], target_weights=[0.3, 0.7], remainder="keep")
    out = table.to_pylist()
    texts_in = "".join(t for r in rows for t in r["texts"] if t)
    texts_out = "".join(t for r in out for t in r["texts"] if t)
    assert texts_out == texts_in  # cuts are exact prefixes; texts never change order
    shas_in = sorted(im["sha256"] for r in rows for im in r["images"] if im)
    shas_out = sorted(hashlib.sha256(im["bytes"]).hexdigest() for r in out for im in r["images"] if im)
    assert shas_out == shas_in
    short = [r for r in out if json.loads(r["meta"]).get("short")]
    assert len(short) == 1 and short[0] is out[-1] and st.metrics["short_kept"].total == 1
    assert {r["target_tokens"] for r in out} == {700, 1100}
    # images whose size was missing got it from their header
    assert all(im["width"] and im["height"] for r in out for im in r["images"] if im)


# ---------------------------------------------------------------------- needles
def test_needles_sit_at_their_depth_and_the_answer_points_at_them(run_dir, tok, photos):
    rows = _docs(70) + _pairs(photos)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    table, st = _run(run_dir, rows, seed=5, targets=[1500, 2400],
                     insert={"fraction": 1.0, "depths": depths, "pool": 16})
    counter = ImageTokenParams().counter()
    # a needle comes from any row of one image and a short text (a pair): its image and its caption
    captions = {r["id"]: (next(im for im in r["images"] if im)["bytes"], " ".join(t.strip() for t in r["texts"] if t))
                for r in rows if sum(im is not None for im in r["images"]) == 1}
    kinds = {"image": 0, "text": 0}
    seen_depths = set()
    for row in table.to_pylist():
        meta = json.loads(row["meta"])
        ins = meta["insert"]
        assert ins is not None and row["question"] and row["answer"]
        total, _ = _recount(tok, counter, row)
        assert total == row["n_tokens"] and abs(total - row["target_tokens"]) <= 0.01 * row["target_tokens"]
        pos = ins["position"]
        before = sum(_n(tok, t) for t in row["texts"][:pos] if t is not None) + \
            sum(counter.count_image({"bytes": im["bytes"]}) for im in row["images"][:pos] if im is not None)
        assert before == ins["offset"]
        qa = _n(tok, row["question"]) + _n(tok, row["answer"])
        needle = (_n(tok, row["texts"][pos]) if row["texts"][pos] is not None
                  else counter.count_image({"bytes": row["images"][pos]["bytes"]}))
        others = row["n_tokens"] - qa - needle
        assert abs(before / others - ins["depth"]) <= 0.03, (before, others, ins)
        assert ins["depth"] in depths
        seen_depths.add(ins["depth"])
        kinds[ins["kind"]] += 1
        if ins["kind"] == "image":
            image = row["images"][pos]
            data, caption = captions[ins["source"]]
            assert image["bytes"] == data and caption.rstrip(".") in row["question"]
            numbered = [im for im in row["images"] if im is not None]
            assert row["answer"] == str(ins["image_index"])
            assert numbered[int(row["answer"]) - 1]["bytes"] == data
            assert sum(im["bytes"] == data for im in numbered) == 1  # nothing else to confuse it with
            assert ins["source"] in meta["lineage"]
        else:
            assert row["texts"][pos] is not None and row["answer"] in row["texts"][pos]
            assert row["answer"].isdigit() and len(row["answer"]) == 6
            assert sum(row["answer"] in t for t in row["texts"] if t) == 1
    assert kinds["image"] >= 3 and kinds["text"] >= 3
    assert len(seen_depths) >= 4
    assert st.metrics["insert_image"].total == kinds["image"]


def test_output_does_not_depend_on_batching_and_follows_the_seed(run_dir, photos):
    rows = _docs(50) + _pairs(photos) + _docs(30, start=200)
    params = {"targets": [900, 1400], "insert": {"fraction": 0.6, "pool": 3}}
    one, _ = _run(run_dir, rows, seed=9, batch_rows=1, **params)
    many, _ = _run(run_dir, rows, seed=9, batch_rows=64, **params)
    other, _ = _run(run_dir, rows, seed=10, batch_rows=64, **params)
    assert one.equals(many)
    assert not other.equals(many)


def test_a_fraction_of_samples_gets_needles_and_a_pair_shortage_falls_back_to_text(run_dir):
    rows = [r for r in _docs(120) if sum(im is not None for im in r["images"]) != 1]  # no pairs at all
    table, st = _run(run_dir, rows, targets=[800], insert={"fraction": 0.5, "kinds": ["image"]})
    out = table.to_pylist()
    with_needle = [r for r in out if r["question"] is not None]
    assert 0.2 * len(out) <= len(with_needle) <= 0.8 * len(out)
    assert all(json.loads(r["meta"])["insert"]["kind"] == "text" for r in with_needle)
    assert st.metrics["no_image_needle"].total == len(with_needle)
    assert all(r["answer"] is None and json.loads(r["meta"])["insert"] is None for r in out if r["question"] is None)


# ---------------------------------------------------------------------- hostile rows
def test_hostile_rows_are_counted_with_their_reasons(run_dir, tok, photos, monkeypatch):
    big = _claims(8000, 6000)  # qwen2-vl: 1,282 tokens, more than the whole target
    claimed = _claims(300, 200)  # a header Pillow reads, pixel data it could never decode
    rows = _docs(6) + [
        {"id": "empty", "texts": [], "images": [], "source": None, "meta": None},
        {"id": "blank", "texts": ["   ", None], "images": [None, _image(b"\x89PNG broken", "image/png", False)],
         "source": None, "meta": None},
        {"id": "huge-image", "texts": [None, "A very large picture."], "images": [_image(big, "image/png", False), None],
         "source": None, "meta": None},
        {"id": "long-text", "texts": [make_text(7, 2500)], "images": [None], "source": None, "meta": None},
        {"id": "bad-header", "texts": ["Some words before.", None, None, None],
         "images": [None, _image(b"GIF89a\x00", "image/gif", False), _image(photos[0][1], "image/jpeg", False),
                    _image(claimed, "image/png", False)],
         "source": None, "meta": None},
    ] + _docs(6, start=100)
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    table, st = _run(run_dir, rows, targets=[900], remainder="keep", batch_rows=4)
    monkeypatch.undo()
    assert decoded == []  # sizes come from headers: no pixel was decoded to count an image
    assert st.drops["empty_row"] == 2  # no positions; only a blank text and an unreadable image
    assert st.metrics["undecodable_image"].count == 2
    assert st.metrics["image_over_target"].count == 1
    assert st.metrics["texts_over_target"].count == 1
    assert st.metrics["blank_texts"].count == 1
    failures = [json.loads(line) for f in (run_dir.failures).glob("*.jsonl") for line in f.read_text().splitlines()]
    reasons = {f["reason"] for f in failures}
    assert {"empty_row", "undecodable_image", "image_over_target"} <= reasons
    out = table.to_pylist()
    counter = ImageTokenParams().counter()
    for row in out:
        assert _recount(tok, counter, row)[0] == row["n_tokens"]
        if not json.loads(row["meta"]).get("short"):
            assert abs(row["n_tokens"] - 900) <= 9
    # the long text runs through several samples, cut at token boundaries, none of it lost
    assert sum("long-text" in json.loads(r["meta"])["lineage"] for r in out) >= 3
    assert "".join(t for r in out for t in r["texts"] if t) == "".join(
        t for r in rows for t in r["texts"] if t and t.strip())
    assert all(im["bytes"] != big for r in out for im in r["images"] if im)
    kept = [im for r in out for im in r["images"] if im and im["bytes"] == claimed]
    assert len(kept) == 1 and (kept[0]["width"], kept[0]["height"]) == (300, 200)


def test_a_sentencepiece_tokenizer_cuts_exactly_with_zero_tolerance(tmp_path):
    """Llama's SentencePiece tokenizer (a word marker the decoder drops, byte fallback for emoji and CJK):
    with tolerance 0 every kept sample is exactly on target, needle splits included, and no text is lost."""
    pytest.importorskip("transformers", reason="the `text` extra is not installed")
    pytest.importorskip("sentencepiece", reason="the `text` extra is not installed")
    mistral_common = pytest.importorskip("mistral_common", reason="the `text` extra is not installed")
    import os
    import shutil

    from curate.tokenizer import TokenizerSpec, prepare

    folder = tmp_path / "llama"
    folder.mkdir()
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "legacy": False}))
    prepare(TokenizerSpec(path=str(folder)), tmp_path / "tokenizer", [], lambda: iter([]))
    rd = RunDir(tmp_path)
    rd.create()
    tok = CurateTokenizer.load_run(tmp_path / "tokenizer")
    odd = ["Ünïcödé façade, naïve café. " * 30, "長い文脈のモデルは本全体を読む。" * 20, "Emoji 🙂🤖 run " * 30]
    rows = [{"id": f"d{i}", "texts": [odd[i % 3] if i % 5 == 0 else make_text(i, 40 + i * 7 % 160)], "images": [None],
             "source": None, "meta": None} for i in range(100)]
    table, st = _run(rd, rows, targets=[300, 512], tolerance=0.0, remainder="keep",
                     insert={"fraction": 1.0, "kinds": ["text"]})
    out = table.to_pylist()
    counter = ImageTokenParams().counter()
    short = [r for r in out if json.loads(r["meta"]).get("short")]
    for row in out:
        assert _recount(tok, counter, row)[0] == row["n_tokens"]
        assert row in short or row["n_tokens"] == row["target_tokens"]
    assert len(short) <= 0.15 * len(out) and not st.drops  # byte-fallback runs can make an exact cut impossible
    assert all(r["question"] is not None for r in out)
    kept = "".join(t for r in out for j, t in enumerate(r["texts"]) if t and j != json.loads(r["meta"])["insert"]["position"])
    assert kept == "".join(t for r in rows for t in r["texts"] if t)


def test_impossible_parameters_are_refused():
    cls = get_stage("long_multimodal")
    for bad in ({"targets": []}, {"targets": [8]}, {"targets": [100, 200], "target_weights": [1.0]},
                {"tolerance": 0.5}, {"insert": {"depths": [1.5]}}, {"insert": {"kinds": []}},
                {"insert": {"kinds": ["image"], "kind_weights": [0.0]}}, {"remainder": "pad"}):
        with pytest.raises(ValueError):
            cls.Params(**bad)


# ---------------------------------------------------------------------- the real CLI
def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("lmm-cli")
    data = root / "shards"
    data.mkdir()
    for shard in range(3):
        samples = []
        for i in range(30):
            n = shard * 100 + i
            members = {"txt": make_text(n, 60 + (n * 31) % 200).encode()}
            for j in range(n % 3):
                members[f"{j}.png"] = _png(40 + (n * 17 + j) % 150, 50 + (n * 7) % 120, n * 3 + j)
            samples.append((f"doc{n:04d}", members))
        for k, (name, jpg, caption) in enumerate(photos[shard * 5:shard * 5 + 5]):
            samples.insert(k * 6, (f"pair-{name}", {"jpg": jpg, "txt": caption.encode()}))
        _tar(data / f"part-{shard}.tar", samples)
    manifest = write_manifest(root / "m.yaml", f"""
        name: lmm-test
        seed: 3
        source: {{kind: webdataset, paths: ["{data}/*.tar"], schema: interleaved}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - long_multimodal:
              targets: [800, 1300]
              insert: {{fraction: 0.7, pool: 4}}
        sink:
          - {{kind: parquet}}
          - {{kind: webdataset}}
        executor: {{kind: local}}
        """)
    return root, manifest


def output_digest(run: Path) -> dict[str, str]:
    out = {}
    for sink in ("parquet", "webdataset"):
        for p in sorted((run / sink).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(run))] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert any(k.endswith("index.json") for k in out)
    return out


def test_cli_output_is_identical_across_workers_reruns_and_a_fault(cli_inputs):
    root, manifest = cli_inputs
    cli("run", str(manifest), "-o", str(root / "w1"), "-w", "1", "--no-progress")
    cli("run", str(manifest), "-o", str(root / "w2"), "-w", "2", "--no-progress")
    reference = output_digest(root / "w1")
    assert output_digest(root / "w2") == reference
    # a fault inside the stage on one shard, then a plain rerun: the bytes of a run that never failed
    fault = [{"point": "stage", "label": "long_multimodal", "shard": "00001", "after": 1}]
    assert run_in_process(manifest, root / "faulted", fault) is not None
    assert not (root / "faulted" / "stats.json").exists()
    assert run_in_process(manifest, root / "faulted") is None
    assert output_digest(root / "faulted") == reference

    table = pa.concat_tables(pq.read_table(p) for p in sorted((root / "w1" / "parquet").glob("*.parquet")))
    validate(table, "interleaved")
    stats = json.loads((root / "w1" / "stats.json").read_text())
    st = stats["stages"]["long_multimodal"]
    assert st["rows_out"] == table.num_rows > 6 and st["tokens_out"] == sum(table.column("n_tokens").to_pylist())
    for row in table.to_pylist():
        assert abs(row["n_tokens"] - row["target_tokens"]) <= 0.01 * row["target_tokens"]
        assert row["id"].startswith("lmm-0000")
    assert any(r is not None for r in table.column("question").to_pylist())

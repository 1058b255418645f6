"""Hostile inputs and faults for the multimodal stages, written from the outside.

Every stage gets the same kinds of bad input: rows whose ``texts``/``images`` are not aligned (lengths
differ, both or neither set at a position, null lists), images that are null, empty, HTML, truncated,
1 × 1, a 1 × 20,000 strip, a header claiming 60,000 × 60,000 pixels (a bomb nobody may decode), an
animated GIF, a CMYK JPEG and a 16-bit PNG, texts that are empty, blank, one 200,000-character sentence
without punctuation, or full of NUL, RTL marks and emoji (a lone surrogate cannot become Arrow text at
all; readers count such input as ``invalid_utf8``), ids with ``/``, ``..``, newlines, quotes and
5,000 characters, duplicate ids, batches where every row is bad, empty shards. For each: the stage
finishes, every row and image that goes is counted under a reason (and listed in ``failures/`` where
the stage lists failures), what comes out is valid interleaved data, and nothing leaves silently. A
configuration mistake is a ConfigError naming the field. The last test runs one multimodal manifest
through the real CLI, kills a worker by pid in the middle of a shard, and checks that a plain rerun
writes the bytes of a clean run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.image_tokens import ImageTokenParams
from curate.schema import INTERLEAVED, validate
from tests.conftest import make_stage, make_text

PIL = pytest.importorskip("PIL", reason="the `img` extra is not installed")
from PIL import Image, ImageFile

#: The interleaved schema with every field nullable, so that hostile rows (null lists) can be built.
LOOSE = pa.schema([f.with_nullable(True) for f in INTERLEAVED])
BOMB_SIDE = 60_000
WEIRD_IDS = ["a/b/c", "../../etc/passwd", "..", "line\nbreak", "quote'\"`", "<script>alert(1)</script>",
             "x" * 5000, "tab\tand\u202eRTL"]


# ---------------------------------------------------------------------------------------------- inputs
def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(seed: int, width: int = 200, height: int = 180) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def header_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid PNG whose header claims ``side × side`` RGB pixels (10.8 GB decoded), ~70 bytes long."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_noise(40 + k, 180, 180)).convert("P") for k in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


@pytest.fixture(scope="module")
def hostile() -> dict[str, bytes | None]:
    """Name → image bytes. ``unreadable`` ones have no header Pillow reads; ``broken`` ones have a
    header but no decodable pixels; the rest decode (the bomb is refused before decoding)."""
    jpeg = _encode(Image.fromarray(_noise(1)), "JPEG", quality=90)
    png = _encode(Image.fromarray(_noise(2)), "PNG")
    sixteen = Image.fromarray(_noise(3)[:, :, 0].astype(np.uint16) * 257)  # mode I;16
    return {
        "null": None,
        "empty": b"",
        "html": b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>",
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "truncated_png": png[: len(png) // 2],
        "one_pixel": _encode(Image.new("RGB", (1, 1), (250, 10, 10)), "PNG"),
        "strip": _encode(Image.fromarray(_noise(4, 1, 20_000)), "PNG"),  # 1 wide, 20,000 high
        "bomb": header_bomb(),
        "animated_gif": _animated_gif(),
        "cmyk_jpeg": _encode(Image.fromarray(_noise(5)).convert("CMYK"), "JPEG"),
        "png16": _encode(sixteen, "PNG"),
        "photo_jpeg": jpeg,
        "photo_png": png,
    }


UNREADABLE = {"null", "empty", "html"}  # no header: size unknown, never an image
BROKEN = {"truncated_jpeg", "truncated_png"}  # a header, pixels that do not decode


@pytest.fixture(scope="module")
def photos():
    from curate.testing import real_images

    return real_images()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tests.helpers_tokenizer import prepare_tokenizer

    return prepare_tokenizer(tmp_path_factory.mktemp("hostile-tok"), [])


@pytest.fixture
def run_dir(tmp_path, tokenizer_dir) -> Path:
    """A run directory of its own (its own failures/) holding the prepared run tokenizer."""
    shutil.copytree(tokenizer_dir, tmp_path / "run" / "tokenizer")
    return tmp_path / "run"


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image whose pixels Pillow decodes while the test runs."""
    sizes: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(im):
        sizes.append(tuple(im.size))
        return real(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def no_bomb_decoded(sizes) -> bool:
    return all(w * h < 100_000_000 for w, h in sizes)


def image(data: bytes | None, width: int | None = None, height: int | None = None,
          mime: str = "image/png") -> dict:
    return {"bytes": data, "mime": mime, "sha256": hashlib.sha256(data).hexdigest() if data else None,
            "width": width, "height": height}


def row(row_id: str, texts, images) -> dict:
    return {"id": row_id, "texts": texts, "images": images, "source": "hostile", "meta": None}


def batches(rows: list[dict], size: int = 1000) -> list[pa.RecordBatch]:
    table = pa.Table.from_pylist(rows, schema=LOOSE)
    return table.to_batches(max_chunksize=size) if rows else []


def misaligned_rows(img: dict) -> list[dict]:
    """Rows that break the interleaved convention, one way each."""
    return [
        row("lengths-differ", ["A text.", None], [None]),
        row("both-set", ["A text with an image at its position."], [img]),
        row("neither-set", ["A text.", None], [None, None]),
        row("null-texts", None, [img]),
        row("null-images", ["A text."], None),
        row("null-both", None, None),
    ]


MISALIGNED = {"lengths-differ", "both-set", "neither-set", "null-texts", "null-images", "null-both"}


def failures(run: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run / "failures").glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def run_stage(name: str, run: Path, rows_or_batches, **params):
    """Run a stage as a worker does; returns (output table or None, stats, failure records)."""
    stage, ctx = make_stage(name, run, **params)
    feed = rows_or_batches if rows_or_batches and isinstance(rows_or_batches[0], pa.RecordBatch) else \
        batches(rows_or_batches)
    out = [b for b in stage.run(iter(feed), ctx) if b.num_rows]
    ctx.close()
    table = pa.Table.from_batches(out) if out else None
    if table is not None:
        validate(table, "interleaved")
    return table, ctx.stats[stage.label], failures(run)


def metric_count(stats, name: str) -> int:
    return stats.metrics[name].count if name in stats.metrics else 0


def metric_sum(stats, name: str) -> float:
    return stats.metrics[name].total if name in stats.metrics else 0


# ------------------------------------------------------------------------------- image-token accounting
EXTREME = [(1, 1), (1, 20_000), (20_000, 1), (BOMB_SIDE, BOMB_SIDE), (0, 0), (None, None), (-4, 300),
           (2**31 - 1, 1), (1, 2**31 - 1), (3, 5000)]


@pytest.mark.parametrize("model", ["fixed", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl", "llava-next"])
def test_image_tokens_never_fail_on_extreme_sizes_or_hostile_bytes(model, hostile, decoded):
    from curate.images import image_size

    params = ImageTokenParams(model=model)
    s, counter = params.settings(), params.counter()
    for w, h in EXTREME:
        n = counter.count(w, h)
        assert isinstance(n, int) and n > s["extra_tokens"], (model, w, h)
        if s["scheme"] == "patch_grid":  # at most max_pixels of merged patches, whatever the size
            assert counter.pad_tokens(w or 1, h or 1) <= s["max_pixels"] // (s["patch_size"] * s["merge_size"]) ** 2
        if s["scheme"] == "tiles":
            assert counter.pad_tokens(w or 1, h or 1) <= (s["max_tiles"] + 1) * s["tokens_per_tile"]
    if s["scheme"] == "patch_grid":  # beyond the processors' 200:1 limit: the clamped image's count
        assert counter.count(1, 20_000) == counter.count(1, 200)
        assert counter.count(20_000, 1) == counter.count(200, 1)
    for name, data in hostile.items():
        n = counter.count_image(image(data))
        if name in UNREADABLE:
            assert n == counter.count(1, 1), name  # unknown size: the smallest image's cost
        else:
            assert n == counter.count(*image_size(data)), name
    # a non-positive size in the struct is no size: the header is read, as image_size does
    photo = hostile["photo_jpeg"]
    for w, h in [(-4, 300), (0, 180), (200, -1)]:
        assert counter.count_image(image(photo, w, h)) == counter.count(200, 180), (w, h)
    assert image_size(hostile["bomb"]) == (BOMB_SIDE, BOMB_SIDE) and decoded == []


@pytest.mark.slow
def test_extreme_sizes_equal_the_processors(hostile):
    """Where the processors accept a size (any for InternVL's tiles, up to 200:1 for Qwen), the count is
    theirs; beyond 200:1 Qwen refuses and the count is the clamped image's."""
    pytest.importorskip("transformers", reason="the `text` extra is not installed")
    from transformers import GotOcr2ImageProcessor, Qwen2VLImageProcessor

    tiles = GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=12,
                                  size={"height": 448, "width": 448})
    internvl = ImageTokenParams(model="internvl").counter()
    qwen = Qwen2VLImageProcessor(patch_size=14, merge_size=2, size={"shortest_edge": 3136, "longest_edge": 1003520})
    grid = ImageTokenParams(model="qwen2-vl").counter()
    for w, h in [(1, 1), (1, 20_000), (20_000, 1), (BOMB_SIDE, BOMB_SIDE), (1, BOMB_SIDE), (3, 5000)]:
        assert internvl.pad_tokens(w, h) == tiles.get_number_of_image_patches(h, w, {}) * 256, (w, h)
    for w, h in [(1, 1), (1, 200), (200, 1), (BOMB_SIDE, BOMB_SIDE), (2, 400)]:
        assert grid.pad_tokens(w, h) == qwen.get_number_of_image_patches(h, w, {}) // 4, (w, h)
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen.get_number_of_image_patches(20_000, 1, {})


# ----------------------------------------------------------------------------------------- count_tokens
def _hostile_rows(hostile, extra_text: str = "Some words before the picture.") -> list[dict]:
    return [row(f"img-{name}", [extra_text, None], [None, image(data)]) for name, data in hostile.items()]


def _text_rows() -> list[dict]:
    return [
        row("empty-lists", [], []),
        row("empty-string", [""], [None]),
        row("blank", ["   \n\t  "], [None]),
        row("no-punctuation", [" ".join(make_text(i, 200)[:-1].lower() for i in range(150))], [None]),
        row("unicode", ["NUL\x00here \u202eRTL override\u202c \u200f emoji 🎉👩‍👩‍👧 \ufeff end"], [None]),
    ] + [row(w, ["An ordinary sentence."], [None]) for w in WEIRD_IDS] + [
        row("dup", ["First of two rows with one id."], [None]),
        row("dup", ["Second of two rows with one id."], [None]),
    ]


def test_count_tokens_on_hostile_rows(run_dir, hostile, decoded):
    from curate.images import image_size
    from curate.tokenizer import CurateTokenizer

    photo = image(hostile["photo_jpeg"])
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate never reaches a stage: Arrow text is UTF-8
        batches([row("surrogate", ["half a pair: \ud800"], [None])])
    rows = _hostile_rows(hostile) + _text_rows() + misaligned_rows(photo) + [
        row("negative-size", [None, "Its struct says -4 wide."], [image(hostile["photo_jpeg"], -4, 300), None])]
    table, st, fails = run_stage("count_tokens", run_dir, rows, image_tokens={"model": "qwen2-vl"})
    assert len(rows) == table.num_rows + sum(st.drops.values())
    assert dict(st.drops) == {"misaligned_row": len(MISALIGNED)}
    assert sorted(f["record"] for f in fails) == sorted(MISALIGNED)
    assert {f["reason"] for f in fails} == {"misaligned_row"}
    assert table.column("id").to_pylist() == [r["id"] for r in rows if r["id"] not in MISALIGNED]
    tok = CurateTokenizer.load_run(run_dir / "tokenizer")
    counter = ImageTokenParams(model="qwen2-vl").counter()
    for out in table.to_pylist():
        texts = [t for t in out["texts"] if t]
        text_tokens = sum(len(ids) for ids in tok.encode_arrays(texts)) if texts else 0
        sizes = [image_size(im["bytes"]) if im["bytes"] else (None, None) for im in out["images"] if im]
        image_tokens = sum(counter.count(w, h) for w, h in sizes)
        assert (out["n_tokens"], out["n_image_tokens"]) == (text_tokens + image_tokens, image_tokens), out["id"]
    assert metric_count(st, "unknown_image_size") == len(UNREADABLE)
    assert decoded == []  # sizes come from headers: nothing is decoded, the bomb least of all
    # an empty shard, and a batch in which every row is bad
    assert run_stage("count_tokens", run_dir, [])[0] is None
    table, st, _ = run_stage("count_tokens", run_dir, misaligned_rows(photo))
    assert table is None and st.drops["misaligned_row"] == len(MISALIGNED)


# ---------------------------------------------------------------------------------------- image filters
@pytest.mark.parametrize(("name", "params"), [
    ("image_size", {}),
    ("image_size", {"min_side": 1, "min_aspect": None, "max_aspect": None, "min_images": 1}),
    ("image_dedup", {}),
    ("image_dedup", {"min_images": 1}),
])
def test_image_filters_on_hostile_rows(run_dir, hostile, photos, decoded, name, params):
    pytest.importorskip("imagehash", reason="the `img` extra is not installed")
    photo = image(photos[0][1], mime="image/jpeg")
    rows = (_hostile_rows(hostile) + _text_rows() + misaligned_rows(photo)
            + [row("identical", ["Three copies.", None, None, None], [None, photo, photo, photo])]
            + [row(w, ["Same id as a photo row.", None], [None, photo]) for w in WEIRD_IDS[:3]])
    table, st, fails = run_stage(name, run_dir, batches(rows, 7), **params)
    # rows: every input row is out or counted under a reason
    assert len(rows) == (table.num_rows if table is not None else 0) + sum(st.drops.values())
    assert st.drops["misaligned_row"] == len(MISALIGNED)
    # images: every image of an aligned row is out or counted under a reason
    aligned = [r for r in rows if r["id"] not in MISALIGNED]
    images_in = sum(im is not None for r in aligned for im in r["images"])
    out_rows = table.to_pylist() if table is not None else []
    images_out = sum(im is not None for r in out_rows for im in r["images"])
    removed = {k: v.count for k, v in st.metrics.items()}
    assert images_in == images_out + sum(removed.values())  # min_images 1 drops only rows left with none
    if params.get("min_images"):
        assert st.drops["too_few_images"] == len(aligned) - len(out_rows)
    # the reasons are the ones the documentation gives, for the images that deserve them
    by_id = {r["id"]: r for r in out_rows}
    assert removed.get("image_too_large", 0) >= 1  # the bomb, never decoded
    assert no_bomb_decoded(decoded)
    if name == "image_size":
        assert decoded == []  # headers only
        assert removed["undecodable_image"] == len(UNREADABLE)  # so broken pixels pass here
    else:
        assert removed["undecodable_image"] == len(UNREADABLE | BROKEN)
        assert removed["duplicate_image_in_document"] == 2  # the three identical copies keep one
        for ok in ("img-animated_gif", "img-cmyk_jpeg", "img-png16", "img-one_pixel", "img-strip"):
            assert sum(im is not None for im in by_id[ok]["images"]) == 1, ok  # decoded, hashed, kept
    # failures/: each misaligned row and each unreadable image, under its row's id
    records = Counter((f["reason"], f["record"]) for f in fails)
    assert {r for (reason, r) in records if reason == "misaligned_row"} == MISALIGNED
    expected_bad = UNREADABLE if name == "image_size" else UNREADABLE | BROKEN
    assert {r for (reason, r) in records if reason == "undecodable_image"} == {f"img-{n}" for n in expected_bad}
    # texts are untouched, rows stay in order
    originals = iter(r for r in rows if r["id"] not in MISALIGNED)
    for r in out_rows:
        original = next(x for x in originals if x["id"] == r["id"])
        assert [t for t in r["texts"] if t is not None] == [t for t in original["texts"] if t is not None]


def test_image_filters_on_an_empty_shard_and_an_all_bad_batch(run_dir, hostile):
    pytest.importorskip("imagehash", reason="the `img` extra is not installed")
    bad = [row(f"bad-{k}", ["Text.", None], [None, image(data)]) for k, data in enumerate(
        [None, b"", b"<html></html>", hostile["bomb"]])]
    for name in ("image_size", "image_dedup"):
        assert run_stage(name, run_dir, [])[0] is None
        table, st, _ = run_stage(name, run_dir, misaligned_rows(image(hostile["photo_jpeg"])))
        assert table is None and st.drops == {"misaligned_row": len(MISALIGNED)}
        table, st, _ = run_stage(name, run_dir, bad, min_images=1)
        assert table is None and st.drops == {"too_few_images": len(bad)}
        assert metric_count(st, "undecodable_image") == 3 and metric_count(st, "image_too_large") == 1


# ------------------------------------------------------------------------------------------- interleave
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
    from curate.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("hostile-clip"))


def test_interleave_on_hostile_rows(run_dir, hostile, photos, tiny_clip, decoded):
    pytest.importorskip("scipy", reason="the `img` extra is not installed")
    from synthesizers.interleave import _document

    captions = " ".join(c for _, _, c in photos[:4])
    p = [image(d, mime="image/jpeg") for _, d, _ in photos]
    long_words = " ".join(make_text(i, 200)[:-1].lower() for i in range(170))  # ~200,000 characters, no '.'
    rows = (_hostile_rows(hostile, captions) + misaligned_rows(p[0]) + [
        row("empty-lists", [], []),
        row("blank", ["   \n\t  ", None], [None, p[0]]),
        row("one-sentence-three-images", ["Only one sentence here.", None, None, None], [None, p[0], p[1], p[2]]),
        row("identical-images", [captions, None, None, None], [None, p[3], p[3], p[3]]),
        row("images-first", [None, None, captions], [p[4], p[5], None]),
        row("long-sentence", [long_words, None], [None, p[6]]),
        row("no-spaces", ["字" * 20_000, None], [None, p[7]]),
        row("unicode", ["NUL\x00 here. \u202eRTL\u202c text. Emoji 🎉👩‍👩‍👧. \ufeff", None], [None, p[8]]),
        row("text-only", [captions], [None]),
    ] + [row(w, [captions, None], [None, p[k % len(p)]]) for k, w in enumerate(WEIRD_IDS)]
        + [row("dup", [captions, None], [None, p[0]]), row("dup", [captions, None], [None, p[1]])])
    table, st, fails = run_stage("interleave", run_dir, batches(rows, 9), model=str(tiny_clip),
                                 min_similarity=-1.0, batch_size=16)
    out = table.to_pylist()
    assert len(rows) == len(out) + sum(st.drops.values())
    assert dict(st.drops) == {"misaligned_row": len(MISALIGNED), "no_text": 2}
    # images: every candidate is placed or counted under a reason
    m = {k: v.total for k, v in st.metrics.items()}
    placed = sum(im is not None for r in out for im in r["images"])
    assert m["images_in"] == placed + m.get("undecodable_image", 0) + m.get("image_too_large", 0) + \
        m.get("images_below_floor", 0) + m.get("surplus_images", 0) + m.get("images_without_sentence", 0)
    assert m["images_kept"] == placed and m["surplus_images"] == 2
    assert m["image_too_large"] == 1 and m["undecodable_image"] == len(UNREADABLE | BROKEN)
    assert no_bomb_decoded(decoded)
    bad = {(f["reason"], f["record"]) for f in fails}
    assert {r for reason, r in bad if reason == "misaligned_row"} == MISALIGNED
    assert {r for reason, r in bad if reason in ("undecodable_image", "image_too_large")} == \
        {f"img-{n}" for n in UNREADABLE | BROKEN | {"bomb"}}
    # every kept row keeps its whole text, in order; exotic but valid images are placed
    by_id = {}
    for r in out:
        by_id.setdefault(r["id"], []).append(r)
    for r in rows:
        if r["id"] in MISALIGNED or r["id"] in ("empty-lists", "blank"):
            continue
        kept = by_id[r["id"]].pop(0)
        assert "".join(t for t in kept["texts"] if t is not None) == _document(r["texts"]), r["id"][:40]
    assert {r["id"] for r in out if any(im is not None for im in r["images"])} >= \
        {f"img-{n}" for n in ("animated_gif", "cmyk_jpeg", "png16", "one_pixel", "strip", "photo_jpeg", "photo_png")}
    three = next(r for r in out if r["id"] == "identical-images")
    assert sum(im is not None for im in three["images"]) == 3  # copies are image_dedup's to remove
    # a batch where every row is bad gives nothing, all counted
    table, st, _ = run_stage("interleave", run_dir, misaligned_rows(p[0]) + [row("blank", [" "], [None])],
                             model=str(tiny_clip))
    assert table is None and st.drops == {"misaligned_row": len(MISALIGNED), "no_text": 1}
    assert run_stage("interleave", run_dir, [], model=str(tiny_clip))[0] is None


def test_clip_chunks_fit_the_context_whatever_the_text(tiny_clip):
    """A long text is embedded as chunks that each fit the text encoder: by sentences, then words, then
    characters for a 'word' longer than the context (CJK, emoji, a URL) — none truncated away."""
    stage, _ = make_stage("interleave", model=str(tiny_clip))
    clip = stage.clip
    budget = clip.context - 2
    for text in [" ".join(make_text(i, 200)[:-1] for i in range(30)), "a" * 30_000, "🎉" * 5_000, "字" * 10_000,
                 "https://example.com/" + "x/" * 8_000, "Short. " + "b" * 4_000 + " end."]:
        chunks = clip.chunks(text)
        assert all(len(clip.tokenizer.encode(c)) <= budget for c in chunks)
        assert "".join(chunks).replace(" ", "") == text.replace(" ", "")  # nothing lost, in order
        assert len(chunks) > 1


# ------------------------------------------------------------------------------------------- mm_needle
def _noise_png(seed: int, side: int = 24) -> bytes:
    return _encode(Image.fromarray(_noise(100 + seed, side, side)), "PNG")


def test_mm_needle_with_identical_captions_and_hostile_pairs(run_dir, hostile, decoded):
    same = "The very same caption for every picture."
    rows = [row(f"same-{i}", [None, same], [image(_noise_png(i)), None]) for i in range(12)]
    rows += [row(f"img-{name}", [None, same], [image(data), None]) for name, data in hostile.items()]
    rows += misaligned_rows(image(_noise_png(50)))
    rows += [row(w, [None, same], [image(_noise_png(60 + k)), None]) for k, w in enumerate(WEIRD_IDS)]
    rows += [row("dup", [None, same], [image(_noise_png(80 + k)), None]) for k in range(2)]
    table, st, fails = run_stage("mm_needle", run_dir, batches(rows, 5), grid_sizes=[1, 2], images_per_sample=[1],
                                 cell_size=16, samples_per_pair=2.0, negative_fraction=0.5)
    # every input row is pooled or dropped under a reason with a failure record
    pooled = metric_sum(st, "pool_pairs")
    assert len(rows) == pooled + sum(st.drops.values())
    assert Counter(f["reason"] for f in fails) == Counter(st.drops)
    assert st.drops["misaligned_row"] == len(MISALIGNED)
    assert st.drops["undecodable_image"] == len(UNREADABLE | BROKEN) and st.drops["image_too_large"] == 1
    assert no_bomb_decoded(decoded)
    assert {f["record"] for f in fails} >= {f"img-{n}" for n in UNREADABLE | BROKEN | {"bomb"}} | MISALIGNED
    # with one caption for all, no cell may sit beside the needle and no negative can exist: only 1×1
    # positives come out, everything else is counted as skipped
    out = table.to_pylist()
    metas = [json.loads(r["meta"]) for r in out]
    assert out and all(m["grid"] == 1 and m["positive"] for m in metas)
    assert all(r["answer"] == "1, 1, 1" and r["target"] == {"image": 1, "row": 1, "col": 1} for r in out)
    n_samples = metric_count(st, "positive") + metric_count(st, "negative")
    assert n_samples == len(out) and metric_count(st, "negative") == 0
    assert len(out) + metric_count(st, "too_few_distinct_captions") + metric_count(st, "pool_too_small") in \
        (int(2.0 * pooled), int(2.0 * pooled) + 1)
    # the output ids are the stage's own; the source ids in meta survive JSON whatever they hold
    assert all(r["id"].startswith("mmneedle-00000-") for r in out)
    assert {m["needle"]["id"] for m in metas} <= {r["id"] for r in rows}


def test_mm_needle_on_an_empty_shard_and_an_all_bad_batch(run_dir, hostile):
    assert run_stage("mm_needle", run_dir, [], grid_sizes=[1], images_per_sample=[1])[0] is None
    bad = misaligned_rows(image(_noise_png(1))) + [row("blank", [None, "  "], [image(_noise_png(2)), None])]
    table, st, fails = run_stage("mm_needle", run_dir, bad, grid_sizes=[1], images_per_sample=[1])
    assert table is None and sum(st.drops.values()) == len(bad) == len(fails)


# -------------------------------------------------------------------------------------- long_multimodal
def _claims(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width × height`` pixels."""
    data = bytearray(_encode(Image.fromarray(_noise(9, 8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _rotated_tiff() -> bytes:
    """A 300 × 100 TIFF whose EXIF orientation (6) shows it 100 × 300."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(_noise(11, 300, 100)), "TIFF", exif=exif)


def test_long_multimodal_on_hostile_rows(run_dir, hostile, decoded):
    from curate.images import decode_rgb, image_size
    from curate.tokenizer import CurateTokenizer

    target = 1000
    huge = _claims(8000, 6000)  # qwen2-vl: 1,282 tokens, more than the target (as is the bomb's 1,227)
    tiff = _rotated_tiff()
    long_words = " ".join(make_text(i, 200)[:-1].lower() for i in range(150))  # ~180,000 characters, no '.'
    rows = (_hostile_rows(hostile, make_text(3, 60)) + misaligned_rows(image(hostile["photo_png"])) + [
        row("only-a-huge-image", [None], [image(huge)]),
        row("huge-image-and-caption", [None, "A huge picture."], [image(huge), None]),
        row("rotated-tiff", [make_text(4, 30), None], [None, image(tiff, mime="image/tiff")]),
        row("negative-size", [make_text(5, 30), None], [None, image(hostile["photo_jpeg"], -4, 300)]),
        row("long-sentence", [long_words], [None]),
        row("unicode", ["NUL\x00 here \u202eRTL\u202c text 🎉👩‍👩‍👧 " * 40], [None]),
        row("empty-lists", [], []),
        row("blank", ["  \n "], [None]),
    ] + [row(w, [make_text(20 + k, 40)], [None]) for k, w in enumerate(WEIRD_IDS)]
        + [row("dup", [make_text(40, 30)], [None]), row("dup", [make_text(41, 30)], [None])])
    table, st, fails = run_stage("long_multimodal", run_dir, batches(rows, 6), targets=[target],
                                 remainder="keep", image_tokens={"model": "qwen2-vl"})
    out = table.to_pylist()
    # every row reaches the output (lineage) or is dropped under a reason with a failure record; a
    # position with both a text and an image keeps the text, one with neither is skipped (both counted)
    misaligned = {"lengths-differ", "null-texts", "null-images"}
    dropped = {f["record"] for f in fails if f["reason"] in ("empty_row", "misaligned_row")}
    seen = {i for r in out for i in json.loads(r["meta"])["lineage"]}
    assert {r["id"] for r in rows} == seen | dropped and not seen & dropped
    assert dropped == misaligned | {"null-both", "empty-lists", "blank", "only-a-huge-image"}
    assert dict(st.drops) == {"misaligned_row": 3, "empty_row": 4}
    assert metric_count(st, "empty_positions") == 1 and metric_count(st, "blank_texts") == 1
    # ... and every image reaches the output or is left out under a reason with a failure record
    images_in = sum(im is not None for r in rows if r["id"] not in misaligned for im in (r["images"] or []))
    images_out = sum(im is not None for r in out for im in r["images"])
    left_out = [f for f in fails if f["reason"] in ("undecodable_image", "image_over_target", "image_beside_text",
                                                    "duplicate_image")]
    assert images_in == images_out + len(left_out)
    reasons = {"undecodable_image": len(UNREADABLE), "image_over_target": 3, "image_beside_text": 1}
    assert Counter(f["reason"] for f in left_out) == Counter(reasons)
    assert {k: metric_count(st, k) for k in reasons} == reasons
    assert {f["record"] for f in left_out if f["reason"] == "image_over_target"} == \
        {"only-a-huge-image", "huge-image-and-caption", "img-bomb"}
    assert decoded == []  # sizes from headers only: not a pixel decoded, the bomb least of all
    # lengths: recounted here, text by the run tokenizer and images from their headers
    tok = CurateTokenizer.load_run(run_dir / "tokenizer")
    counter = ImageTokenParams(model="qwen2-vl").counter()
    for r in out:
        texts = [t for t in r["texts"] if t is not None]
        n_text = sum(len(ids) for ids in tok.encode_arrays(texts)) if texts else 0
        n_image = sum(counter.count(*image_size(im["bytes"])) for im in r["images"] if im is not None)
        assert (r["n_tokens"], r["n_image_tokens"]) == (n_text + n_image, n_image)
        if not json.loads(r["meta"]).get("short"):
            assert abs(r["n_tokens"] - r["target_tokens"]) <= 0.01 * r["target_tokens"]
    # the EXIF-rotated TIFF is counted at the size it is shown at (what count_tokens and a decoder see)
    rotated = [im for r in out for im in r["images"] if im is not None and im["bytes"] == tiff]
    assert len(rotated) == 1 and (rotated[0]["width"], rotated[0]["height"]) == decode_rgb(tiff).size == (100, 300)
    negative = [im for r in out for im in r["images"] if im is not None and im["bytes"] == hostile["photo_jpeg"]]
    assert {(im["width"], im["height"]) for im in negative} == {(200, 180)}
    # no text is lost: the texts come out once, in order (cut at token boundaries)
    assert "".join(t for r in out for t in r["texts"] if t) == "".join(
        t for r in rows if r["id"] not in misaligned for t in (r["texts"] or []) if t and t.strip())
    assert sum("long-sentence" in json.loads(r["meta"])["lineage"] for r in out) >= 30
    # an empty shard, and a batch in which every row is bad
    assert run_stage("long_multimodal", run_dir, [], targets=[1000])[0] is None
    table, st, _ = run_stage("long_multimodal", run_dir, misaligned_rows(image(huge))[:1] +
                             [row("only-huge", [None], [image(huge)])], targets=[1000])
    assert table is None and st.drops == {"misaligned_row": 1, "empty_row": 1}


def test_long_multimodal_cuts_a_long_text_in_about_linear_time(run_dir, monkeypatch):
    """One 180,000-character sentence without punctuation filling 60 samples: the text after each cut
    is not re-encoded whole (that was quadratic: 31 × the text's characters went through the tokenizer
    at this size), and the ids it gets are exactly those of encoding it whole."""
    import synthesizers.long_multimodal as lmm
    from curate.tokenizer import CurateTokenizer

    text = " ".join(make_text(i, 200)[:-1].lower() for i in range(150))
    encoded = [0]
    real = CurateTokenizer.encode_arrays

    def counting(self, texts, *args, **kwargs):
        encoded[0] += sum(map(len, texts))
        return real(self, texts, *args, **kwargs)

    monkeypatch.setattr(CurateTokenizer, "encode_arrays", counting)
    table, _, _ = run_stage("long_multimodal", run_dir, [row("long", [text], [None])], targets=[500],
                            remainder="keep")
    assert table.num_rows >= 50 and "".join(t for r in table.to_pylist() for t in r["texts"] if t) == text
    assert encoded[0] < 10 * len(text)
    monkeypatch.undo()
    stage, _ = make_stage("long_multimodal", run_dir, targets=[500])
    item = lmm._Item(lmm.TEXT, 0, "long", text=text, ids=stage.tok.encode_arrays([text])[0])
    for at in (1, 777, 5000, 60_001, len(text) - 40_000):
        assert stage._tail_ids(item, at).tolist() == stage.tok.encode_arrays([text[at:]])[0].tolist(), at


# ------------------------------------------------------------------------------------------ inspect page
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.titles, self.srcs, self._h2 = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "h2":
            self._h2 = ""
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._h2 is not None:
            self._h2 += data

    def handle_endtag(self, tag):
        if tag == "h2":
            self.titles.append(self._h2)
            self._h2 = None


def test_inspect_page_with_hostile_ids_texts_and_jsonl_images(hostile, tmp_path):
    import base64

    from curate.inspect_html import page
    from curate.inspect_output import samples

    jpeg = hostile["photo_jpeg"]
    rows = [{"id": w, "texts": [f"text of {w}", None], "images": [None, image(jpeg, mime="image/jpeg")],
             "meta": json.dumps({"note": w})} for w in WEIRD_IDS]
    rows.append({"id": "jsonl", "texts": [None, "from a JSONL sink: base64 bytes"],
                 "images": [{**image(None), "bytes": base64.b64encode(jpeg).decode()}, None]})
    rows.append({"id": "not-base64", "texts": [None], "images": [{**image(None), "bytes": "<svg onload=x>"}]})
    rows.append({"id": "null-bytes", "texts": ["\x00 \u202e 🎉", None], "images": [None, image(None)]})
    html = page(rows, "</title><script>x</script>")
    parsed = _Page()
    parsed.feed(html)
    assert "script" not in parsed.tags
    assert parsed.titles == [r["id"] for r in rows]  # one section per row, the id intact
    assert len(parsed.srcs) == len(WEIRD_IDS) + 1  # the JSONL row's image shows too
    shown = {hashlib.sha256(base64.b64decode(s.split(",", 1)[1])).digest() for s in parsed.srcs}
    assert shown == {hashlib.sha256(jpeg).digest()}
    # a tar whose text member is not UTF-8 is still shown (a viewer never fails on one member)
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.txt", b"ok \xed\xa0\x80 lone surrogate"), ("k.json", b'{"id": "k"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (got,) = list(samples(path))
    assert got["id"] == "k" and "\ufffd" in got["text"]


def test_sinks_and_page_take_an_image_struct_without_bytes(run_dir, hostile, tmp_path):
    """count_tokens keeps an image whose bytes are null or not an image (it only counts): every sink
    writes such a row and reads it back, and the page shows a placeholder for it."""
    from curate.inspect_html import page
    from curate.inspect_output import samples
    from curate.plugins import kinds_of

    rows = [row("null-bytes", ["Text before.", None], [None, image(None)]),
            row("html-bytes", [None, "Text after."], [image(hostile["html"]), None]),
            row("photo", ["Text.", None], [None, image(hostile["photo_jpeg"], mime="image/jpeg")])]
    table, st, _ = run_stage("count_tokens", run_dir, rows)
    assert table.num_rows == 3 and metric_count(st, "unknown_image_size") == 2
    for kind in ("parquet", "jsonl", "webdataset"):
        cls = kinds_of("sink")[kind]
        sink = cls(cls.Params(), tmp_path / "out")
        writer = sink.writer("00000")
        for batch in table.to_batches():
            writer.write(batch)
        (written,) = writer.close()
        back = list(samples(sink.directory / written["name"], keep_bytes=True))
        assert [r["id"] for r in back] == ["null-bytes", "html-bytes", "photo"], kind
        assert [r["n_tokens"] for r in back] == table.column("n_tokens").to_pylist(), kind
        parsed = _Page()
        parsed.feed(page(back, kind))
        assert parsed.titles == ["null-bytes", "html-bytes", "photo"] and len(parsed.srcs) == 1, kind


# ------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(("stage", "field"), [
    ("image_size: {min_side: 300, max_side: 100}", "min_side"),
    ("image_dedup: {max_distance: 64}", "max_distance"),
    ("interleave: {surplus: keep}", "surplus"),
    ("mm_needle: {grid_sizes: [4], pool_size: 2}", "pool_size"),
    ("mm_needle: {grid_sizes: [0]}", "grid_sizes"),
    ("long_multimodal: {targets: [8]}", "targets"),
    ("long_multimodal: {insert: {depths: [2.0]}}", "depths"),
    ("count_tokens: {image_tokens: {model: gpt-9}}", "image_tokens.model"),
    ("count_tokens: {image_tokens: {min_pixels: 10, max_pixels: 1}}", "min_pixels"),
])
def test_configuration_mistakes_name_the_field(stage, field):
    from curate.errors import ConfigError
    from curate.manifest import loads

    text = ("name: t\nsource: {kind: parquet, paths: [in/*.parquet], schema: table}\n"
            "tokenizer: {train: {vocab_size: 300}}\n"
            f"stages:\n  - {stage}\nsink: {{kind: parquet}}\n")
    with pytest.raises(ConfigError) as e:
        loads(text, "m.yaml")
    assert "m.yaml:5" in str(e.value) and field in str(e.value)


# ------------------------------------------------------------------------- the real CLI, killed mid-shard
INTERNAL = {"completions", "logs", "stats", "global", "phases", "quarantine", "tokenizer", "locks", "cache"}


def _write_inputs(folder: Path, hostile, photos) -> None:
    """Three Parquet shards of interleaved rows: hostile images and rows, weird and duplicate ids, and
    an empty file."""
    folder.mkdir(parents=True)
    p = [image(d, mime="image/jpeg") for _, d, _ in photos]
    first = _hostile_rows(hostile) + misaligned_rows(p[0])[:3]
    html = image(hostile["html"])  # each weird id also gets a failure record
    second = ([row(w, [make_text(k, 30), None, None, None], [None, p[k % len(p)], p[(k + 1) % len(p)], html])
               for k, w in enumerate(WEIRD_IDS)]
              + [row("img-photo_jpeg", ["A duplicate id.", None], [None, p[3]]),
                 row("identical", ["Copies.", None, None], [None, p[4], p[4]])]
              + misaligned_rows(p[0])[3:])
    for name, rows in (("a", first), ("b", second), ("c", [])):
        pq.write_table(pa.Table.from_pylist(rows, schema=LOOSE), folder / f"{name}.parquet")


def _manifest(tmp: Path, data: Path) -> Path:
    path = tmp / "m.yaml"
    path.write_text(f"""name: hostile-multimodal
seed: 5
source: {{kind: parquet, paths: ["{data}/*.parquet"], schema: table, id_field: id, batch_rows: 3}}
tokenizer: {{train: {{vocab_size: 300, min_frequency: 1}}}}
stages:
  - image_size: {{min_side: 1, min_aspect: null, max_aspect: null}}
  - image_dedup: {{}}
  - count_tokens: {{image_tokens: {{model: qwen2-vl}}, v2pe_stride: 64}}
sink:
  - {{kind: parquet}}
  - {{kind: jsonl}}
  - {{kind: webdataset}}
executor: {{kind: local, workers: 2}}
""")
    return path


def _cli(*args, faults=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CURATE_FAULTS", None)
    if faults:
        env["CURATE_FAULTS"] = json.dumps(faults)
    return subprocess.run([sys.executable, "-m", "curate", *args], check=False, env=env, capture_output=True,
                          text=True, timeout=300)


def _digest(run: Path) -> dict[str, str]:
    """sha256 of every output file and failure record file, by path in the run directory."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if p.is_file() and rel.parts[0] not in INTERNAL and rel.parts[0] not in ("fingerprint", "stats.json",
                                                                                 "manifest.resolved.yaml", "lock"):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert any(k.endswith("index.json") for k in out)
    return out


def test_cli_run_on_hostile_shards_then_killed_mid_shard_reruns_to_the_same_bytes(tmp_path, hostile, photos):
    pytest.importorskip("imagehash", reason="the `img` extra is not installed")
    data = tmp_path / "in"
    _write_inputs(data, hostile, photos)
    manifest = _manifest(tmp_path, data)
    clean = tmp_path / "clean"
    proc = _cli("run", str(manifest), "-o", str(clean), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((clean / "stats.json").read_text())["stages"]
    for label in ("image_size", "image_dedup", "count_tokens"):
        st = stats[label]
        assert st["rows_in"] == st["rows_out"] + sum(st["drops"].values()), label
    n_in = sum(pq.ParquetFile(p).metadata.num_rows for p in data.glob("*.parquet"))
    assert stats["read"]["rows_out"] == n_in
    assert stats["image_size"]["drops"] == {"misaligned_row": len(MISALIGNED)}
    assert stats["image_size"]["metrics"]["image_too_large"]["count"] == 1  # the bomb, by its header
    table = pa.concat_tables(pq.read_table(p) for p in sorted((clean / "parquet").glob("*.parquet")))
    validate(table, "interleaved")
    assert table.num_rows == stats["count_tokens"]["rows_out"] == n_in - len(MISALIGNED)
    ids = table.column("id").to_pylist()
    assert set(WEIRD_IDS) <= set(ids) and ids.count("img-photo_jpeg") == 2
    # V2PE positions (stride 64 of 256: an image of k tokens spans ceil(k / 4)): as many as tokens in a row
    # without images, fewer in one with any (a Qwen2-VL image is at least 4 tokens)
    n_tok, n_img, n_pos = (table.column(c).to_pylist() for c in ("n_tokens", "n_image_tokens", "n_positions"))
    assert all((p == t) if i == 0 else (p < t) for t, i, p in zip(n_tok, n_img, n_pos, strict=True))
    assert any(i > 0 for i in n_img)
    records = failures(clean)
    assert {r["record"] for r in records if r["reason"] == "misaligned_row"} == MISALIGNED
    weird = [r for r in records if r["reason"] == "undecodable_image" and not r["record"].startswith("img-")]
    assert sorted(r["record"] for r in weird) == sorted(w[:2000] for w in WEIRD_IDS)  # records keep 2,000 chars
    assert all(any(repr(w) in r["detail"] for r in weird) for w in WEIRD_IDS)  # the detail names the whole id
    # the HTML page of every sink: one section per row, ids intact, no markup from the data
    for sink in ("parquet", "jsonl", "webdataset"):
        page = tmp_path / f"{sink}.html"
        proc = _cli("inspect", str(clean / sink), "-n", "100", "--html", str(page))
        assert proc.returncode == 0, proc.stderr
        parsed = _Page()
        parsed.feed(page.read_text(encoding="utf-8"))
        assert "script" not in parsed.tags
        assert parsed.titles == ids
        assert len(parsed.srcs) == sum(im is not None for r in table.to_pylist() for im in r["images"])

    # SIGKILL of the worker running shard 00001 after its first batch left count_tokens
    run = tmp_path / "run"
    kill = [{"point": "stage", "label": "count_tokens", "shard": "00001", "after": 1, "action": "kill"}]
    killed = _cli("run", str(manifest), "-o", str(run), "--no-progress", faults=kill)
    assert killed.returncode != 0 and "00001" in killed.stderr
    assert not (run / "stats.json").exists()
    again = _cli("run", str(manifest), "-o", str(run), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert _digest(run) == _digest(clean)

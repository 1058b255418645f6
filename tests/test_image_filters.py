"""image_size and image_dedup: images removed from interleaved rows, each counted under its reason.

Inputs are real photos (scikit-image's bundled ones, :func:`curate.testing.real_images`); near-duplicates
are made here by re-encoding, resizing and brightening them; hostile images are a truncated JPEG, a 1x1
PNG and a PNG whose header claims 40,000 x 40,000 pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.schema import INTERLEAVED, validate
from tests.conftest import cli, make_stage, write_manifest

imagehash = pytest.importorskip("imagehash", reason="the `img` extra is not installed")
pytest.importorskip("scipy", reason="the `img` extra is not installed")

from PIL import Image, ImageEnhance

#: Photos whose re-encoded, resized and brightened copies stay within phash distance 5 of them.
STABLE = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "brick")


# ------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    from curate.testing import real_images

    return {name: data for name, data, _ in real_images()}


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def reencoded(data: bytes) -> bytes:
    return _encode(_open(data), quality=60)


def resized(data: bytes) -> bytes:
    im = _open(data)
    return _encode(im.resize((im.width * 3 // 4, im.height * 3 // 4)), "PNG")


def brighter(data: bytes) -> bytes:
    return _encode(ImageEnhance.Brightness(_open(data)).enhance(1.08), "WEBP", quality=90)


def wide(data: bytes) -> bytes:
    """A panorama (480 x 160, aspect 3:1, both sides at least 150): the photo's top strip, enlarged."""
    im = _open(data)
    return _encode(im.crop((0, 0, im.width, im.width // 3)).resize((480, 160)))


def tiny() -> bytes:
    return _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")


def header_bomb(side: int = 40_000) -> bytes:
    """A valid PNG header claiming side x side RGB pixels, with one tiny IDAT: ~70 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 3]


def phash(data: bytes) -> imagehash.ImageHash:
    return imagehash.phash(_open(data))


def _image(data: bytes | None, width: int | None = None, height: int | None = None) -> dict:
    return {"bytes": data, "mime": "image/jpeg", "sha256": hashlib.sha256(data or b"").hexdigest(),
            "width": width, "height": height}


def batch_of(rows: list[tuple[str, list]]) -> pa.RecordBatch:
    """Interleaved rows from ``(id, items)``: an item is text (str), image bytes, or an image dict."""
    out = []
    for doc_id, items in rows:
        texts = [i if isinstance(i, str) else None for i in items]
        images = [None if isinstance(i, str) else (i if isinstance(i, dict) else _image(i)) for i in items]
        out.append({"id": doc_id, "texts": texts, "images": images, "source": "test", "meta": None})
    batch = pa.RecordBatch.from_pylist(out, schema=INTERLEAVED)
    validate(batch, "interleaved")
    return batch


def run_stage(tmp_path: Path, name: str, batches: list[pa.RecordBatch], **params):
    stage, ctx = make_stage(name, tmp_path / "run", **params)
    out = [b for b in stage.run(iter(batches), ctx) if b.num_rows]
    ctx.close()
    table = pa.Table.from_batches(out) if out else None
    if table is not None:
        validate(table, "interleaved")
    return table, ctx.stats[stage.label], tmp_path / "run"


def metric(stats, reason: str) -> int:
    return stats.metrics[reason].count if reason in stats.metrics else 0


def images_of(table: pa.Table) -> dict[str, list[bytes]]:
    return {r["id"]: [i["bytes"] for i in r["images"] if i is not None] for r in table.to_pylist()}


def failures(run: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run / "failures").glob("*.jsonl")) for line in p.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ matching
def _brute(hashes: np.ndarray, d: int) -> set[tuple[int, int]]:
    from filters.image_dedup import popcount

    dist = popcount(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= d, 1))
    return set(zip(i.tolist(), j.tolist()))


def _planted(rng: np.random.Generator, n: int, copies: int, bits: int) -> np.ndarray:
    """Random ``bits``-bit hashes plus copies of some with 0–8 bits flipped (and some exact repeats)."""
    top = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2**64 - 1)
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    h &= top
    extra = []
    for _ in range(copies):
        v = h[rng.integers(0, n)]
        for f in rng.choice(bits, rng.integers(0, 9), replace=False):
            v ^= np.uint64(1) << np.uint64(f)
        extra.append(v)
    return np.concatenate([h, np.array(extra, np.uint64)])


@pytest.mark.parametrize(("bits", "n"), [(64, 1500), (16, 150)])
def test_banded_index_finds_every_pair_a_scan_finds(bits, n):
    from filters.image_dedup import near_pairs

    rng = np.random.default_rng(7)
    hashes = _planted(rng, n, n // 4, bits)
    for d in (0, 1, 3, 5, 9):
        if d >= bits:
            continue
        i, j = near_pairs(hashes, d, bits)
        got = list(zip(i.tolist(), j.tolist()))
        assert len(got) == len(set(got)), "a pair reported twice"
        assert set(got) == _brute(hashes, d), (bits, d)
        assert got == sorted(got)


def test_banded_index_property():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from filters.image_dedup import near_pairs

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.lists(st.integers(0, 63), max_size=6),
           st.integers(0, 12))
    def check(values, flips, d):
        h = np.array(values + [(values[0] ^ sum(1 << f for f in set(flips))) if values else 0], np.uint64)
        i, j = near_pairs(h, d)
        assert set(zip(i.tolist(), j.tolist())) == _brute(h, d)

    check()


def test_row_duplicates_match_clusters_computed_row_by_row():
    """The all-pairs-at-once path (rows of equal size together) and the multi-index path (a row of
    600 images) both keep exactly the first image of each within-row cluster."""
    from filters.image_dedup import clusters, row_duplicates

    rng = np.random.default_rng(3)
    sizes = [int(k) for k in rng.integers(1, 12, 300)] + [600]
    hashes = np.concatenate([_planted(rng, max(1, k // 2), k - max(1, k // 2), 64) for k in sizes])
    rows = np.repeat(np.arange(len(sizes)), sizes)
    got = row_duplicates(hashes, rows, 5, 64)
    expected, at = [], 0
    for k in sizes:
        labels = clusters(hashes[at:at + k], 5, 64)
        first = np.zeros(k, bool)
        first[np.unique(labels, return_index=True)[1]] = True
        expected.append(~first)
        at += k
    assert np.array_equal(got, np.concatenate(expected)) and got.sum() > 100


# ------------------------------------------------------------------------------------------ image_size
def test_image_size_removes_by_side_aspect_and_pixels_and_keeps_alignment(tmp_path, photos):
    astro, coffee, chelsea = photos["astronaut"], photos["coffee"], photos["chelsea"]
    bomb = header_bomb()
    from curate.images import image_size

    assert image_size(bomb) == (40_000, 40_000) and len(bomb) < 200
    batch = batch_of([
        ("ok", ["intro", astro, "middle", coffee, "end"]),
        ("hostile", ["a", tiny(), "b", bomb, "c", astro[:20], wide(chelsea), truncated(astro), chelsea]),
        ("struct", ["struct sizes are trusted", _image(astro, 100, 100), _image(astro, 256, 256)]),
        ("only-small", ["x", tiny()]),
        ("no-bytes", [_image(None), "text"]),
    ])
    table, stats, run = run_stage(tmp_path, "image_size", [batch])
    kept = images_of(table)
    assert kept["ok"] == [astro, coffee]
    assert kept["hostile"] == [truncated(astro), chelsea]  # its header is whole: its size is known
    assert kept["struct"] == [astro]  # the first claims 100 x 100 in its struct: too small without decoding
    assert kept["only-small"] == [] and kept["no-bytes"] == []  # min_images 0 keeps rows with none left
    texts = {r["id"]: r["texts"] for r in table.to_pylist()}
    assert texts["hostile"] == ["a", "b", "c", None, None]  # positions removed from both lists
    assert texts["ok"] == ["intro", None, "middle", None, "end"]
    assert metric(stats, "image_too_small") == 3
    assert metric(stats, "image_too_large") == 1
    assert metric(stats, "aspect_ratio") == 1
    assert metric(stats, "undecodable_image") == 2
    assert not stats.drops
    reasons = sorted(f["reason"] for f in failures(run))
    assert reasons == ["undecodable_image", "undecodable_image"]
    assert any("'hostile', image at position 5" in f["detail"] for f in failures(run))


def test_image_size_bounds_and_min_images(tmp_path, photos):
    astro, coffee = photos["astronaut"], photos["coffee"]  # 256 x 256, 256 x 171
    small = _encode(_open(coffee).resize((192, 128)))
    batch = batch_of([("two", [astro, "t", small]), ("one", ["t", coffee]), ("none", ["just text"]),
                      ("misaligned", ["t", astro])])
    broken = batch.to_pylist()
    broken[3]["texts"] = ["t", "also text"]  # position 1 has both a text and an image
    batch = pa.RecordBatch.from_pylist(broken, schema=INTERLEAVED)
    table, stats, run = run_stage(tmp_path, "image_size", [batch], min_side=0, max_side=200, min_aspect=None,
                                  max_aspect=None, min_images=1)
    assert images_of(table) == {"two": [small]}
    assert metric(stats, "image_too_large") == 2  # sides of 256 > max_side
    assert stats.drops == {"too_few_images": 2, "misaligned_row": 1}
    assert [f["reason"] for f in failures(run)] == ["misaligned_row"]
    # the aspect bounds are inclusive: exactly 2:1 stays, just beyond goes
    two_to_one = _encode(Image.new("RGB", (400, 200), "white"))
    beyond = _encode(Image.new("RGB", (401, 200), "white"))
    table, stats, _ = run_stage(tmp_path / "b", "image_size", [batch_of([("r", [two_to_one, beyond, "t"])])])
    assert images_of(table)["r"] == [two_to_one] and metric(stats, "aspect_ratio") == 1


def test_image_size_rejects_inverted_bounds():
    from pydantic import ValidationError

    from curate.registry import get_stage

    cls = get_stage("image_size")
    with pytest.raises(ValidationError, match="min_aspect"):
        cls.Params(min_aspect=3, max_aspect=2)
    with pytest.raises(ValidationError, match="min_side"):
        cls.Params(min_side=500, max_side=400)


# ------------------------------------------------------------------------------------------ image_dedup (per row)
def test_document_dedup_keeps_the_first_occurrence(tmp_path, photos):
    rocket, brick, coffee, camera = photos["rocket"], photos["brick"], photos["coffee"], photos["camera"]
    copies = [reencoded(rocket), resized(rocket), brighter(brick)]
    distances = [phash(c) - phash(o) for c, o in zip(copies, (rocket, rocket, brick))]
    assert all(d <= 5 for d in distances) and any(d > 0 for d in distances)  # near, not only exact
    batch = batch_of([
        ("doc", ["a", rocket, brick, "b", copies[0], coffee, copies[1], copies[2], "c"]),
        ("other", [camera, rocket, "rocket again, in another row: kept in document scope"]),
        ("copy-first", [copies[1], "t", rocket]),
    ])
    table, stats, _ = run_stage(tmp_path, "image_dedup", [batch])
    kept = images_of(table)
    assert kept["doc"] == [rocket, brick, coffee]
    assert kept["other"] == [camera, rocket]
    assert kept["copy-first"] == [copies[1]]  # the first occurrence stays, whichever it is
    assert metric(stats, "duplicate_image_in_document") == 4
    assert table.to_pylist()[0]["texts"] == ["a", None, None, "b", None, "c"]


def test_document_dedup_distinct_photos_all_stay(tmp_path, photos):
    every = [photos[name] for name in STABLE]
    table, stats, _ = run_stage(tmp_path, "image_dedup", [batch_of([("all", every + ["caption"])])])
    assert images_of(table)["all"] == every and not stats.metrics


@pytest.mark.parametrize("method", ["dhash", "ahash", "whash"])
def test_other_hashes_find_the_same_copies(tmp_path, photos, method):
    astro, coins = photos["astronaut"], photos["coins"]
    batch = batch_of([("doc", [astro, coins, reencoded(astro), "t"])])
    table, stats, _ = run_stage(tmp_path, "image_dedup", [batch], hash=method)
    assert images_of(table)["doc"] == [astro, coins] and metric(stats, "duplicate_image_in_document") == 1


def test_dedup_hostile_images_are_counted_and_removed(tmp_path, photos):
    astro = photos["astronaut"]
    batch = batch_of([("hostile", [astro, truncated(astro), header_bomb(), tiny(), tiny(), _image(None), "t"])])
    table, stats, run = run_stage(tmp_path, "image_dedup", [batch], min_images=3)
    assert table is None  # astronaut and one 1x1 image are left: below min_images
    assert stats.drops == {"too_few_images": 1}
    assert metric(stats, "undecodable_image") == 2 and metric(stats, "image_too_large") == 1
    assert metric(stats, "duplicate_image_in_document") == 1  # the second 1x1 image
    assert sorted(f["reason"] for f in failures(run)) == ["image_too_large", "undecodable_image", "undecodable_image"]
    table, _, _ = run_stage(tmp_path / "keep", "image_dedup", [batch])
    assert images_of(table)["hostile"] == [astro, tiny()]
    assert table.to_pylist()[0]["texts"] == [None, None, "t"]


def test_dedup_params_are_checked():
    from pydantic import ValidationError

    from curate.registry import get_stage

    cls = get_stage("image_dedup")
    with pytest.raises(ValidationError, match="below the 16 bits"):
        cls.Params(hash_size=4, max_distance=16)
    with pytest.raises(ValidationError, match="power-of-two"):
        cls.Params(hash="whash", hash_size=6)
    assert not cls(cls.Params()).is_global
    assert cls(cls.Params(scope="corpus")).is_global and cls(cls.Params(max_copies=10)).is_global


# ------------------------------------------------------------------------------------------ corpus scope, CLI
def _ext(data: bytes) -> str:
    return {"PNG": "png", "WEBP": "webp"}.get(Image.open(io.BytesIO(data)).format, "jpg")


def _tar(path: Path, samples: list[tuple[str, list[bytes], str]]) -> None:
    """A WebDataset tar: each sample's images as ``key.<k>.<ext>`` members, then its ``key.txt``."""
    with tarfile.open(path, "w") as tar:
        for key, images, text in samples:
            members = [(f"{key}.{k}.{_ext(data)}", data) for k, data in enumerate(images)]
            for name, payload in members + [(f"{key}.txt", text.encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photos):
    """Two tar shards: within-row copies, copies across shards, a 'logo' in five rows, hostile images."""
    p = photos
    logo = p["hubble_deep_field"]
    folder = tmp_path_factory.mktemp("shards")
    names = {}
    shard0 = [("s0a", [p["astronaut"], p["coffee"], reencoded(p["astronaut"])], "astronaut twice"),
              ("s0b", [p["rocket"], p["brick"], logo], "rocket and brick"),
              ("s0c", [tiny(), wide(p["chelsea"]), reencoded(logo)], "small, wide and the logo")]
    shard1 = [("s1a", [reencoded(p["rocket"]), p["chelsea"]], "the rocket again"),
              ("s1b", [brighter(p["brick"]), p["camera"], resized(logo)], "the brick again"),
              ("s1c", [brighter(logo)], "only the logo"),
              ("s1d", [p["coins"], reencoded(logo), truncated(p["coins"])], "coins and the logo")]
    for n, samples in enumerate((shard0, shard1)):
        _tar(folder / f"{n:05d}.tar", samples)
        for key, images, _ in samples:
            names.update({hashlib.sha256(d).hexdigest(): f"{key}[{k}]" for k, d in enumerate(images)})
    return folder, names


def _corpus_manifest(tmp_path: Path, folder: Path) -> Path:
    return write_manifest(tmp_path / "m.yaml", f"""
        name: image-filters
        source: {{kind: webdataset, paths: ["{folder}/*.tar"], schema: interleaved, batch_rows: 2}}
        stages:
          - image_size: {{}}
          - image_dedup: {{scope: corpus, max_copies: 4, min_images: 1}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)


def _kept(run: Path, names: dict[str, str]) -> dict[str, list[str]]:
    table = pa.concat_tables(pq.read_table(f) for f in sorted((run / "parquet").glob("*.parquet")))
    validate(table.select(INTERLEAVED.names), "interleaved")
    return {r["id"].split(":")[-1]: [names[hashlib.sha256(i["bytes"]).hexdigest()] for i in r["images"] if i]
            for r in table.to_pylist()}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, corpus) -> Path:
    """The corpus through image_size and a corpus-scope image_dedup with one worker, never failing."""
    tmp = tmp_path_factory.mktemp("clean")
    cli("run", str(_corpus_manifest(tmp, corpus[0])), "-o", str(tmp / "run"), "-w", "1", "--no-progress")
    return tmp / "run"


def test_corpus_scope_through_the_cli_with_one_and_two_workers(tmp_path, corpus, clean_run):
    from tests.test_faults import output_digest

    folder, names = corpus
    cli("run", str(_corpus_manifest(tmp_path, folder)), "-o", str(tmp_path / "w2"), "-w", "2", "--no-progress")
    assert output_digest(clean_run) == output_digest(tmp_path / "w2")
    kept = _kept(clean_run, names)
    assert kept == {
        "s0a": ["s0a[0]", "s0a[1]"],  # the re-encoded astronaut: duplicate in its own row
        "s0b": ["s0b[0]", "s0b[1]"],  # the logo (5 copies > max_copies 4) goes everywhere
        "s1a": ["s1a[1]"],  # the rocket was kept in shard 00000
        "s1b": ["s1b[1]"],  # so was the brick
        "s1d": ["s1d[0]"],
    }  # s0c: the 1x1 and the 3:1 images removed by image_size, its logo copy by image_dedup: no image left
    stats = json.loads((clean_run / "stats.json").read_text())
    dedup, size = stats["stages"]["image_dedup"], stats["stages"]["image_size"]
    counts = {k: v["count"] for k, v in dedup["metrics"].items()}
    assert counts == {"duplicate_image_in_document": 1, "duplicate_image_in_corpus": 2, "too_many_copies": 5,
                      "undecodable_image": 1}
    assert dedup["drops"] == {"too_few_images": 2}  # s0c and s1c
    assert {k: v["count"] for k, v in size["metrics"].items()} == {"image_too_small": 1, "aspect_ratio": 1}
    state = stats["global"]["image_dedup"]
    assert state["images"] == 16 and state["unusable"] == 1 and state["largest"][0]["size"] == 5
    assert state["largest"][0]["kept_id"].endswith("s0b") and state["removed"] == counts
    assert [f["reason"] for f in failures(clean_run)] == ["undecodable_image"]


@pytest.mark.parametrize("fault", [{"point": "observe", "shard": "00000", "after": 1},
                                   {"point": "stage", "label": "image_dedup", "phase": 1, "shard": "00001",
                                    "after": 1}], ids=["observe", "run"])
def test_a_fault_inside_the_stage_then_a_rerun_gives_the_same_bytes(tmp_path, corpus, clean_run, fault):
    """Run in this process (tests/test_faults.py's runner; one worker serves both shards with the same
    stage objects): a failed shard, then a plain rerun of the same manifest."""
    from tests.test_faults import _run, output_digest

    m = _corpus_manifest(tmp_path, corpus[0])
    error = _run(m, tmp_path / "run", [fault])
    assert error is not None and "injected fault" in str(error)
    assert _run(m, tmp_path / "run") is None
    assert output_digest(tmp_path / "run") == output_digest(clean_run)


# ------------------------------------------------------------------------------------------ global, in process
def _global_run(tmp_path: Path, shards: dict[str, list[pa.RecordBatch]], **params):
    """observe each shard, combine, then run each shard: the driver's steps, in this process."""
    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir
    from curate.stage import ShardPartial

    cls = get_stage("image_dedup")
    stage = cls(cls.Params(**params))
    rd = RunDir(tmp_path / "run")
    rd.create()
    partials = []
    for name, batches in shards.items():
        ctx = RunContext(0, Shard(name, name, "mem"), rd, 0)
        stage.setup(ctx)
        partial = ShardPartial()
        for batch in batches:
            stage.observe(batch, ctx, partial)
        ctx.close()
        partials.append(partial.table())
    state = stage.combine([p for p in reversed(partials) if p is not None], 0)  # partial order must not matter
    folder = rd.global_dir / stage.label
    folder.mkdir(parents=True)
    for table_name, table in state.pop("_tables").items():
        with pa.OSFile(str(folder / f"{table_name}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    rd.write_json(folder / "state.json", state)
    out, stats = {}, []
    for name, batches in shards.items():
        ctx = RunContext(0, Shard(name, name, "mem"), rd, 1)
        kept = [b for b in stage.run(iter(batches), ctx) if b.num_rows]
        ctx.close()
        out[name] = images_of(pa.Table.from_batches(kept)) if kept else {}
        stats.append(ctx.stats[stage.label])
    return out, stats, state


def test_document_scope_with_max_copies_is_global(tmp_path, photos):
    p = photos
    logo = p["hubble_deep_field"]
    shards = {
        "00000": [batch_of([("a", [p["rocket"], reencoded(p["rocket"]), logo, "t"])]),
                  batch_of([("b", [p["coins"], "t", p["brick"]])])],
        "00001": [batch_of([("c", [resized(logo), p["camera"], reencoded(p["coins"]), brighter(logo), "t"])])],
    }
    out, stats, state = _global_run(tmp_path, shards, max_copies=1)
    # every image with a copy anywhere goes: the rocket (2), the logo (3), the coins (2)
    assert out == {"00000": {"a": [], "b": [p["brick"]]}, "00001": {"c": [p["camera"]]}}
    assert state["removed"] == {"too_many_copies": 7}
    out, stats, state = _global_run(tmp_path / "two", shards, max_copies=2)
    # the logo (3 > 2) goes everywhere; the rocket's copy in its own row goes; the coins stay in both rows
    assert out == {"00000": {"a": [p["rocket"]], "b": [p["coins"], p["brick"]]},
                   "00001": {"c": [p["camera"], reencoded(p["coins"])]}}
    assert sum(metric(s, "too_many_copies") for s in stats) == 3
    assert sum(metric(s, "duplicate_image_in_document") for s in stats) == 1
    assert state["removed"] == {"too_many_copies": 3, "duplicate_image_in_document": 1}
    assert state["images"] == 9 and state["size_histogram"] == {"2": 2, "3": 1}


def test_corpus_scope_on_rows_without_images(tmp_path, photos):
    shards = {"00000": [batch_of([("t0", ["only text"])])],
              "00001": [batch_of([("t1", ["more text", "and more"]), ("i1", [photos["moon"], "t"])])]}
    out, stats, state = _global_run(tmp_path, shards, scope="corpus")
    assert out == {"00000": {"t0": []}, "00001": {"t1": [], "i1": [photos["moon"]]}}
    assert state["images"] == 1 and state["removed"] == {} and not any(s.metrics for s in stats)

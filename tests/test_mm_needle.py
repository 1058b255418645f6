"""mm_needle: stitched-grid needle samples from image–caption pairs (real photos plus generated images)."""

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

from tests.conftest import cli, make_stage, write_manifest

PIL = pytest.importorskip("PIL", reason="the `img` extra is not installed")
from PIL import Image


# ---------------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def photos():
    from curate.testing import real_images

    return real_images()


def noise_png(i: int, side: int = 24) -> bytes:
    """A distinct generated image: seeded noise (PNG)."""
    pixels = np.random.default_rng(1000 + i).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def image_struct(data: bytes | None, mime: str = "image/png") -> dict:
    return {"bytes": data, "mime": mime, "sha256": None, "width": None, "height": None}


def pair_rows(pairs: list[tuple[str, bytes, str]]) -> list[tuple]:
    """(id, texts, images) rows, image first then caption."""
    return [(pid, [None, caption], [image_struct(data), None]) for pid, data, caption in pairs]


def batch_of(rows: list[tuple]) -> pa.RecordBatch:
    from curate.schema import INTERLEAVED

    return pa.RecordBatch.from_pydict({
        "id": [r[0] for r in rows], "texts": [r[1] for r in rows], "images": [r[2] for r in rows],
        "source": [None] * len(rows), "meta": [None] * len(rows)}, schema=INTERLEAVED)


def mixed_pairs(photos, n_noise: int) -> list[tuple[str, bytes, str]]:
    pairs = [(f"photo-{name}", data, caption) for name, data, caption in photos]
    return pairs + [(f"noise-{i}", noise_png(i), f"Generated noise pattern number {i}.") for i in range(n_noise)]


@pytest.fixture
def run_dir(tmp_path):
    from tests.helpers_tokenizer import prepare_tokenizer

    prepare_tokenizer(tmp_path / "run", [])
    return tmp_path / "run"


def run_stage(run_dir: Path, rows: list[tuple], batch_rows: int = 10_000, **params):
    stage, ctx = make_stage("mm_needle", run_dir, **params)
    batches = [batch_of(rows[i:i + batch_rows]) for i in range(0, len(rows), batch_rows)]
    out = list(stage.run(iter(batches), ctx))
    table = pa.Table.from_batches(out) if out else None
    return stage, ctx, table


# ---------------------------------------------------------------------------------------------- checks
_RESIZED: dict = {}


def resized_digest(data: bytes, size: int) -> str:
    """The source image resized the way the stage documents (RGB, bicubic), as a pixel hash."""
    from curate.images import decode_rgb

    if (data, size) not in _RESIZED:
        im = decode_rgb(data).resize((size, size), Image.Resampling.BICUBIC)
        _RESIZED[data, size] = hashlib.sha256(np.asarray(im).tobytes()).hexdigest()
    return _RESIZED[data, size]


def decoded(stitched: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(stitched["bytes"])).convert("RGB"))


def cell_digest(pixels: np.ndarray, row: int, col: int, size: int) -> str:
    """Re-crop cell (row, col) (0-based) out of a decoded stitched image, as a pixel hash."""
    cell = np.ascontiguousarray(pixels[row * size:(row + 1) * size, col * size:(col + 1) * size])
    return hashlib.sha256(cell.tobytes()).hexdigest()


def key(caption: str) -> str:
    return " ".join(caption.split()).casefold()


def check_rows(table: pa.Table, sources: dict[str, tuple[bytes, str]], size: int) -> list[dict]:
    """Every stitched image is its layout, cell for cell; positives point at the needle's cell."""
    rows = table.to_pylist()
    for row in rows:
        meta = json.loads(row["meta"])
        n, m = meta["grid"], meta["images"]
        assert len(row["images"]) == len(row["texts"]) == m + 1
        assert all(im is not None for im in row["images"][:m]) and row["images"][m] is None
        assert row["texts"][:m] == [None] * m and row["texts"][m] == row["question"]
        assert row["needle"] in row["question"]
        for im in row["images"][:m]:
            assert im["width"] == im["height"] == n * size and im["mime"] == "image/png"
            assert im["sha256"] == hashlib.sha256(im["bytes"]).hexdigest()
        pictures = [decoded(im) for im in row["images"][:m]]
        for pixels, cells in zip(pictures, meta["layout"]):
            assert len(cells) == n * n
            for k, cell in enumerate(cells):
                data, _ = sources[cell["id"]]
                assert cell["sha256"] == hashlib.sha256(data).hexdigest()
                assert cell_digest(pixels, k // n, k % n, size) == resized_digest(data, size)
        ids = [c["id"] for cells in meta["layout"] for c in cells]
        assert len(set(ids)) == len(ids)  # distinct sources in one haystack
        if meta["positive"]:
            t = row["target"]
            assert row["answer"] == f"{t['image']}, {t['row']}, {t['col']}"
            source_id = meta["layout"][t["image"] - 1][(t["row"] - 1) * n + t["col"] - 1]["id"]
            assert source_id == meta["needle"]["id"]
            data, caption = sources[source_id]
            assert row["needle"] == caption.strip()
            # the cell the answer names, re-cropped, is the needle's source image resized
            assert cell_digest(pictures[t["image"] - 1], t["row"] - 1, t["col"] - 1, size) == \
                resized_digest(data, size)
        else:
            assert row["target"] is None and row["answer"] == "-1"
    return rows


# ---------------------------------------------------------------------------------------------- tests
def test_answers_point_at_the_needle_cell_at_the_method_cell_size(run_dir, photos):
    """Real photos at 256 px cells: each re-cropped cell equals its source resized, pixel for pixel."""
    pairs = [(f"photo-{name}", data, caption) for name, data, caption in photos]
    _, _, table = run_stage(run_dir, pair_rows(pairs), grid_sizes=[1, 2], images_per_sample=[1, 3],
                            samples_per_pair=0.6)
    rows = check_rows(table, {pid: (data, cap) for pid, data, cap in pairs}, 256)
    assert abs(len(rows) - 0.6 * len(pairs)) < 1
    assert {r["id"] for r in rows} == {f"mmneedle-00000-{k}" for k in range(len(rows))}
    assert any(json.loads(r["meta"])["positive"] for r in rows)
    assert {(json.loads(r["meta"])["grid"], json.loads(r["meta"])["images"]) for r in rows} == \
        {(1, 1), (1, 3), (2, 1), (2, 3)}


def test_positives_cover_every_position_and_settings_are_balanced(run_dir, photos):
    pairs = mixed_pairs(photos, 150)
    _, _, table = run_stage(run_dir, pair_rows(pairs), grid_sizes=[1, 2, 4], images_per_sample=[1, 3],
                            cell_size=16, samples_per_pair=2.0)
    rows = check_rows(table, {pid: (data, cap) for pid, data, cap in pairs}, 16)
    settings: dict = {}
    for r in rows:
        meta = json.loads(r["meta"])
        settings[(meta["grid"], meta["images"])] = settings.get((meta["grid"], meta["images"]), 0) + 1
    assert len(settings) == 6 and max(settings.values()) - min(settings.values()) <= 1
    spots = {(r["target"]["image"], r["target"]["row"], r["target"]["col"]) for r in rows
             if r["target"] and json.loads(r["meta"])["grid"] == 2 and json.loads(r["meta"])["images"] == 3}
    assert len(spots) >= 8  # 12 possible positions, ~27 positives: drawn uniformly, not fixed


def test_negatives_never_name_a_present_image_even_with_repeated_captions(run_dir):
    """Ten captions shared by 120 images (with case and spacing variants): a negative's caption equals
    no haystack caption and its source is absent; a positive's caption names exactly one cell."""
    variants = ["A red thing.", "a  red thing. ", "A RED THING."]
    pairs = [(f"img-{i}", noise_png(i), variants[i % 3] if i % 10 == 0 else f"Caption group {i % 10}.")
             for i in range(120)]
    sources = {pid: (data, cap) for pid, data, cap in pairs}
    _, _, table = run_stage(run_dir, pair_rows(pairs), grid_sizes=[2, 4], images_per_sample=[1, 2],
                            cell_size=16, samples_per_pair=2.0)
    rows = check_rows(table, sources, 16)
    negatives = [r for r in rows if r["target"] is None]
    assert negatives and len(negatives) < len(rows)
    for r in rows:
        meta = json.loads(r["meta"])
        present = [c["id"] for cells in meta["layout"] for c in cells]
        matching = [i for i in present if key(sources[i][1]) == key(r["needle"])]
        if r["target"] is None:
            assert meta["needle"]["id"] not in present and matching == []
        else:
            assert matching == [meta["needle"]["id"]]


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_negative_share_is_within_tolerance(run_dir, photos, fraction):
    pairs = mixed_pairs(photos, 185)  # 200 pairs in pools of 40: five pools
    _, ctx, table = run_stage(run_dir, pair_rows(pairs), grid_sizes=[1, 2], images_per_sample=[1, 4],
                              cell_size=8, samples_per_pair=1.0, pool_size=40, negative_fraction=fraction)
    targets = table.column("target").to_pylist()
    share = sum(t is None for t in targets) / len(targets)
    assert abs(len(targets) - 200) <= 5 and abs(share - fraction) <= 0.05
    st = ctx.stats["mm_needle"]
    assert st.metrics["pool_pairs"].count == 5 and st.metrics["pool_pairs"].total == 200
    assert st.metrics["negative"].count == sum(t is None for t in targets)
    assert {json.loads(m)["pool"] for m in table.column("meta").to_pylist()} == set(range(5))


def test_n_tokens_is_text_tokens_plus_image_tokens(run_dir, photos):
    from curate.image_tokens import ImageTokenParams
    from curate.tokenizer import CurateTokenizer

    pairs = mixed_pairs(photos, 40)
    section = {"model": "internvl", "max_tiles": 6}
    _, ctx, table = run_stage(run_dir, pair_rows(pairs), grid_sizes=[1, 2, 4], images_per_sample=[1, 2],
                              cell_size=64, samples_per_pair=0.3, image_tokens=section)
    tok = CurateTokenizer.load_run(run_dir / "tokenizer")
    counter = ImageTokenParams(**section).counter()
    for row in table.to_pylist():
        images = [im for im in row["images"] if im is not None]
        image_tokens = sum(counter.count(im["width"], im["height"]) for im in images)
        text_tokens = len(tok.encode_batch([row["question"]])[0]) + len(tok.encode_batch([row["answer"]])[0])
        assert row["n_tokens"] == text_tokens + image_tokens
        meta = json.loads(row["meta"])
        assert meta["image_tokens"] == [counter.count(im["width"], im["height"]) for im in images]
        assert image_tokens > 0 and text_tokens > 0
    assert ctx.stats["mm_needle"].metrics["positive"].count > 0


def test_output_does_not_depend_on_batching_and_repeats(run_dir, photos):
    pairs = mixed_pairs(photos, 60)
    params = {"grid_sizes": [1, 2], "images_per_sample": [1, 3], "cell_size": 16, "samples_per_pair": 0.5,
              "pool_size": 30}
    a = run_stage(run_dir, pair_rows(pairs), **params)[2]
    b = run_stage(run_dir, pair_rows(pairs), batch_rows=7, **params)[2]
    assert a.equals(b)
    c = run_stage(run_dir, pair_rows(pairs), **{**params, "negative_fraction": 0.3})[2]
    assert not a.equals(c)


def test_jpeg_output_is_close_to_the_sources(run_dir, photos):
    pairs = [(f"photo-{name}", data, caption) for name, data, caption in photos]
    _, _, table = run_stage(run_dir, pair_rows(pairs), grid_sizes=[2], images_per_sample=[1], cell_size=64,
                            samples_per_pair=1.0, image_format="jpeg", quality=92)
    sources = {pid: data for pid, data, _ in pairs}
    from curate.images import decode_rgb

    for row in table.to_pylist():
        meta = json.loads(row["meta"])
        im = row["images"][0]
        assert im["mime"] == "image/jpeg" and im["bytes"][:2] == b"\xff\xd8"
        decoded = np.asarray(Image.open(io.BytesIO(im["bytes"])).convert("RGB"), np.int16)
        for k, cell in enumerate(meta["layout"][0]):
            r, c = divmod(k, 2)
            want = np.asarray(decode_rgb(sources[cell["id"]]).resize((64, 64), Image.Resampling.BICUBIC), np.int16)
            got = decoded[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64]
            assert np.abs(got - want).mean() < 8


def test_hostile_inputs_are_counted_with_reasons(run_dir, photos):
    good = [(f"ok-{i}", noise_png(i), f"Pattern {i}.") for i in range(5)]
    truncated = noise_png(99)[:60]
    big = io.BytesIO()
    Image.new("RGB", (400, 400), "white").save(big, "PNG")
    rows = pair_rows(good) + [
        ("undecodable", [None, "Not an image."], [image_struct(b"not an image at all"), None]),
        ("truncated", [None, "Cut short."], [image_struct(truncated), None]),
        ("no-bytes", [None, "No bytes."], [image_struct(None), None]),
        ("too-large", [None, "A huge white square."], [image_struct(big.getvalue()), None]),
        ("two-images", [None, None, "Two of them."], [image_struct(noise_png(50)), image_struct(noise_png(51)), None]),
        ("text-only", ["Only words here."], [None]),
        ("two-texts", ["First.", None, "Second."], [None, image_struct(noise_png(52)), None]),
        ("misaligned", ["A caption.", None], [None]),
        ("both-set", ["A caption."], [image_struct(noise_png(53))]),
        ("blank", [None, "   \n "], [image_struct(noise_png(54)), None]),
        ("null-caption", [None, None], [image_struct(noise_png(55)), None]),
        ("long-caption", [None, "word " * 500], [image_struct(noise_png(56)), None]),
        ("duplicate", [None, "Same picture, other words."], [image_struct(noise_png(0)), None]),
        ("caption-first", ["Pattern five, caption first.", None], [None, image_struct(noise_png(5))]),
    ]
    _, ctx, table = run_stage(run_dir, rows, grid_sizes=[2], images_per_sample=[1, 2], cell_size=16,
                              samples_per_pair=4.0, max_image_pixels=100_000, max_caption_chars=1000)
    st = ctx.stats["mm_needle"]
    assert dict(st.drops) == {"undecodable_image": 3, "image_too_large": 1, "not_a_pair": 3, "misaligned_row": 3,
                              "empty_caption": 1, "caption_too_long": 1, "duplicate_image": 1}
    # a pool of 6: a 2-image haystack of 2×2 grids needs 8 images: skipped and counted
    assert st.metrics["pool_pairs"].total == 6
    assert st.metrics["pool_too_small"].count > 0
    assert table.num_rows + st.metrics["pool_too_small"].count == 24
    assert {json.loads(m)["images"] for m in table.column("meta").to_pylist()} == {1}
    ctx.close()
    failures = [json.loads(line) for f in (run_dir / "failures").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(f["record"] for f in failures) == sorted(r[0] for r in rows[5:-1])
    assert {f["reason"] for f in failures} == set(st.drops)


def test_a_shard_with_nothing_usable_writes_nothing(run_dir):
    rows = [("text-only", ["Words."], [None])]
    _, ctx, table = run_stage(run_dir, rows, grid_sizes=[1], images_per_sample=[1])
    assert table is None and ctx.stats["mm_needle"].drops == {"not_a_pair": 1}


def test_params_refuse_settings_no_pool_can_fill():
    from curate.registry import get_stage

    Params = get_stage("mm_needle").Params
    with pytest.raises(ValueError, match="pool_size"):
        Params(grid_sizes=[8], images_per_sample=[10], pool_size=640)
    Params(grid_sizes=[8], images_per_sample=[10], pool_size=641)
    with pytest.raises(ValueError, match="image"):
        Params(answer_format="{image} {row}")
    with pytest.raises(ValueError, match="distinct"):
        Params(grid_sizes=[2, 2])
    with pytest.raises(ValueError, match="px wide"):
        Params(grid_sizes=[8], cell_size=2048)
    p = Params(answer_format="({image}) row {row} col {column}", absent_answer="none")
    assert p.answer_format.format(image=1, row=2, column=3) == "(1) row 2 col 3"


def test_prompt_names_the_caption_and_the_answer_form(run_dir):
    stage, _ = make_stage("mm_needle", run_dir, answer_format="{image}/{row}/{column}", absent_answer="none")
    text = stage.prompt(4, 10, "A cat on a mat.")
    assert "A cat on a mat." in text and "10 images" in text and "4 rows" in text
    assert '"image/row/column"' in text and '"none"' in text
    assert "single picture" in stage.prompt(1, 1, "x")


# ---------------------------------------------------------------------------------------------- CLI
def write_shards(folder: Path, photos) -> Path:
    """Two WebDataset shards of image–caption pairs (photos as jpg, generated images as png)."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(name, "jpg", data, caption) for name, data, caption in photos]
    pairs += [(f"noise{i:03d}", "png", noise_png(i), f"Generated noise pattern number {i}.") for i in range(65)]
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k, (name, ext, data, caption) in enumerate(pairs[s::2]):
                for member, payload in ((ext, data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s}-{k:03d}-{name}.{member}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def output_digest(run: Path) -> dict[str, str]:
    out = {}
    for sink in ("webdataset", "parquet"):
        for p in sorted((run / sink).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(run))] = hashlib.sha256(p.read_bytes()).hexdigest()
    assert any(k.endswith("index.json") for k in out)
    return out


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("mm-needle-cli")
    shards = write_shards(root / "pairs", photos)
    m = write_manifest(root / "m.yaml", f"""
        name: mm-needle-test
        seed: 11
        source: {{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved}}
        tokenizer: {{train: {{vocab_size: 300, min_frequency: 1}}}}
        stages:
          - mm_needle: {{grid_sizes: [1, 2], images_per_sample: [1, 3], cell_size: 32, samples_per_pair: 0.5}}
        sink:
          - {{kind: webdataset}}
          - {{kind: parquet}}
        executor: {{kind: local, workers: 2}}
        """)
    cli("run", str(m), "-o", str(root / "w1"), "--no-progress", "-w", "1")
    cli("run", str(m), "-o", str(root / "w2"), "--no-progress", "-w", "2")
    return {"root": root, "manifest": m, "shards": shards}


def test_cli_same_bytes_with_one_or_two_workers_and_loadable(cli_runs):
    root = cli_runs["root"]
    assert output_digest(root / "w1") == output_digest(root / "w2")
    stats = json.loads((root / "w1" / "stats.json").read_text())
    st = stats["stages"]["mm_needle"]
    assert st["rows_in"] == 80 and st["drops"] == {}
    assert st["rows_out"] == stats["outputs"]["sink:parquet"]["samples"] > 30
    assert st["tokens_out"] == sum(pq.read_table(sorted((root / "w1" / "parquet").glob("*.parquet")))
                                   .column("n_tokens").to_pylist())

    import datasets

    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (root / "w1" / "parquet").glob("*.parquet")),
                               split="train")
    assert len(ds) == st["rows_out"]
    for row in ds:
        assert row["answer"] == ("-1" if row["target"] is None else
                                 f"{row['target']['image']}, {row['target']['row']}, {row['target']['col']}")
        assert row["texts"][-1] == row["question"] and row["images"][-1] is None

    import webdataset as wds

    tars = sorted(str(p) for p in (root / "w1" / "webdataset").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == st["rows_out"]
    for sample in samples:
        meta = sample["json"]["meta"]
        pictures = [sample[f"{k:03d}.png"] for k in range(meta["images"])]
        assert all(isinstance(p, Image.Image) and p.size == (32 * meta["grid"],) * 2 for p in pictures)
        assert sample["json"]["question"].endswith('reply "-1".')


def test_fault_inside_the_stage_then_a_plain_rerun_is_exact(cli_runs, monkeypatch):
    """Shard 00001 fails after mm_needle yielded its first batch; a plain rerun writes the clean bytes.
    (In this process with one worker, as tests/test_faults.py runs its faults.)"""
    from rich.console import Console

    from curate.cli import _load
    from curate.driver import execute
    from curate.errors import CurateError

    root, m = cli_runs["root"], cli_runs["manifest"]
    run = root / "faulted"
    fault = [{"point": "stage", "label": "mm_needle", "shard": "00001", "after": 1}]
    monkeypatch.setenv("CURATE_FAULTS", json.dumps(fault))
    with pytest.raises((CurateError, RuntimeError)) as failed:
        execute(_load(m, str(run), 1), console=Console(file=io.StringIO()), show_progress=False)
    assert "00001" in str(failed.value)
    assert not (run / "parquet" / "index.json").exists()
    monkeypatch.delenv("CURATE_FAULTS")
    execute(_load(m, str(run), 1), console=Console(file=io.StringIO()), show_progress=False)
    assert output_digest(run) == output_digest(root / "w1")

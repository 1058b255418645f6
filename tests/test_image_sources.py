"""Image sources that read local data into the interleaved schema: ``image_folder`` (sidecar captions),
``hf_images`` (``save_to_disk`` folders and ``load_dataset("imagefolder")``) and ``webdataset`` with
``schema: interleaved``. Real photos from installed wheels (scikit-image), undecodable files counted."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

PIL = pytest.importorskip("PIL", reason="Pillow is not installed")
from PIL import Image

from curate.context import READ_LABEL
from curate.errors import ConfigError
from curate.readers.image_folder import ImageFolderReader, sniff_mime
from curate.schema import validate
from curate.testing import real_images
from tests.conftest import cli, write_manifest
from tests.test_readers import failures, read_all


def _check_image(image: dict, data: bytes, mime: str) -> None:
    assert image["bytes"] == data and image["mime"] == mime
    assert image["sha256"] == hashlib.sha256(data).hexdigest()
    assert (image["width"], image["height"]) == Image.open(io.BytesIO(data)).size


def _reads(contexts) -> dict:
    """The ``read`` stats of every shard, merged."""
    from curate.stats import StageStats

    total = StageStats()
    for ctx in contexts:
        total.merge(ctx.stats[READ_LABEL])
    return total.to_dict()


# ------------------------------------------------------------------------------ image_folder
@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict]:
    """A folder of real photos with .txt and .json sidecars, a sub-folder, odd extensions and broken files."""
    photos = {name: (data, caption) for name, data, caption in real_images("JPEG", 96)}
    png = {name: data for name, data, _ in real_images("PNG", 96)}
    root = tmp_path / "photos"
    (root / "animals").mkdir(parents=True)
    (root / ".cache").mkdir()
    files = {}

    def put(rel: str, data: bytes, txt: str | None = None, side: dict | str | None = None) -> None:
        path = root / rel
        path.write_bytes(data)
        files[rel] = data
        if txt is not None:
            path.with_suffix(".txt").write_text(txt)
        if side is not None:
            path.with_suffix(".json").write_text(side if isinstance(side, str) else json.dumps(side))

    put("astronaut.jpg", photos["astronaut"][0], txt=photos["astronaut"][1] + "\n")
    put("coffee.JPG", photos["coffee"][0], side={"caption": photos["coffee"][1], "license": "cc0"})
    put("animals/chelsea.png", png["chelsea"], txt="  " + photos["chelsea"][1], side={"license": "cc-by"})
    put("animals/rocket.webp", _webp(photos["rocket"][0]))  # no caption: an image-only row
    put("camera.jpg", photos["camera"][0], side="{not json")  # broken sidecar: skipped, counted
    put("broken.jpg", os.urandom(2000), txt="Random bytes, not a picture.")  # undecodable: skipped
    put("coins.jpg", photos["coins"][0], side={"caption": "", "source": "scan"})  # blank caption: image only
    (root / ".hidden.jpg").write_bytes(photos["moon"][0])
    (root / ".cache" / "moon.jpg").write_bytes(photos["moon"][0])
    (root / "notes.md").write_text("not an image")
    return root, {**files, "captions": {k: v[1] for k, v in photos.items()}}


def _webp(jpeg: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, "WEBP")
    return buf.getvalue()


def test_image_folder_rows_captions_and_counted_failures(tmp_path, folder):
    root, files = folder
    captions = files["captions"]
    rows, contexts, rd = read_all("image_folder", tmp_path, paths=[str(root)], files_per_shard=3)
    assert len(contexts) == 3  # 7 images, 3 per shard; hidden files and folders are not listed
    by_id = {r["id"]: r for r in rows}
    assert list(by_id) == ["animals/chelsea.png", "animals/rocket.webp", "astronaut.jpg", "coffee.JPG", "coins.jpg"]
    assert by_id["astronaut.jpg"]["texts"] == [None, captions["astronaut"]]
    _check_image(by_id["astronaut.jpg"]["images"][0], files["astronaut.jpg"], "image/jpeg")
    assert by_id["coffee.JPG"]["texts"] == [None, captions["coffee"]]  # from the .json caption field
    assert json.loads(by_id["coffee.JPG"]["meta"]) == {"license": "cc0", "path": "coffee.JPG"}
    assert by_id["animals/chelsea.png"]["texts"] == [None, captions["chelsea"]]  # .txt, whitespace stripped
    _check_image(by_id["animals/chelsea.png"]["images"][0], files["animals/chelsea.png"], "image/png")
    assert json.loads(by_id["animals/chelsea.png"]["meta"]) == {"license": "cc-by", "path": "animals/chelsea.png"}
    assert by_id["animals/rocket.webp"]["texts"] == [None] and by_id["animals/rocket.webp"]["images"][0]["mime"] == \
        "image/webp"
    assert by_id["coins.jpg"]["texts"] == [None]
    assert {r["source"] for r in rows} == {str(root)}
    read = _reads(contexts)
    assert read["drops"] == {"invalid_json": 1, "undecodable_image": 1}
    assert read["metrics"]["images_without_caption"]["sum"] == 2
    fails = {Path(f["file"]).name: f["reason"] for f in failures(rd)}
    assert fails == {"camera.json": "invalid_json", "broken.jpg": "undecodable_image"}


def test_image_folder_require_caption_and_several_folders(tmp_path, folder):
    root, _ = folder
    rows, contexts, _ = read_all("image_folder", tmp_path, paths=[str(root)], require_caption=True)
    assert [r["id"] for r in rows] == ["animals/chelsea.png", "astronaut.jpg", "coffee.JPG"]
    assert _reads(contexts)["drops"] == {"invalid_json": 1, "missing_caption": 2, "undecodable_image": 1}
    other = tmp_path / "more" / "photos"
    other.mkdir(parents=True)
    (other / "moon.jpg").write_bytes(real_images("JPEG", 96)[9][1])
    rows, _, _ = read_all("image_folder", tmp_path / "two", paths=[str(root), str(other)])
    ids = [r["id"] for r in rows]
    assert "photos/astronaut.jpg" in ids and "more/photos/moon.jpg" in ids  # relative to the common parent
    assert len(ids) == len(set(ids))


def test_image_folder_content_keys_follow_the_sidecars(tmp_path, folder):
    root, _ = folder
    reader = ImageFolderReader(ImageFolderReader.Params(paths=[str(root)], files_per_shard=4))
    before = [s.key for s in reader.shards()]
    txt = root / "astronaut.txt"
    txt.write_text("Another caption.")
    os.utime(txt, ns=(1, 1))
    after = [s.key for s in reader.shards()]
    assert after[0] != before[0] and after[1] == before[1]


def test_image_folder_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        ImageFolderReader(ImageFolderReader.Params(paths=[str(tmp_path / "nope")])).shards()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("a caption without an image")
    with pytest.raises(ConfigError, match=r"empty: no image files"):
        ImageFolderReader(ImageFolderReader.Params(paths=[str(tmp_path / "empty")])).shards()


def test_image_folder_through_the_cli(tmp_path, folder):
    root, _ = folder
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: folder
        source: {{kind: image_folder, paths: ["{root}"], files_per_shard: 4}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    table = pq.read_table(sorted((tmp_path / "run" / "parquet").glob("*.parquet")))
    validate(table, "interleaved")
    assert table.num_rows == 5
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())["stages"]["read"]
    assert stats["drops"] == {"invalid_json": 1, "undecodable_image": 1} and stats["rows_out"] == 5


def test_mime_comes_from_the_bytes():
    for fmt, mime in [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp"),
                      ("BMP", "image/bmp"), ("TIFF", "image/tiff")]:
        buf = io.BytesIO()
        Image.new("RGB", (4, 3)).save(buf, fmt)
        assert sniff_mime(buf.getvalue()) == mime
    assert sniff_mime(b"\x00\x01") is None


# -------------------------------------------------------------------------------- hf_images
def _saved_dataset(tmp_path: Path) -> tuple[Path, list]:
    datasets = pytest.importorskip("datasets")
    photos = real_images("JPEG", 96)[:4]
    images = [{"bytes": data, "path": f"{name}.jpg"} for name, data, _ in photos]
    images.append({"bytes": os.urandom(500), "path": "noise.jpg"})
    texts = [c for _, _, c in photos] + ["Noise."]
    texts[2] = None  # an image without text
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["photo", "drawing"]),
                                  "thumb": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": images, "text": texts, "label": [0, 1, 0, 0, 1],
                                     "thumb": images}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", photos


def test_hf_images_from_save_to_disk(tmp_path):
    saved, photos = _saved_dataset(tmp_path)
    rows, contexts, rd = read_all("hf_images", tmp_path, path=str(saved))
    assert [r["id"] for r in rows] == [f"data-00000-of-00001.arrow:{i}" for i in range(4)]
    for r, (name, data, caption) in zip(rows, photos):
        _check_image(r["images"][0], data, "image/jpeg")
        meta = json.loads(r["meta"])
        assert meta["image_path"] == f"{name}.jpg" and "thumb" not in meta  # other image columns stay out
    assert rows[0]["texts"] == [None, photos[0][2]] and rows[2]["texts"] == [None]
    assert json.loads(rows[1]["meta"])["label"] == "drawing"  # ClassLabel as its name
    assert _reads(contexts)["drops"] == {"undecodable_image": 1}
    assert [f["line"] for f in failures(rd)] == [4]


def test_hf_images_dataset_dict_and_column_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    saved, _ = _saved_dataset(tmp_path)
    from curate.readers.hf_images import HfImagesReader

    with pytest.raises(ConfigError, match=r"source\.image_column: no column 'picture'"):
        HfImagesReader(HfImagesReader.Params(path=str(saved), image_column="picture")).shards()
    with pytest.raises(ConfigError, match=r"data-00000-of-00001\.arrow: source\.image_column: column 'label' is "
                       r"ClassLabel, not an Image"):
        HfImagesReader(HfImagesReader.Params(path=str(saved), image_column="label")).shards()
    with pytest.raises(ConfigError, match=r"source\.text_column: no column 'caption'"):
        HfImagesReader(HfImagesReader.Params(path=str(saved), text_column="caption")).shards()
    dd = datasets.DatasetDict({"train": datasets.load_from_disk(str(saved)),
                               "test": datasets.load_from_disk(str(saved)).select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match="choose one of"):
        HfImagesReader(HfImagesReader.Params(path=str(tmp_path / "dd"))).shards()
    rows, _, _ = read_all("hf_images", tmp_path / "r", path=str(tmp_path / "dd"), split="test", text_column=None)
    assert len(rows) == 1 and rows[0]["texts"] == [None]


def test_hf_images_from_an_imagefolder(tmp_path):
    pytest.importorskip("datasets")
    root = tmp_path / "imagefolder"
    root.mkdir()
    photos = real_images("PNG", 96)[:3]
    with open(root / "metadata.jsonl", "w") as fh:
        for name, data, caption in photos:
            (root / f"{name}.png").write_bytes(data)
            fh.write(json.dumps({"file_name": f"{name}.png", "text": caption, "split_note": name}) + "\n")
    rows, _, _ = read_all("hf_images", tmp_path, path="imagefolder", data_dir=str(root))
    assert sorted(r["texts"][1] for r in rows) == sorted(c for _, _, c in photos)
    by_caption = {r["texts"][1]: r for r in rows}
    for name, data, caption in photos:
        row = by_caption[caption]
        _check_image(row["images"][0], data, "image/png")  # only a path in the dataset: read from the file
        meta = json.loads(row["meta"])
        assert meta["split_note"] == name and meta["image_path"].endswith(f"{name}.png")
    assert len({r["id"] for r in rows}) == 3


# ------------------------------------------------------------------------------- webdataset
def test_webdataset_image_text_pairs_read_as_interleaved(tmp_path):
    photos = real_images("JPEG", 96)[:3]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for k, (name, data, caption) in enumerate(photos):
            for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps({"name": name}).encode())):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    (tmp_path / "pairs.tar").write_bytes(buf.getvalue())
    rows, _, _ = read_all("webdataset", tmp_path, paths=[str(tmp_path / "pairs.tar")], schema="interleaved")
    assert [r["id"] for r in rows] == ["pairs.tar:0000", "pairs.tar:0001", "pairs.tar:0002"]
    for r, (name, data, caption) in zip(rows, photos):
        assert r["texts"] == [None, caption]
        _check_image(r["images"][0], data, "image/jpeg")
        assert r["images"][1] is None and json.loads(r["meta"]) == {"name": name}

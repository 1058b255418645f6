"""Image decoding: bombs counted, EXIF orientation applied, every mode to RGB, one bad image never fails a shard."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest

PIL = pytest.importorskip("PIL", reason="the `clip` extra is not installed")
from PIL import Image  # noqa: E402

from curate.images import ImageProblem, decode_rgb  # noqa: E402
from tests.conftest import make_stage  # noqa: E402


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(size=(64, 48)) -> Image.Image:
    """A picture whose quadrants differ, so orientation is visible."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = (255, 0, 0)
    arr[: size[1] // 2, size[0] // 2:] = (0, 255, 0)
    arr[size[1] // 2:, : size[0] // 2] = (0, 0, 255)
    arr[size[1] // 2:, size[0] // 2:] = (255, 255, 0)
    return Image.fromarray(arr, "RGB")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _encode(Image.new("1", (20_000, 20_000)), "PNG")  # 400 MP in a few KB
    assert len(bomb) < 200_000
    with pytest.raises(ImageProblem) as info:
        decode_rgb(bomb)
    assert info.value.reason == "image_too_large" and "20000x20000" in info.value.detail
    small = _encode(_photo(), "PNG")
    with pytest.raises(ImageProblem, match="image_too_large"):
        decode_rgb(small, max_pixels=1000)
    assert decode_rgb(small, max_pixels=64 * 48).size == (64, 48)


def test_exif_orientation_is_applied():
    im = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored = _encode(im, "JPEG", quality=95, exif=exif.tobytes())
    shown = decode_rgb(stored)
    assert shown.size == (48, 64)
    expected = np.asarray(im.transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(np.asarray(shown, np.int16) - expected).mean() < 8


@pytest.mark.parametrize("make,fmt", [
    (lambda: _photo().convert("CMYK"), "JPEG"),
    (lambda: _photo().convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
    (lambda: _photo().convert("L"), "PNG"),
    (lambda: _photo().convert("1"), "PNG"),
    (lambda: _photo().convert("RGBA"), "PNG"),
    (lambda: _photo().convert("LA"), "PNG"),
    (lambda: _photo(), "WEBP"),
    (lambda: _photo(), "BMP"),
    (lambda: _photo(), "TIFF"),
])
def test_every_mode_decodes_to_rgb(make, fmt):
    out = decode_rgb(_encode(make(), fmt))
    assert out.mode == "RGB" and out.size == (64, 48)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # up to 64,491
    data = _encode(Image.fromarray(ramp), "PNG")
    out = np.asarray(decode_rgb(data))[..., 0]
    assert out.min() == 0 and out.max() >= 250  # Pillow's plain convert("RGB") makes most of it white
    assert (np.diff(out.reshape(-1).astype(int)) >= 0).all()


def test_transparent_palette_and_alpha_composite_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = np.asarray(decode_rgb(_encode(rgba, "PNG")))
    assert (out == 255).all()
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0] * 256)
    out = np.asarray(decode_rgb(_encode(pal, "PNG", transparency=0)))
    assert (out == 255).all()


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = np.asarray(decode_rgb(buf.getvalue()))
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_garbage_is_undecodable(data):
    with pytest.raises(ImageProblem, match="undecodable_image"):
        decode_rgb(data)


def test_truncated_jpeg_is_undecodable():
    data = _encode(_photo((256, 256)), "JPEG")
    with pytest.raises(ImageProblem, match="undecodable_image"):
        decode_rgb(data[: len(data) // 2])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
    from curate.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _rows(images: list[bytes], texts: list[str]) -> pa.RecordBatch:
    from curate.schema import IMAGE

    img = [{"bytes": b, "mime": None, "sha256": None, "width": None, "height": None} for b in images]
    return pa.RecordBatch.from_pydict(
        {"id": [f"r{i}" for i in range(len(images))], "texts": [[t] for t in texts], "images": [[i] for i in img]},
        schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(IMAGE))]))


def test_clip_score_counts_bad_images_and_scores_the_rest(tmp_path, tiny_clip):
    im = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = _encode(im, "JPEG", quality=95, exif=exif.tobytes())
    upright = _encode(im.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95)
    bomb = _encode(Image.new("1", (12_000, 12_000)), "PNG")
    cmyk = _encode(im.convert("CMYK"), "JPEG")
    batch = _rows([sideways, upright, bomb, b"junk", cmyk], ["a red square"] * 5)
    stage, ctx = make_stage("clip_score", tmp_path / "run", model=str(tiny_clip), batch_size=2)
    scores = stage.score(batch, ctx)["score"].to_pylist()
    assert scores[2] is None and scores[3] is None
    assert scores[0] is not None and scores[4] is not None
    assert scores[0] == pytest.approx(scores[1], abs=0.02)  # EXIF orientation applied before scoring
    metrics = ctx.stats["clip_score"].metrics
    assert metrics["image_too_large"].count == 1 and metrics["undecodable_image"].count == 1


def test_clip_model_loads_once_per_process(tmp_path, tiny_clip):
    from curate import models

    models.clear()
    for _ in range(3):  # three shards on one worker
        make_stage("clip_score", tmp_path / "run", model=str(tiny_clip))
    assert models.LOADS["open_clip"] == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_header_size_matches_the_decoded_picture_for_every_orientation(fmt):
    from PIL import Image

    from curate.images import decode_rgb, image_size

    for orientation in range(1, 9):
        im = Image.new("RGB", (300, 100), "white")
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, fmt, exif=exif)
        assert image_size(buf.getvalue()) == decode_rgb(buf.getvalue()).size, (fmt, orientation)


def test_header_size_of_a_png_bomb_reads_no_pixels(monkeypatch):
    import struct
    import zlib

    from PIL import ImageFile

    from curate.images import image_size

    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    assert image_size(png) == (60000, 60000)
    assert loads == []  # a decode would allocate 10.8 GB

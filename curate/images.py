"""Decode image bytes to the 8-bit RGB picture a vision model expects, or say why not.

:func:`decode_rgb` is what every image stage uses. It

- refuses an image whose width × height exceeds ``max_pixels`` *before* decoding it (a "decompression
  bomb": a few KB of PNG can claim 50,000 × 50,000 pixels) — reason ``image_too_large``;
- takes the first frame of an animated GIF/WebP/APNG;
- applies the EXIF orientation, so a phone photo stored sideways is seen upright;
- converts every mode to RGB the way a viewer shows it: CMYK and YCbCr through Pillow's conversion,
  16-bit and 32-bit grey (``I;16``, ``I``, ``F``) scaled to 8 bits by their full range rather than
  clipped to white, palette and alpha images composited on white;
- turns any decoding error (truncated file, unknown format) into reason ``undecodable_image``.

Pillow's own global bomb limit is replaced by ``max_pixels``, which stages expose as a parameter.
"""

from __future__ import annotations

import io

import numpy as np

#: Default pixel limit: 100 megapixels (Pillow's default warns at 89.5 MP and refuses at 179 MP).
MAX_PIXELS = 100_000_000


class ImageProblem(Exception):
    """An image that cannot be used; ``reason`` is a counted failure reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS):
    """A fully decoded ``PIL.Image`` in mode RGB; raises :class:`ImageProblem`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # the check below, with the stage's own limit, replaces Pillow's
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageProblem("undecodable_image", str(e) or type(e).__name__) from None
    try:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageProblem("image_too_large", f"{width}x{height} pixels > limit {max_pixels:,}")
        if getattr(im, "is_animated", False):
            im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except ImageProblem:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder error (truncated data, bad chunk) is this image's
        raise ImageProblem("undecodable_image", str(e) or type(e).__name__) from None
    finally:
        im.close()


def _to_rgb(im):
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr, top = arr - lo, max(hi - lo, 1e-12)
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def image_size(data: bytes) -> tuple[int | None, int | None]:
    """``(width, height)`` as displayed (EXIF orientation applied) from the header alone, without
    decoding pixels; ``(None, None)`` without Pillow or for a header it cannot read. Never raises: a
    bomb or a broken file is the image stages' to count."""
    try:
        from PIL import Image
    except ImportError:
        return None, None
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read here; image stages enforce their limit
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            orientation = _header_orientation(im)
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    except Exception:  # noqa: BLE001 - any header the decoder refuses
        return None, None


def _header_orientation(im) -> int | None:
    """The EXIF orientation found while the header was read, without ``getexif()``: for a PNG that
    call decodes the whole image looking for a late ``eXIf`` chunk (a bomb would be allocated)."""
    try:
        if getattr(im, "tag_v2", None) is not None:
            return None  # TIFF: Pillow reports the size already turned upright (as decode_rgb gives it)
        raw = im.info.get("exif")
        if not raw:
            return None
        from PIL import Image

        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112)
        return int(value) if value is not None else None
    except Exception:  # noqa: BLE001 - a broken EXIF block leaves the stored orientation
        return None

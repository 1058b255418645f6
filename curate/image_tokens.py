"""How many sequence positions an image costs a target vision-language model.

Every length decision on multimodal data (packing, long multimodal sequences, needle haystacks, the
``n_tokens`` of interleaved rows) counts text tokens and image tokens together; this module is the one
place the image side is computed. A stage takes an ``image_tokens:`` section (:class:`ImageTokenParams`),
chosen by ``model`` name, each preset's numbers overridable:

``fixed``
    The same count for every image (``tokens``; 576 by default, LLaVA-1.5 at 336 px).
``qwen2-vl`` / ``qwen2.5-vl`` (patch grid, 14 px patches, 2×2 merge) and ``qwen3-vl`` (16 px patches,
65,536 to 16,777,216 pixels as its checkpoints configure it)
    The image is resized so both sides are multiples of ``patch_size × merge_size`` (rounded to the
    nearest), then scaled down to at most ``max_pixels`` or up to at least ``min_pixels`` keeping the
    aspect ratio; the cost is ``(H / patch) × (W / patch) / merge²``. Defaults are the processors':
    ``min_pixels`` 3,136 and ``max_pixels`` 1,003,520 (1,280 merged patches). Aspect ratios above 200
    are refused by those processors; here such an image costs its clamped size (never an error).
``internvl`` (dynamic tiles with a thumbnail)
    Of all tile grids ``i × j`` with ``min_tiles ≤ i·j ≤ max_tiles`` (1 and 12), the one whose aspect
    ratio is closest to the image's (ties go to the larger grid when the image has more than half its
    pixels); a thumbnail tile is added when the grid has more than one tile. Each 448 px tile costs
    ``tokens_per_tile`` (256: 1,024 patches of 14 px after a 0.5 pixel shuffle).
``llava-next`` (any-resolution tiles with a base image)
    The grid resolution from ``grid_pinpoints`` that keeps the most of the image's pixels (least waste on
    ties); the base image costs ``tile_tokens`` (24 × 24 = 576 at 336 px), the tiles cost their feature
    map with the padding the resize added removed, plus one newline token per feature row.

``extra_tokens`` are the markers a chat template puts around each image (Qwen's vision start/end,
InternVL's ``<img></img>``); they count toward the length too. Counts equal what the models' own
processors produce for the image token (tests/test_image_tokens.py checks them against ``transformers``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator

from curate.stage import StageParams

Model = Literal["fixed", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl", "llava-next"]

#: Each preset's scheme and numbers; ImageTokenParams fields left unset take these.
PRESETS: dict[str, dict] = {
    "fixed": {"scheme": "fixed", "tokens": 576, "extra_tokens": 0},
    "qwen2-vl": {"scheme": "patch_grid", "patch_size": 14, "merge_size": 2, "min_pixels": 56 * 56,
                 "max_pixels": 28 * 28 * 1280, "extra_tokens": 2},
    "qwen2.5-vl": {"scheme": "patch_grid", "patch_size": 14, "merge_size": 2, "min_pixels": 56 * 56,
                   "max_pixels": 28 * 28 * 1280, "extra_tokens": 2},
    # Qwen3-VL checkpoints' preprocessor_config.json: 256² to 4,096² pixels (check yours).
    "qwen3-vl": {"scheme": "patch_grid", "patch_size": 16, "merge_size": 2, "min_pixels": 65536,
                 "max_pixels": 16777216, "extra_tokens": 2},
    "internvl": {"scheme": "tiles", "tile_size": 448, "min_tiles": 1, "max_tiles": 12, "thumbnail": True,
                 "tokens_per_tile": 256, "extra_tokens": 2},
    "llava-next": {"scheme": "anyres", "tile_size": 336, "tile_tokens": 576,
                   "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                   "extra_tokens": 0},
}

#: The aspect ratio beyond which the patch-grid processors refuse an image.
MAX_PATCH_GRID_RATIO = 200


class ImageTokenParams(StageParams):
    """The ``image_tokens:`` section of a multimodal stage: a model preset and any overrides."""

    model: Model = Field("qwen2-vl", description="target VLM's image tokenization: fixed, qwen2-vl, "
                         "qwen2.5-vl, qwen3-vl (patch grid), internvl (tiles + thumbnail), llava-next (anyres)")
    tokens: int | None = Field(None, ge=0, description="fixed: tokens per image")
    patch_size: int | None = Field(None, gt=0, description="patch grid: pixels per patch side")
    merge_size: int | None = Field(None, gt=0, description="patch grid: patches merged per side into one token")
    min_pixels: int | None = Field(None, gt=0, description="patch grid: smallest resized area")
    max_pixels: int | None = Field(None, gt=0, description="patch grid: largest resized area")
    tile_size: int | None = Field(None, gt=0, description="tiles/anyres: tile side in pixels")
    min_tiles: int | None = Field(None, gt=0, description="tiles: fewest tiles")
    max_tiles: int | None = Field(None, gt=0, description="tiles: most tiles (thumbnail not counted)")
    thumbnail: bool | None = Field(None, description="tiles: add a thumbnail tile when there are several")
    tokens_per_tile: int | None = Field(None, gt=0, description="tiles: tokens per tile")
    tile_tokens: int | None = Field(None, gt=0, description="anyres: tokens of the base image (a square number)")
    grid_pinpoints: list[tuple[int, int]] | None = Field(None, description="anyres: candidate (height, width) "
                                                         "resolutions")
    extra_tokens: int | None = Field(None, ge=0, description="marker tokens around each image")

    @model_validator(mode="after")
    def _check(self) -> ImageTokenParams:
        s = self.settings()
        if s["scheme"] == "patch_grid" and s["min_pixels"] > s["max_pixels"]:
            raise ValueError("min_pixels must not exceed max_pixels")
        if s["scheme"] == "tiles" and s["min_tiles"] > s["max_tiles"]:
            raise ValueError("min_tiles must not exceed max_tiles")
        if s["scheme"] == "anyres" and math.isqrt(s["tile_tokens"]) ** 2 != s["tile_tokens"]:
            raise ValueError("tile_tokens must be a square number (a feature map side squared)")
        return self

    def settings(self) -> dict:
        """The preset's numbers with this section's overrides."""
        out = dict(PRESETS[self.model])
        for key, value in self.model_dump(exclude={"model"}).items():
            if value is not None:
                out[key] = value
        return out

    def counter(self) -> ImageTokenCounter:
        return ImageTokenCounter(self)


class ImageTokenCounter:
    """``count(width, height)``: the tokens one image costs, marker tokens included (memoized)."""

    def __init__(self, params: ImageTokenParams | None = None):
        self.params = params or ImageTokenParams()
        s = self.params.settings()
        self.scheme, self.extra = s["scheme"], s["extra_tokens"]
        key = tuple(sorted((k, tuple(map(tuple, v)) if isinstance(v, list) else v) for k, v in s.items()))
        self._count = _memo(key)

    def count(self, width: int | None, height: int | None) -> int:
        """Tokens for an image of ``width × height`` pixels. An image whose size is unknown (or 0)
        costs what a 1 × 1 image costs under the scheme — use :meth:`count_image` to read the size."""
        return self._count(max(int(width or 1), 1), max(int(height or 1), 1)) + self.extra

    def pad_tokens(self, width: int, height: int) -> int:
        """The image's own tokens, without the markers (what a processor expands its image token to)."""
        return self.count(width, height) - self.extra

    def count_image(self, image: dict | None) -> int:
        """Tokens for an IMAGE struct (``width``/``height``, read from the bytes' header when null or not
        positive)."""
        if image is None:
            return 0
        w, h = image.get("width"), image.get("height")
        if not ((w or 0) > 0 and (h or 0) > 0) and image.get("bytes"):
            from curate.images import image_size

            w, h = image_size(image["bytes"])
        return self.count(w, h)


def _memo(key: tuple):
    settings = dict(key)
    fn = {"fixed": lambda w, h: settings["tokens"], "patch_grid": _patch_grid, "tiles": _tiles,
          "anyres": _anyres}[settings["scheme"]]
    if settings["scheme"] == "fixed":
        return fn

    @lru_cache(maxsize=65536)
    def count(w: int, h: int) -> int:
        return fn(w, h, settings)

    return count


# ------------------------------------------------------------------------------------------ patch grid
def resized_for_patch_grid(width: int, height: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` after the patch-grid resize: both multiples of ``factor``, area within bounds,
    aspect ratio kept as well as the multiples allow."""
    if max(width, height) / min(width, height) > MAX_PATCH_GRID_RATIO:  # the processors refuse these
        if width > height:
            width = height * MAX_PATCH_GRID_RATIO
        else:
            height = width * MAX_PATCH_GRID_RATIO
    h, w = round(height / factor) * factor, round(width / factor) * factor  # may round to 0: scaled up below
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def _patch_grid(width: int, height: int, s: dict) -> int:
    patch, merge = s["patch_size"], s["merge_size"]
    w, h = resized_for_patch_grid(width, height, patch * merge, s["min_pixels"], s["max_pixels"])
    return (h // patch) * (w // patch) // (merge * merge)


# ---------------------------------------------------------------------------------------------- tiles
def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """``(columns, rows)`` of the dynamic-tile grid whose aspect ratio is closest to the image's."""
    grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                    for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def _tiles(width: int, height: int, s: dict) -> int:
    cols, rows = tile_grid(width, height, s["min_tiles"], s["max_tiles"], s["tile_size"])
    n = cols * rows
    if s["thumbnail"] and n != 1:
        n += 1
    return n * s["tokens_per_tile"]


# --------------------------------------------------------------------------------------------- anyres
def best_resolution(width: int, height: int, pinpoints: list) -> tuple[int, int]:
    """``(height, width)`` of the candidate that keeps most of the image's pixels once it is scaled to
    fit, the one wasting fewest pixels on ties."""
    best, best_kept, best_waste = None, -1, float("inf")
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cand_h, cand_w), kept, waste
    return best


def _anyres(width: int, height: int, s: dict) -> int:
    tile, side = s["tile_size"], math.isqrt(s["tile_tokens"])
    res_h, res_w = best_resolution(width, height, s["grid_pinpoints"])
    cur_h, cur_w = side * (res_h // tile), side * (res_w // tile)
    if width / height > cur_w / cur_h:  # wider than the grid: rows of padding top and bottom go
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return cur_h * cur_w + cur_h + side * side  # tiles, a newline per row, the base image

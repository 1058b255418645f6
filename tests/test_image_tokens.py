"""Image-token accounting (curate/image_tokens.py) against the models' own processors in ``transformers``:
the patch-grid count against ``Qwen2VLImageProcessor`` (the class Qwen2-VL, Qwen2.5-VL and Qwen3-VL
load), the dynamic-tile count against ``GotOcr2ImageProcessor`` with InternVL's settings, and the
any-resolution count against a whole ``LlavaNextProcessor`` call (placeholder tokens in its output)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydantic import ValidationError

from curate.image_tokens import ImageTokenParams, best_resolution, resized_for_patch_grid, tile_grid

transformers = pytest.importorskip("transformers", reason="the `text` extra is not installed")


def _sizes(n: int, seed: int = 0, ratio_cap: float = 200) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(1, 1), (28, 28), (27, 29), (4, 230), (448, 448), (896, 448), (1000, 5), (5000, 4000)]
    while len(out) < n:
        w = rng.randint(1, rng.choice([64, 700, 6000]))
        h = rng.randint(1, rng.choice([64, 700, 6000]))
        if max(w, h) / min(w, h) <= ratio_cap:
            out.append((w, h))
    return out


@pytest.mark.parametrize("model,patch,merge,lo,hi", [("qwen2-vl", 14, 2, 3136, 1003520),
                                                     ("qwen3-vl", 16, 2, 65536, 16777216)])
def test_patch_grid_equals_the_qwen_processor(model, patch, merge, lo, hi):
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, size={"shortest_edge": lo, "longest_edge": hi})
    counter = ImageTokenParams(model=model).counter()
    for w, h in _sizes(3000):
        assert counter.pad_tokens(w, h) == proc.get_number_of_image_patches(h, w, {}) // merge**2, (w, h)
    assert counter.count(100, 100) == counter.pad_tokens(100, 100) + 2  # vision start/end markers


def test_patch_grid_on_real_pixels():
    """The whole preprocessing path (resize, patchify) on real photographs gives the same grid."""
    import io

    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from curate.testing import real_images

    proc = Qwen2VLImageProcessor()
    counter = ImageTokenParams(model="qwen2.5-vl", max_pixels=200_000).counter()
    for _, data, _ in real_images(size=None)[:4]:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        out = proc(images=[im], size={"shortest_edge": 56 * 56, "longest_edge": 200_000}, return_tensors="np")
        t, gh, gw = (int(x) for x in out["image_grid_thw"][0])
        assert counter.pad_tokens(*im.size) == t * gh * gw // 4


def test_tiles_equal_the_internvl_processor():
    from transformers import GotOcr2ImageProcessor

    proc = GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=12,
                                 size={"height": 448, "width": 448})
    counter = ImageTokenParams(model="internvl").counter()
    for w, h in _sizes(3000, seed=1):
        assert counter.pad_tokens(w, h) == proc.get_number_of_image_patches(h, w, {}) * 256, (w, h)
    assert counter.pad_tokens(448, 448) == 256  # one tile, no thumbnail
    assert counter.pad_tokens(896, 448) == 3 * 256  # 2 × 1 tiles + thumbnail
    few = ImageTokenParams(model="internvl", max_tiles=4, thumbnail=False).counter()
    assert few.pad_tokens(4000, 1000) == 4 * 256


def test_anyres_equals_a_llava_next_processor_call():
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["a picture of a cat"], trainers.BpeTrainer(vocab_size=60,
                                                                        special_tokens=["<unk>", "<image>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", additional_special_tokens=["<image>"])
    # llava-v1.6 checkpoints: 336 px tiles, CLIP-L/14, the CLS feature removed ("default" strategy)
    images = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14, image_token="<image>",
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    image_id = tok.convert_tokens_to_ids("<image>")
    counter = ImageTokenParams(model="llava-next").counter()
    for w, h in _sizes(60, seed=2, ratio_cap=30):
        ids = np.asarray(proc(text="<image> a cat", images=Image.new("RGB", (w, h)))["input_ids"])
        assert counter.count(w, h) == int((ids == image_id).sum()), (w, h)


def test_fixed_and_overrides():
    assert ImageTokenParams(model="fixed").counter().count(10, 9999) == 576
    assert ImageTokenParams(model="fixed", tokens=64, extra_tokens=2).counter().count(1, 1) == 66
    c = ImageTokenParams(model="qwen2-vl", max_pixels=28 * 28 * 16).counter()
    assert c.pad_tokens(4000, 4000) == 16
    with pytest.raises(ValidationError):
        ImageTokenParams(model="qwen2-vl", min_pixels=10_000, max_pixels=100)
    with pytest.raises(ValidationError):
        ImageTokenParams(model="llava-next", tile_tokens=500)
    with pytest.raises(ValidationError):
        ImageTokenParams(model="gpt-9")


def test_counts_from_structs_and_headers():
    from curate.testing import real_images

    counter = ImageTokenParams().counter()
    _, data, _ = real_images(size=None)[0]
    from curate.images import image_size

    w, h = image_size(data)
    assert counter.count_image({"bytes": data, "width": None, "height": None}) == counter.count(w, h)
    assert counter.count_image(None) == 0
    # unknown size (unreadable header) costs the smallest image, never an error
    assert counter.count_image({"bytes": b"junk", "width": None, "height": None}) == counter.count(1, 1)


def test_helpers_keep_their_invariants():
    for w, h in _sizes(500, seed=3):
        rw, rh = resized_for_patch_grid(w, h, 28, 3136, 1003520)
        assert rw % 28 == 0 and rh % 28 == 0 and 3136 <= rw * rh <= 1003520
        cols, rows = tile_grid(w, h, 1, 12, 448)
        assert 1 <= cols * rows <= 12
        # no allowed grid is closer to the image's aspect ratio than the chosen one
        best = min(abs(w / h - c / r) for c in range(1, 13) for r in range(1, 13) if c * r <= 12)
        assert abs(w / h - cols / rows) == pytest.approx(best)
        assert best_resolution(w, h, [[336, 672], [672, 336]]) in ((336, 672), (672, 336))

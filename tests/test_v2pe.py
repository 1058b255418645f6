"""V2PE position accounting (curate.v2pe) against a re-implementation of the method's own loop, and the
``n_positions`` column ``count_tokens`` writes with it."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pyarrow as pa
import pytest

from curate.image_tokens import ImageTokenParams
from curate.schema import IMAGE
from curate.v2pe import STRIDES, image_positions, n_positions, position_ids
from tests.conftest import make_stage


def _reference(segments, stride, unit=256):
    """The method's evaluation loop, in floating point: text tokens count on from the last position;
    an image's tokens are ``linspace(last, last + stride/unit × N, N + 1)[1:]``; then ``last = ceil``."""
    ids, last = [], -1
    for kind, n in segments:
        if kind == "text":
            ids.append(np.arange(1, n + 1) + last)
            last += n
        else:
            step = np.linspace(last, last + stride / unit * n, n + 1)[1:]
            ids.append(step)
            last = math.ceil(step[-1]) if n else last
    return (np.concatenate(ids) if ids else np.zeros(0)), last + 1


@pytest.mark.parametrize("seed", range(4))
def test_positions_follow_the_methods_rule(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        segments = []
        for _ in range(int(rng.integers(1, 8))):
            if rng.random() < 0.5:
                segments.append(("text", int(rng.integers(0, 40))))
            else:  # InternVL: tiles of 256 tokens; other models: any count
                n = int(rng.integers(1, 13)) * 256 if rng.random() < 0.5 else int(rng.integers(1, 700))
                segments.append(("image", n))
        stride = int(rng.choice(STRIDES))
        want_ids, want_span = _reference(segments, stride)
        got = position_ids(segments, stride)
        assert len(got) == sum(n for _, n in segments)
        np.testing.assert_allclose(got, want_ids, rtol=0, atol=1e-9)
        assert n_positions(segments, stride) == want_span


def test_an_image_spans_its_tiles_times_the_stride_and_text_counts_one_each():
    assert image_positions(256 * 7, 64) == 7 * 64
    assert image_positions(256 * 7, 256) == 256 * 7  # stride 256: plain positions
    assert image_positions(100, 1) == 1  # rounded up
    assert image_positions(0, 64) == 0
    assert n_positions([("text", 10), ("image", 2 * 256), ("text", 3)], 16) == 10 + 32 + 3
    assert n_positions([], 64) == 0
    with pytest.raises(ValueError):
        image_positions(10, 0)


@pytest.fixture
def run_dir(tmp_path_factory, tmp_path):
    from tests.helpers_tokenizer import prepare_tokenizer

    shutil.copytree(prepare_tokenizer(tmp_path_factory.mktemp("v2pe-tok"), []), tmp_path / "run" / "tokenizer")
    return tmp_path / "run"


def _rows(sizes_per_row):
    rows = []
    for i, sizes in enumerate(sizes_per_row):
        texts, images = ["A caption of several words."], [None]
        for w, h in sizes:
            texts += [None, "Some text after it."]
            images += [{"bytes": None, "width": w, "height": h, "mime": "image/png", "url": None}, None]
        rows.append({"id": f"r{i}", "texts": texts, "images": images})
    return pa.RecordBatch.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())),
                                                              ("images", pa.list_(IMAGE))]))


@pytest.mark.parametrize("model", ["internvl", "qwen2-vl"])
def test_count_tokens_writes_the_positions_a_row_spans(run_dir, model):
    """n_positions = text tokens + each image's markers + ceil(stride × its own tokens / unit); stride equal
    to the unit gives n_tokens back; without v2pe_stride there is no such column."""
    sizes = [[(448, 448)], [(1344, 896), (300, 200)], [], [(2000, 100)]]
    counter = ImageTokenParams(model=model).counter()
    for stride in (1, 64, 256):
        stage, ctx = make_stage("count_tokens", run_dir, image_tokens={"model": model}, v2pe_stride=stride)
        out = pa.Table.from_batches(list(stage.run(iter([_rows(sizes)]), ctx)))
        n_tokens = out.column("n_tokens").to_pylist()
        n_image = out.column("n_image_tokens").to_pylist()
        for r, row_sizes in enumerate(sizes):
            text = n_tokens[r] - n_image[r]
            own = [counter.pad_tokens(w, h) for w, h in row_sizes]
            want = text + sum(counter.extra + math.ceil(stride * n / 256) for n in own)
            assert out.column("n_positions")[r].as_py() == want
        if stride == 256:
            assert out.column("n_positions").to_pylist() == n_tokens
        assert "n_positions" in stage.columns_out(["id", "texts", "images"])
    stage, ctx = make_stage("count_tokens", run_dir, image_tokens={"model": model})
    assert "n_positions" not in pa.Table.from_batches(list(stage.run(iter([_rows(sizes)]), ctx))).column_names
    assert "n_positions" not in stage.columns_out(["id", "texts", "images", "n_positions"])  # a recount drops it

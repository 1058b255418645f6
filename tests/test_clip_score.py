"""clip_score: a tiny open_clip model saved as a checkpoint folder, real photos from scikit-image."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli, make_stage, write_manifest, write_pair_shards

open_clip = pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def photos():
    from curate.testing import real_images

    return real_images()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from curate.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _image(data: bytes) -> dict:
    return {"bytes": data, "mime": "image/jpeg", "sha256": None, "width": None, "height": None}


def _rows(rows):
    """Interleaved rows from [(id, [image bytes or None …], [text or None …])]."""
    from curate.schema import IMAGE

    return pa.RecordBatch.from_pydict({
        "id": [r[0] for r in rows],
        "texts": [r[2] for r in rows],
        "images": [[_image(b) if b is not None else None for b in r[1]] for r in rows],
    }, schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(IMAGE))]))


def _stage(tmp_path, **params):
    return make_stage("clip_score", tmp_path / "run", **params)


def _direct(folder):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def _embed(model, preprocess, tokenizer, image: bytes, texts: list[str]):
    from PIL import Image

    with torch.no_grad():
        im = model.encode_image(preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None])
        tx = model.encode_text(tokenizer(texts))
    im = im / im.norm(dim=-1, keepdim=True)
    tx = tx / tx.norm(dim=-1, keepdim=True)
    return (tx @ im[0]).numpy()


def test_pair_score_is_the_cosine_of_normalized_embeddings(tmp_path, photos, tiny_clip):
    stage, ctx = _stage(tmp_path, model=str(tiny_clip), batch_size=4)
    batch = _rows([(name, [data, None], [None, caption]) for name, data, caption in photos])
    scores = stage.score(batch, ctx)
    model, preprocess, tokenizer = _direct(tiny_clip)
    for i, (_, data, caption) in enumerate(photos):
        expected = float(_embed(model, preprocess, tokenizer, data, [caption])[0])
        assert scores["score"][i].as_py() == pytest.approx(expected, abs=1e-5)
        assert scores["score_max"][i].as_py() == pytest.approx(expected, abs=1e-5)
        assert scores["image_scores"][i].as_py() == [pytest.approx(expected, abs=1e-5)]
        assert scores["image_text"][i].as_py() == [1]
    assert len(set(round(v, 6) for v in scores["score"].to_pylist())) == len(photos)


def test_half_precision_model_takes_half_precision_images(tmp_path, photos, tiny_clip, monkeypatch):
    """On CUDA the model is open_clip's mixed fp16 (layer norms and the class token stay float32, so the
    first parameter is float32): images must go in as float16. Run here with that precision on the CPU
    (PyTorch computes float16 there too); the scores match the float32 model's."""
    import filters.clip_model as clip_model

    batch = _rows([(name, [data], [caption]) for name, data, caption in photos])
    stage, ctx = _stage(tmp_path, model=str(tiny_clip), batch_size=4)
    full = stage.score(batch, ctx)["score"].to_numpy()
    monkeypatch.setattr(clip_model, "_precision", lambda device: "fp16")
    half_stage, half_ctx = _stage(tmp_path / "half", model=str(tiny_clip), batch_size=4)
    assert half_stage.clip.model.visual.conv1.weight.dtype == torch.float16
    assert next(half_stage.clip.model.parameters()).dtype == torch.float32  # the mixed recipe
    assert half_stage.clip.input_dtype == torch.float16
    half = half_stage.score(batch, half_ctx)["score"].to_numpy()
    assert np.isfinite(half).all()
    np.testing.assert_allclose(half, full, atol=2e-2)


def test_long_captions_are_scored_by_sentence_chunks(tmp_path, photos, tiny_clip):
    name, data, caption = photos[0]
    long_caption = " ".join(f"{caption} Detail number {k} of the scene is described in this sentence." for k in range(12))
    stage, ctx = _stage(tmp_path, model=str(tiny_clip))
    chunks = stage.chunks(long_caption)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_clip}")
    assert len(chunks) > 1 and all(len(tokenizer.encode(c)) <= 75 for c in chunks)
    assert " ".join(chunks) == long_caption
    scores = stage.score(_rows([(name, [data, None], [None, long_caption])]), ctx)
    model, preprocess, tok = _direct(tiny_clip)
    sims = _embed(model, preprocess, tok, data, chunks)
    assert scores["score"][0].as_py() == pytest.approx(float(sims.mean()), abs=1e-5)
    assert scores["score_max"][0].as_py() == pytest.approx(float(sims.max()), abs=1e-5)


def test_a_long_context_text_encoder_takes_the_caption_whole(tmp_path, photos):
    from curate.testing import save_tiny_clip

    folder = save_tiny_clip(tmp_path / "long-clip", context_length=248)
    _, data, caption = photos[1]
    long_caption = " ".join([caption] * 12)
    stage, ctx = _stage(tmp_path, model=str(folder))
    assert stage.chunks(long_caption) == [long_caption]
    model, preprocess, tok = _direct(folder)
    expected = float(_embed(model, preprocess, tok, data, [long_caption])[0])
    assert stage.score(_rows([("x", [data, None], [None, long_caption])]), ctx)["score"][0].as_py() == \
        pytest.approx(expected, abs=1e-5)


def test_interleaved_rows_score_each_image_against_its_best_text(tmp_path, photos, tiny_clip):
    (_, a, cap_a), (_, b, cap_b) = photos[2], photos[3]
    stage, ctx = _stage(tmp_path, model=str(tiny_clip))
    row = ("doc", [a, None, b, None], [None, cap_a, None, cap_b])
    scores = stage.score(_rows([row, ("broken", [b"not an image", None], [None, "text"])]), ctx)
    model, preprocess, tok = _direct(tiny_clip)
    sa = _embed(model, preprocess, tok, a, [cap_a, cap_b])
    sb = _embed(model, preprocess, tok, b, [cap_a, cap_b])
    assert scores["image_scores"][0].as_py() == [pytest.approx(float(sa.max()), abs=1e-5),
                                                  pytest.approx(float(sb.max()), abs=1e-5)]
    assert scores["image_text"][0].as_py() == [1 + 2 * int(sa.argmax()), 1 + 2 * int(sb.argmax())]
    assert scores["score"][0].as_py() == pytest.approx((sa.max() + sb.max()) / 2, abs=1e-5)
    assert scores["min_image_score"][0].as_py() == pytest.approx(min(sa.max(), sb.max()), abs=1e-5)
    # an undecodable image: a null score, recorded in failures/ and counted, the row itself is kept
    assert scores["score"][1].as_py() is None and scores["image_scores"][1].as_py() == [None]
    assert ctx.stats["clip_score"].metrics["undecodable_image"].count == 1
    ctx.close()
    failure = json.loads(next((tmp_path / "run" / "failures").glob("*.jsonl")).read_text())
    assert failure["reason"] == "undecodable_image" and "broken" in failure["detail"]


@pytest.mark.parametrize("processes", [False, True], ids=["decode-threads", "decode-processes"])
def test_datacomp_style_manifest_keeps_the_top_fraction(tmp_path, photos, tiny_clip, processes):
    """Through `curate run` with 2 spawned workers; with `decode_processes` each worker starts its own
    decoding processes (the CUDA default), and the scores are the same."""
    shards = write_pair_shards(tmp_path / "pairs", photos)
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: clip-pairs
        source: {{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved}}
        stages:
          - clip_score: {{model: {tiny_clip}, batch_size: 8, decode_processes: {str(processes).lower()}}}
          - select: {{top: {{column: scores.clip_score.score, fraction: 0.3}}}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 2}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    table = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "run" / "parquet").glob("*.parquet")))
    assert table.num_rows == int(0.3 * len(photos) + 0.5)  # select rounds half up
    kept = table.column("scores").combine_chunks().field("clip_score").field("score").to_numpy()
    model, preprocess, tok = _direct(tiny_clip)
    every = sorted((float(_embed(model, preprocess, tok, d, [c])[0]) for _, d, c in photos), reverse=True)
    assert np.allclose(sorted(kept, reverse=True), every[: table.num_rows], atol=1e-5)

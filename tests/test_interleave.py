"""interleave (MMC4): sentences × candidate images, CLIP similarity, floor, linear assignment.

A tiny open_clip model saved as a checkpoint folder and real photographs from installed wheels; the
assignment is checked against a brute-force search over every placement, the floor and the surplus
rule against the similarities recomputed here, and the CLI run for same bytes across reruns, worker
counts and a fault."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.schema import IMAGE, validate
from synthesizers.interleave import split_sentences
from tests.conftest import cli, make_stage, write_manifest

pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
pytest.importorskip("scipy", reason="the `img` extra is not installed")


@pytest.fixture(scope="module")
def photos():
    from curate.testing import real_images

    return real_images()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from curate.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _image(data: bytes) -> dict:
    return {"bytes": data, "mime": "image/jpeg", "sha256": hashlib.sha256(data).hexdigest(), "width": None,
            "height": None}


def _doc_rows(docs):
    """Interleaved input rows: [(id, text, [image bytes …])] → the text first, then candidate images."""
    return pa.RecordBatch.from_pydict({
        "id": [d[0] for d in docs],
        "texts": [[d[1]] + [None] * len(d[2]) for d in docs],
        "images": [[None] + [_image(b) for b in d[2]] for d in docs],
        "source": [None] * len(docs), "meta": [None] * len(docs),
    }, schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(IMAGE)),
                         ("source", pa.string()), ("meta", pa.string())]))


def _similarities(stage, ctx, text: str, blobs: list[bytes]) -> np.ndarray:
    """sentence × image cosine similarities as the stage defines them (a sentence: mean of its chunks)."""
    sentences = split_sentences(text)
    img, ok = stage.clip.embed_images(blobs, [str(i) for i in range(len(blobs))], ctx, "t")
    assert ok.all()
    rows = []
    for s in sentences:
        emb = stage.clip.embed_texts(stage.clip.chunks(s.strip()))
        rows.append((emb @ img.T).mean(axis=0))
    return np.array(rows)


def _text(photos, extra: list[str] = ()) -> str:
    return " ".join([c for _, _, c in photos] + list(extra))


def test_sentences_are_exact_spans():
    for text in ["One. Two!  Three?\nFour\n\nFive… \"Six.\" Seven", "  lead. x", "no boundary at all", "",
                 "a.\n\n\n", "Dr. Who went home. He slept."]:
        parts = split_sentences(text)
        assert "".join(parts) == text
        assert all(p.strip() for p in parts[1:])
    assert len(split_sentences("One. Two!  Three?\nFour")) == 4


def test_assignment_is_optimal_and_one_image_per_sentence(tmp_path, photos, tiny_clip):
    stage, ctx = make_stage("interleave", tmp_path / "run", model=str(tiny_clip), min_similarity=-1.0)
    blobs = [d for _, d, _ in photos[:4]]
    text = _text(photos[:6])  # six sentences, four images
    out = stage.process(_doc_rows([("d0", text, blobs)]), ctx)
    validate(out, "interleaved")
    row = out.to_pylist()[0]
    sc = row["scores"]["interleave"]
    shas = [im["sha256"] for im in row["images"] if im is not None]
    assert sorted(shas) == sorted(hashlib.sha256(b).hexdigest() for b in blobs)  # each once
    assert len(set(sc["image_sentences"])) == len(shas)  # each sentence at most one image
    sims = _similarities(stage, ctx, text, blobs)
    best = max(sum(sims[s, i] for i, s in enumerate(perm)) for perm in itertools.permutations(range(6), 4))
    assert sum(sc["image_scores"]) == pytest.approx(best, abs=1e-4)
    by_sha = {hashlib.sha256(b).hexdigest(): i for i, b in enumerate(blobs)}
    for sha, s, score in zip(shas, sc["image_sentences"], sc["image_scores"]):
        assert score == pytest.approx(sims[s, by_sha[sha]], abs=1e-5)
    # the text is kept whole and in order; each image sits right before its sentence
    assert "".join(t for t in row["texts"] if t) == text
    sentences = split_sentences(text)
    for k, (t, im) in enumerate(zip(row["texts"], row["images"])):
        if im is not None:
            s = sc["image_sentences"][shas.index(im["sha256"])]
            assert row["texts"][k + 1 if row["texts"][k + 1] is not None else k + 2].startswith(sentences[s])


def test_floor_and_surplus(tmp_path, photos, tiny_clip):
    blobs = [d for _, d, _ in photos[:5]]
    text = _text(photos[:2])  # two sentences, five images
    stage, ctx = make_stage("interleave", tmp_path / "r1", model=str(tiny_clip), min_similarity=-1.0)
    sims = _similarities(stage, ctx, text, blobs)
    best = np.sort(sims.max(axis=0))
    floor = float((best[1] + best[2]) / 2)  # between two images' best similarities: no rounding ties
    above = int((best >= floor).sum())
    stage, ctx = make_stage("interleave", tmp_path / "r2", model=str(tiny_clip), min_similarity=floor)
    row = stage.process(_doc_rows([("d", text, blobs)]), ctx).to_pylist()[0]
    sc = row["scores"]["interleave"]
    assert all(s >= floor for s in sc["image_scores"])
    m = ctx.stats["interleave"].to_dict()["metrics"]
    assert m["images_below_floor"]["sum"] == 5 - above
    assert m["surplus_images"]["sum"] == above - min(above, 2)
    assert len(sc["image_scores"]) == min(above, 2) and len(set(sc["image_sentences"])) == len(sc["image_scores"])
    # MMC4's rule: surplus images go to their most similar sentence
    stage, ctx = make_stage("interleave", tmp_path / "r3", model=str(tiny_clip), min_similarity=floor,
                            surplus="nearest")
    row = stage.process(_doc_rows([("d", text, blobs)]), ctx).to_pylist()[0]
    assert len(row["scores"]["interleave"]["image_scores"]) == above


def test_bad_rows_and_images_are_counted(tmp_path, photos, tiny_clip):
    stage, ctx = make_stage("interleave", tmp_path / "run", model=str(tiny_clip), min_similarity=-1.0,
                            min_images=1)
    good = photos[0][1]
    batch = _doc_rows([("broken", "A sentence. Another one.", [b"not an image", good[: len(good) // 3]]),
                       ("empty", "   ", [good]), ("ok", "A photo. Of something.", [good])])
    out = stage.process(batch, ctx)
    assert out.column("id").to_pylist() == ["ok"]
    st = ctx.stats["interleave"].to_dict()
    assert st["drops"] == {"no_text": 1, "too_few_images": 1}
    assert st["metrics"]["undecodable_image"]["sum"] == 2
    ctx.close()
    failures = [json.loads(x) for f in (tmp_path / "run" / "failures").glob("*.jsonl") for x in f.read_text().splitlines()]
    assert {f["reason"] for f in failures} == {"undecodable_image"} and len(failures) == 2


def _tars(folder, photos, n_docs=6):
    folder.mkdir()
    for s in range(2):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for d in range(n_docs // 2):
                k = s * 100 + d
                picks = [photos[(k + j) % len(photos)] for j in range(3)]
                members = [(f"{j}.jpg", data) for j, (_, data, _) in enumerate(picks)]
                members.append(("txt", " ".join(c for _, _, c in photos[d:d + 4]).encode()))
                for ext, payload in members:
                    info = tarfile.TarInfo(f"doc{k:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _manifest(tmp_path, shards, tiny_clip, workers=1):
    return write_manifest(tmp_path / f"m{workers}.yaml", f"""
        name: interleave-test
        source: {{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved}}
        stages:
          - interleave: {{model: {tiny_clip}, batch_size: 8, min_similarity: -1.0}}
        sink: [{{kind: parquet}}, {{kind: webdataset}}]
        executor: {{kind: local, workers: {workers}}}
        """)


def _digests(run):
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("parquet", "webdataset") for p in sorted((run / d).glob("*")) if p.is_file()}


def test_cli_same_bytes_fault_and_loaders(tmp_path, photos, tiny_clip):
    shards = tmp_path / "docs"
    _tars(shards, photos)
    cli("run", str(_manifest(tmp_path, shards, tiny_clip, 2)), "-o", str(tmp_path / "a"), "--no-progress")
    ref = _digests(tmp_path / "a")
    # in this process with one worker (the model loads once): a stage failing in one shard, then a plain
    # rerun — the bytes of the clean two-worker CLI run
    from tests.test_faults import _run

    m = _manifest(tmp_path, shards, tiny_clip)
    faults = [{"point": "stage", "label": "interleave", "shard": "00001", "after": 1, "action": "raise"}]
    assert _run(m, tmp_path / "c", faults) is not None
    assert _run(m, tmp_path / "c") is None
    assert _digests(tmp_path / "c") == ref

    table = pq.read_table(sorted((tmp_path / "a" / "parquet").glob("*.parquet")))
    validate(table, "interleaved")
    assert table.num_rows == 6
    for row in table.to_pylist():
        assert len({im["sha256"] for im in row["images"] if im}) == sum(im is not None for im in row["images"])
    import datasets
    import webdataset as wds

    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (tmp_path / "a" / "parquet").glob("*.parquet")),
                               split="train")
    assert ds.num_rows == 6
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "a" / "webdataset").glob("*.tar")),
                                  shardshuffle=False).decode("pil"))
    assert len(samples) == 6
    from PIL import Image

    assert any(isinstance(v, Image.Image) for s in samples for v in s.values())

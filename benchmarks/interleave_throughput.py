"""interleave (MMC4 image–sentence assignment): documents/s and where the time goes, one run.

Documents are real text-like sentences (the photos' captions, repeated and shuffled) with ``--images``
candidate images each (scikit-image's bundled photographs re-encoded as JPEG at ``--px`` pixels). The
stage embeds every image and sentence with an open_clip model, then solves one linear assignment per
document. Reported per configuration:

* documents/s (median of ``--repeat`` runs, the model loaded once before timing);
* the share of the wall time spent decoding images (the decode threads' own wall time; they overlap
  the model), in the model (image and text towers), waiting for decoded images (the model starved)
  and in the assignment (similarity matrices, the floor and ``linear_sum_assignment``).

Lines: ``decode_workers`` 1, 2 and 4; the ratio of their documents/s says what decode parallelism buys
(the default is one thread per CPU, at most 8), and each line's wait share says whether the model is
starved. Models (random weights; speed does not depend on the values): ``tiny`` (2-layer
64-px towers: decoding dominates) and ``ViT-B-32`` (224 px, the usual CLIP filter architecture).

Usage: ``python benchmarks/interleave_throughput.py [--docs 64] [--images 6] [--model tiny] [--json out.json]``
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def _photos(px: int):
    from PIL import Image

    from curate.testing import real_images

    out = []
    for name, data, caption in real_images(size=None):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append((name, buf.getvalue(), caption))
    return out


def _docs(photos, n_docs: int, n_images: int, n_sentences: int, seed: int = 0) -> pa.RecordBatch:
    from curate.schema import IMAGE

    rng = random.Random(seed)
    ids, texts, images = [], [], []
    for d in range(n_docs):
        sentences = [rng.choice(photos)[2] for _ in range(n_sentences)]
        picks = [rng.choice(photos)[1] for _ in range(n_images)]
        ids.append(f"doc{d}")
        texts.append([" ".join(sentences)] + [None] * n_images)
        images.append([None] + [{"bytes": b, "mime": "image/jpeg", "sha256": None, "width": None, "height": None}
                                for b in picks])
    return pa.RecordBatch.from_pydict({"id": ids, "texts": texts, "images": images, "source": [None] * n_docs,
                                       "meta": [None] * n_docs},
                                      schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())),
                                                        ("images", pa.list_(IMAGE)), ("source", pa.string()),
                                                        ("meta", pa.string())]))


def _model(kind: str, folder: Path) -> str:
    from curate.testing import save_open_clip_folder, save_tiny_clip

    if kind == "tiny":
        return str(save_tiny_clip(folder / "tiny"))
    import open_clip

    return str(save_open_clip_folder(open_clip.create_model(kind), kind, folder / kind))


def run_config(model: str, batch: pa.RecordBatch, workers: int | None, repeat: int, batch_size: int) -> dict:
    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir

    cls = get_stage("interleave")
    params = cls.Params(model=model, batch_size=batch_size, decode_workers=workers, min_similarity=-1.0)
    times, shares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        stage = cls(params)
        ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(tmp))
        stage.setup(ctx)
        stage.process(batch.slice(0, 2), ctx)  # warm-up: first forward passes
        for _ in range(repeat):
            stage.clip.timings = {"decode_s": 0.0, "model_s": 0.0, "wait_s": 0.0}
            t0 = time.perf_counter()
            stage.process(batch, ctx)
            wall = time.perf_counter() - t0
            times.append(wall)
            t = stage.clip.timings
            shares.append({k: t.get(k, 0.0) / wall for k in ("decode_s", "model_s", "wait_s", "assign_s")})
    med = statistics.median(times)
    best = shares[times.index(med)] if med in times else shares[0]
    return {"decode_workers": workers or "default", "docs_per_s": batch.num_rows / med, "seconds": med,
            "share": {k[:-2]: round(v, 3) for k, v in best.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--images", type=int, default=6, help="candidate images per document")
    ap.add_argument("--sentences", type=int, default=20, help="sentences per document")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--model", default="tiny", help="tiny or an open_clip architecture (e.g. ViT-B-32)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)

    from curate.testing import write_report

    photos = _photos(args.px)
    batch = _docs(photos, args.docs, args.images, args.sentences)
    with tempfile.TemporaryDirectory() as tmp:
        model = _model(args.model, Path(tmp))
        lines = [run_config(model, batch, w, args.repeat, args.batch) for w in (1, 2, 4)]
    one = lines[0]
    report = {"model": args.model, "docs": args.docs, "images_per_doc": args.images, "px": args.px,
              "sentences_per_doc": args.sentences, "lines": lines,
              "vs_one_decode_thread": {str(x["decode_workers"]): round(x["docs_per_s"] / one["docs_per_s"], 2)
                                       for x in lines}}
    for line in lines:
        print(f"decode_workers={line['decode_workers']}: {line['docs_per_s']:.1f} docs/s "
              f"({line['docs_per_s'] * args.images:.0f} images/s); share of wall time: {line['share']}")
    print(f"documents/s relative to one decode thread: {report['vs_one_decode_thread']}")
    write_report(report, args.json)


if __name__ == "__main__":
    main()

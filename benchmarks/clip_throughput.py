"""clip_score vs a bare open_clip loop: same images, same captions, same model and batch size, one run.

The bare loop is what a user would write: for each batch, decode and preprocess the images one by one
(PIL + the model's transform), stack, ``encode_image``, ``encode_text`` on the tokenized captions,
normalize, take the row-wise cosine. The stage does the same work with decoding in a background thread
one batch ahead, plus chunking of long captions and its bookkeeping. Both see real photographs
(scikit-image's bundled images as JPEG at ``--px`` pixels), repeated to ``--images``. Goal: ≥ 0.9×.

Models (random weights; throughput does not depend on the values): ``tiny`` (2-layer 64-px towers, so
decoding dominates) and ``ViT-B-32`` (224 px, the DataComp baseline architecture; compute dominates).

Usage: ``python benchmarks/clip_throughput.py [--images 256] [--batch 64] [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa


def _batch(photos, n):
    from curate.schema import IMAGE

    rows = [photos[i % len(photos)] for i in range(n)]
    return pa.RecordBatch.from_pydict({
        "id": [f"r{i}" for i in range(n)],
        "texts": [[None, c] for _, _, c in rows],
        "images": [[{"bytes": b, "mime": "image/jpeg", "sha256": None, "width": None, "height": None}, None]
                   for _, b, _ in rows],
    }, schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(IMAGE))]))


def bare_loop(model, preprocess, tokenizer, photos, n, batch_size, torch):
    from PIL import Image

    out = []
    rows = [photos[i % len(photos)] for i in range(n)]
    for start in range(0, n, batch_size):
        part = rows[start:start + batch_size]
        images = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for _, b, _ in part])
        with torch.no_grad():
            im = model.encode_image(images)
            tx = model.encode_text(tokenizer([c for _, _, c in part]))
        im = im / im.norm(dim=-1, keepdim=True)
        tx = tx / tx.norm(dim=-1, keepdim=True)
        out.append((im * tx).sum(-1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="tiny,ViT-B-32")
    ap.add_argument("--json")
    args = ap.parse_args()
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)

    import open_clip
    import torch

    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir
    from curate.testing import real_images, save_tiny_clip, write_report

    photos = real_images(size=args.px)
    report = {"images": args.images, "batch": args.batch, "px": args.px, "torch_threads": torch.get_num_threads(),
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "tiny":
                folder = save_tiny_clip(f"{tmp}/tiny")
                model_arg, open_name = str(folder), f"local-dir:{folder}"
            else:
                folder = f"{tmp}/{name}"
                model = open_clip.create_model(name, pretrained=None)
                from curate.testing import save_open_clip_folder

                save_open_clip_folder(model, name, folder)
                model_arg, open_name = folder, f"local-dir:{folder}"
            cls = get_stage("clip_score")
            stage = cls(cls.Params(model=model_arg, batch_size=args.batch))
            ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(f"{tmp}/run"))
            stage.setup(ctx)
            model, _, preprocess = open_clip.create_model_and_transforms(open_name)
            model.eval()
            tokenizer = open_clip.get_tokenizer(open_name)
            batch = _batch(photos, args.images)
            ours, bare = [], []
            for _ in range(args.repeat):  # interleaved, so drift hits both alike
                t0 = time.perf_counter()
                s = stage.score(batch, ctx)
                ours.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = bare_loop(model, preprocess, tokenizer, photos, args.images, args.batch, torch)
                bare.append(time.perf_counter() - t0)
            assert np.allclose(s["score"].to_numpy(), b, atol=1e-4), "the two paths must agree"
            t_ours, t_bare = statistics.median(ours), statistics.median(bare)
            report["models"][name] = {"curate_img_per_s": round(args.images / t_ours, 1),
                                      "bare_img_per_s": round(args.images / t_bare, 1),
                                      "ratio": round(t_bare / t_ours, 3)}
    write_report(report, args.json)


if __name__ == "__main__":
    main()

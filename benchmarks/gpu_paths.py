"""The GPU paths: ``perplexity`` and ``clip_score`` on CUDA against bare model loops at the same batch.

Run it on a machine with a GPU (it runs on the CPU too, slowly, for a check of the script itself):
``python benchmarks/gpu_paths.py [--tokenizer DIR] [--json out.json]``. Weights are random (created
here, saved, and loaded back through the stage's own loading path, as a user's checkpoint is); speed does
not depend on their values. Everything is timed after a warm-up pass, each variant ``--repeat`` times,
interleaved, median reported; GPU work is synchronized before a clock is read.

**perplexity** — a Llama-shaped causal LM (``--lm``: ``1b`` is TinyLlama-1.1B's shape, ``small`` a
~0.2 B model, ``tiny`` for a CPU check) with a real tokenizer (``--tokenizer``: a folder with a
``tokenizer.json``; default a BPE trained here), documents of real text (the standard library's
docstrings) of mixed lengths, some longer than the context (sliding windows, half-window stride). Lines:

* ``curate`` — the stage's ``score`` on one record batch of all documents (tokenizes, cuts windows,
  sorts them by length into batches of ``--ppl-batch``, float16 on CUDA);
* ``bare`` — what a user writes: tokenize, the same windows in input order, ``--ppl-batch`` at a time,
  right-padded with an attention mask, forward, masked cross-entropy;
* ``model_only`` — curate's own batches, already tokenized and padded on the device, forward and
  cross-entropy only: the ceiling (what the model alone can do with those batches). ``curate`` over
  ``model_only`` is the share of the time the model is working.

**clip_score** — open_clip ``ViT-B-32`` and ``ViT-L-14`` (``--clip-models``), real photographs
(scikit-image's bundled images as ``--px`` JPEGs) with their captions, ``--images`` rows:

* ``curate_threads_N`` / ``curate_processes_N`` — the stage's ``score`` with ``decode_workers: N``
  threads (``--workers``) or processes (``--proc-workers``), and ``curate_default`` (on CUDA one
  decoding process per core), reporting the share of the time the model waited for decoded images;
* ``bare`` — a user's loop: decode and preprocess a batch one image at a time, then the model;
* ``bare_dataloader`` — the loop PyTorch's documentation recommends: a ``Dataset`` applying the
  preprocessing, a ``DataLoader`` with one worker process per core, pinned memory, workers kept;
* ``model_only`` — preprocessed tensors ready in memory, the model alone at the same batch: the ceiling.

Scores of each path are checked against the bare loop's (float16: within ``1e-2``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

LM_SHAPES = {  # Llama-shaped models: hidden, layers, heads, kv heads, MLP width, context
    "tiny": (64, 2, 4, 4, 128, 256),
    "small": (768, 12, 12, 4, 2048, 2048),
    "1b": (2048, 22, 32, 4, 5632, 2048),  # TinyLlama-1.1B's shape
}


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, torch):
    _sync(torch)
    t0 = time.perf_counter()
    out = fn()
    _sync(torch)
    return out, time.perf_counter() - t0


def _windows(ids, max_length, stride):
    """(window ids, new tokens at its end): every token but the first scored once (the HF guide's rule)."""
    if len(ids) < 2:
        return []
    out, scored_to, start = [], 1, 0
    while scored_to < len(ids):
        end = min(start + max_length, len(ids))
        out.append((ids[start:end], end - scored_to))
        scored_to = end
        if end == len(ids):
            break
        start = end - (max_length - stride)
    return out


# ---------------------------------------------------------------------------------------- perplexity
def bench_perplexity(args, tmp, device, report):
    import torch
    import transformers

    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir
    from curate.schema import documents_batch
    from curate.testing import _paragraphs

    paras = _paragraphs()
    folder = Path(tmp) / "lm"
    folder.mkdir()
    if args.tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from curate.tokenizer import TrainSpec, train_bpe

        bpe = train_bpe(TrainSpec(vocab_size=16000), paras[:6000])
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    hidden, layers, heads, kv, mlp, context = LM_SHAPES[args.lm]
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=mlp,
                                   max_position_embeddings=context)
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    del model
    rng = random.Random(0)
    # mixed lengths: most documents within the context, a tail of longer ones (sliding windows)
    texts = ["\n\n".join(rng.sample(paras, rng.choice([2, 4, 8, 16, 32, 64, 160]))) for _ in range(args.docs)]

    cls = get_stage("perplexity")
    stage = cls(cls.Params(model=str(folder), batch_size=args.ppl_batch, device=device))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(f"{tmp}/run"))
    t0 = time.perf_counter()
    stage.setup(ctx)
    load_s = time.perf_counter() - t0
    lm = stage.lm
    model = lm.model
    n_params = sum(p.numel() for p in model.parameters())
    batch = documents_batch([f"d{i}" for i in range(len(texts))], texts)
    ids = lm.encode(texts)
    n_tokens = sum(max(len(x) - 1, 0) for x in ids)
    max_length, stride = stage.max_length, stage.stride
    windows = [w for row in ids for w in _windows(row, max_length, stride)]
    window_tokens = sum(len(w) for w, _ in windows)

    def curate():
        return stage.score(batch, ctx)["perplexity"].to_numpy(zero_copy_only=False)

    def bare():
        enc = tok(texts)["input_ids"]
        owned = [(d, w, new) for d, row in enumerate(enc) for w, new in _windows(row, max_length, stride)]
        nll = np.zeros(len(texts))
        cnt = np.zeros(len(texts))
        for s in range(0, len(owned), args.ppl_batch):
            part = owned[s:s + args.ppl_batch]
            width = max(len(w) for _, w, _ in part)
            x = torch.zeros((len(part), width), dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for i, (_, w, _) in enumerate(part):
                x[i, :len(w)] = torch.tensor(w)
                mask[i, :len(w)] = 1
            x, mask = x.to(device), mask.to(device)
            with torch.no_grad():
                logits = model(input_ids=x, attention_mask=mask).logits
            labels = x.masked_fill(mask == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:],
                                                     reduction="none").cpu().numpy()
            for i, (d, w, new) in enumerate(part):
                nll[d] += loss[i, len(w) - 1 - new:len(w) - 1].sum()
                cnt[d] += new
        return np.exp(nll / np.maximum(cnt, 1))

    # the ceiling: curate's own length-sorted batches, built once, on the device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    ready = []
    for s in range(0, len(order), args.ppl_batch):
        part = [windows[i][0] for i in order[s:s + args.ppl_batch]]
        x = np.full((len(part), len(part[0])), lm.pad_id, np.int64)
        for i, w in enumerate(part):
            x[i, :len(w)] = w
        ready.append(torch.from_numpy(x).to(device))

    def model_only():
        total = 0.0
        for x in ready:
            with torch.no_grad():
                logits = model(input_ids=x).logits
                targets = torch.nn.functional.pad(x[:, 1:], (0, 1), value=-100)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                        targets.reshape(-1), reduction="none")
            total += float(nll.sum().cpu())
        return total

    fns = {"curate": curate, "bare": bare, "model_only": model_only}
    results = {k: fn() for k, fn in fns.items()}  # warm-up (kernels, allocator) and the agreement check
    times = {k: [] for k in fns}
    for _ in range(args.repeat):
        for k, fn in fns.items():
            times[k].append(_timed(fn, torch)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    rel = float(np.nanmax(np.abs(results["curate"] - results["bare"]) / results["bare"]))
    out = {
        "model": f"Llama-shaped {args.lm}: {n_params / 1e6:.0f} M parameters, context {context}, "
                 f"vocab {len(tok)}, {str(dtype).replace('torch.', '')}",
        "docs": len(texts), "tokens_scored": n_tokens, "window_tokens": window_tokens, "windows": len(windows),
        "batch": args.ppl_batch, "max_length": max_length, "stride": stride, "load_s": round(load_s, 2),
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "tokens_per_s": {k: round(n_tokens / v) for k, v in med.items()},
        "ratio_vs_bare": round(med["bare"] / med["curate"], 3),
        "share_of_model_only": round(med["model_only"] / med["curate"], 3),
        "max_rel_diff_vs_bare": rel,
    }
    report["perplexity"] = out
    assert rel < 1e-2, f"curate and the bare loop disagree: {rel}"
    if args.e2e:
        out["curate_run"] = _curate_run(tmp, folder, texts, results["curate"], args, device)
    from filters.causal_lm import _LOADED

    _LOADED.clear()
    if device == "cuda":
        torch.cuda.empty_cache()


def _curate_run(tmp, folder, texts, expected, args, device) -> dict:
    """The same documents through ``curate run`` (JSONL -> perplexity -> Parquet, one spawned worker):
    the CLI path on this device, its wall time (start-up and model load included) and its scores."""
    import subprocess

    import pyarrow.parquet as pq

    root = Path(tmp) / "e2e"
    root.mkdir()
    with open(root / "in.jsonl", "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
    (root / "run.yaml").write_text(json.dumps({
        "name": "gpu-perplexity", "source": {"kind": "jsonl", "paths": [str(root / "in.jsonl")], "id_field": "id"},
        "stages": [{"perplexity": {"model": str(folder), "batch_size": args.ppl_batch, "device": device}}],
        "sink": {"kind": "parquet"}, "executor": {"kind": "local", "workers": 1}}))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "curate", "run", str(root / "run.yaml"), "-o", str(root / "out"),
                           "--no-progress"], capture_output=True, text=True, timeout=args.e2e_timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"returncode": done.returncode, "stderr": done.stderr[-2000:]}
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(f) for f in sorted((root / "out").rglob("*.parquet"))])
    got = dict(zip(table.column("id").to_pylist(),
                   (s["perplexity"]["perplexity"] for s in table.column("scores").to_pylist())))
    want = {f"d{i}": v for i, v in enumerate(expected)}
    rel = max(abs(got[k] - v) / v for k, v in want.items())
    return {"wall_s": round(wall, 2), "rows": table.num_rows, "max_rel_diff_vs_in_process": rel}


# ---------------------------------------------------------------------------------------------- CLIP
def _clip_batch(photos, n):
    import pyarrow as pa

    from curate.schema import IMAGE

    rows = [photos[i % len(photos)] for i in range(n)]
    return pa.RecordBatch.from_pydict({
        "id": [f"r{i}" for i in range(n)],
        "texts": [[c] for _, _, c in rows],
        "images": [[{"bytes": b, "mime": "image/jpeg", "sha256": None, "width": None, "height": None}]
                   for _, b, _ in rows],
    }, schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(IMAGE))]))


def bench_clip(args, name, tmp, device, report):
    import torch
    from PIL import Image

    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir
    from curate.testing import real_images, save_open_clip_folder, save_tiny_clip
    from filters.clip_model import _default_workers, import_open_clip

    open_clip = import_open_clip()
    photos = real_images(size=args.px)
    folder = Path(tmp) / name
    if name == "tiny":
        save_tiny_clip(folder)
    else:
        save_open_clip_folder(open_clip.create_model(name, pretrained=None), name, folder)
    cls = get_stage("clip_score")
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(f"{tmp}/run-{name}"))
    stages = {}
    default = _default_workers(device)
    variants = [(f"threads_{w}", w, False) for w in args.workers]
    variants += [(f"processes_{w}", w, True) for w in args.proc_workers]
    variants.append(("default", None, None))
    for label, w, processes in variants:
        stage = cls(cls.Params(model=str(folder), batch_size=args.clip_batch, device=device, decode_workers=w,
                               decode_processes=processes))
        stage.setup(ctx)  # the model is loaded once and shared by the stages (same parameters)
        stages[label] = stage
    clip = stages["default"].clip
    model, preprocess, tokenizer = clip.model, clip.preprocess, clip.tokenizer
    dtype = clip.input_dtype  # open_clip's fp16 is mixed: the image tower takes float16
    batch = _clip_batch(photos, args.images)
    rows = [photos[i % len(photos)] for i in range(args.images)]

    def bare():
        out = []
        for s in range(0, len(rows), args.clip_batch):
            part = rows[s:s + args.clip_batch]
            x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for _, b, _ in part])
            with torch.no_grad():
                im = model.encode_image(x.to(device, dtype=dtype)).float()
                tx = model.encode_text(tokenizer([c for _, _, c in part]).to(device)).float()
            im = im / im.norm(dim=-1, keepdim=True)
            tx = tx / tx.norm(dim=-1, keepdim=True)
            out.append((im * tx).sum(-1).cpu().numpy())
        return np.concatenate(out)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return preprocess(Image.open(io.BytesIO(rows[i][1])).convert("RGB")), rows[i][2]

    # PyTorch's recommended loader: worker processes (one per core), pinned memory, kept across passes
    loader = torch.utils.data.DataLoader(Images(), batch_size=args.clip_batch, num_workers=os.cpu_count(),
                                         pin_memory=device == "cuda", persistent_workers=True,
                                         multiprocessing_context="fork")

    def bare_dataloader():
        out = []
        for x, captions in loader:
            with torch.no_grad():
                im = model.encode_image(x.to(device, dtype=dtype, non_blocking=True)).float()
                tx = model.encode_text(tokenizer(list(captions)).to(device)).float()
            out.append(((im / im.norm(dim=-1, keepdim=True)) * (tx / tx.norm(dim=-1, keepdim=True))).sum(-1).cpu())
        return torch.cat(out).numpy()

    tensors = [torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                            for _, b, _ in rows[s:s + args.clip_batch]]) for s in range(0, len(rows), args.clip_batch)]
    texts = [tokenizer([c for _, _, c in rows[s:s + args.clip_batch]]) for s in range(0, len(rows), args.clip_batch)]

    def model_only():
        out = []
        for x, t in zip(tensors, texts):
            with torch.no_grad():
                im = model.encode_image(x.to(device, dtype=dtype)).float()
                tx = model.encode_text(t.to(device)).float()
            out.append(((im / im.norm(dim=-1, keepdim=True)) * (tx / tx.norm(dim=-1, keepdim=True))).sum(-1).cpu())
        return torch.cat(out).numpy()

    waits: dict[str, list[float]] = {w: [] for w in stages}

    def curate_with(w):
        def run():
            stage = stages[w]
            stage.clip.timings = {"decode_s": 0.0, "model_s": 0.0, "wait_s": 0.0}
            s = stage.score(batch, ctx)["score"].to_numpy(zero_copy_only=False)
            waits[w].append(stage.clip.timings["wait_s"])
            return s
        return run

    fns = {"bare": bare, "bare_dataloader": bare_dataloader, "model_only": model_only,
           **{f"curate_{w}": curate_with(w) for w in stages}}
    for w in stages:  # start the decoding processes (once per worker process in a run) before timing
        curate_with(w)()
    results = {k: fn() for k, fn in fns.items()}  # warm-up and the agreement check
    for w in waits:
        waits[w].clear()
    times = {k: [] for k in fns}
    for _ in range(args.repeat):
        for k, fn in fns.items():
            times[k].append(_timed(fn, torch)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(float(np.max(np.abs(results[k] - results["bare"]))) for k in results)
    report.setdefault("clip_score", {})[name] = {
        "images": args.images, "px": args.px, "batch": args.clip_batch, "dtype": str(dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(), "default_decoders": f"{default} {'processes' if device == 'cuda' else 'threads'}",
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "img_per_s": {k: round(args.images / v, 1) for k, v in med.items()},
        "ratio_vs_bare": {k: round(med["bare"] / v, 3) for k, v in med.items() if k.startswith("curate")},
        "ratio_vs_bare_dataloader": {k: round(med["bare_dataloader"] / v, 3) for k, v in med.items()
                                     if k.startswith("curate")},
        "share_of_model_only": {k: round(med["model_only"] / v, 3) for k, v in med.items() if k.startswith("curate")},
        "model_wait_share": {f"curate_{w}": round(statistics.median(v) / med[f"curate_{w}"], 3)
                             for w, v in waits.items() if v},
        "max_abs_diff_vs_bare": diff,
    }
    assert diff < 1e-2, f"clip scores disagree with the bare loop: {diff}"
    from curate import models

    models.clear()  # so the next model has the memory
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", help="a tokenizer folder for the LM (default: a BPE trained here)")
    ap.add_argument("--lm", default="1b", choices=sorted(LM_SHAPES))
    ap.add_argument("--docs", type=int, default=128)
    ap.add_argument("--ppl-batch", type=int, default=16)
    ap.add_argument("--clip-models", default="ViT-B-32,ViT-L-14")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--clip-batch", type=int, default=256)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--workers", default="1,4,16", help="decode threads to try")
    ap.add_argument("--proc-workers", default="8,16", help="decode processes to try (the default is added)")
    ap.add_argument("--e2e", action="store_true", help="also score the documents through `curate run`")
    ap.add_argument("--e2e-timeout", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="perplexity,clip")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.proc_workers = [int(w) for w in args.proc_workers.split(",") if w]
    from curate.testing import byte_compile

    byte_compile()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "errors": {}}
    try:
        import open_clip
        import transformers

        report["transformers"], report["open_clip"] = transformers.__version__, open_clip.__version__
    except ImportError as e:
        report["errors"]["import"] = str(e)

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        if "perplexity" in args.only:
            jobs.append(("perplexity", lambda: bench_perplexity(args, tmp, device, report)))
        if "clip" in args.only:
            for name in args.clip_models.split(","):
                jobs.append((f"clip_{name}", lambda name=name: bench_clip(args, name, tmp, device, report)))
        for label, job in jobs:
            t0 = time.perf_counter()
            try:
                job()
            except Exception:  # noqa: BLE001 - one failed part must not lose the others' figures
                report["errors"][label] = traceback.format_exc()[-3000:]
            report.setdefault("section_s", {})[label] = round(time.perf_counter() - t0, 1)
            save()
            print(f"[{label}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

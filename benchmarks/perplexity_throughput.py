"""perplexity stage vs bare transformers loops: same documents, same model, one run.

Two baselines a user would write:

* **per document** — ``model(ids, labels=ids).loss`` for each document (documents fit the context);
* **batched** — the documents in input order, ``batch`` at a time, right-padded, with the loss masked
  to real tokens (the usual "pad and go" loop).

The stage tokenizes all documents, sorts windows by length into batches of the same size and
scores them; results agree with the per-document loop to 1e-4 (checked). The documents are real text
(the machine's standard-library docstrings) of mixed lengths, cut to the model context. The model is a
GPT-2 with random weights (``--layers``, ``--width``, 512-token context) and a BPE trained here.

Usage: ``python benchmarks/perplexity_throughput.py [--docs 256] [--batch 8] [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)

    import torch
    import transformers

    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir
    from curate.schema import documents_batch
    from curate.testing import _paragraphs, write_report
    from curate.tokenizer import TrainSpec, train_bpe

    paras = _paragraphs()
    rng = random.Random(0)
    texts = ["\n\n".join(rng.sample(paras, rng.randint(1, 12))) for _ in range(args.docs)]
    with tempfile.TemporaryDirectory() as tmp:
        bpe = train_bpe(TrainSpec(vocab_size=8000), paras[:4000])
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                   pad_token="<|endoftext|>")
        tok.save_pretrained(tmp)
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=args.width,
                                      n_layer=args.layers, n_head=4)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp)
        texts = [tok.decode(tok(t)["input_ids"][:512]) for t in texts]  # every document fits the context
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        cls = get_stage("perplexity")
        stage = cls(cls.Params(model=tmp, batch_size=args.batch))
        ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(f"{tmp}/run"))
        stage.setup(ctx)
        batch = documents_batch([f"d{i}" for i in range(len(texts))], texts)
        n_tokens = sum(len(tok(t)["input_ids"]) for t in texts)

        def per_document():
            out = []
            for t in texts:
                ids = torch.tensor([tok(t)["input_ids"]])
                with torch.no_grad():
                    out.append(math.exp(model(ids, labels=ids).loss.item()))
            return np.array(out)

        def batched():
            out = []
            for s in range(0, len(texts), args.batch):
                enc = tok(texts[s:s + args.batch], return_tensors="pt", padding=True)
                labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                with torch.no_grad():
                    logits = model(**enc).logits[:, :-1]
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
                mask = (labels[:, 1:] != -100).float()
                out.append(torch.exp((nll * mask).sum(1) / mask.sum(1)).numpy())
            return np.concatenate(out)

        times = {"curate": [], "per_document": [], "batched": []}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ours = stage.score(batch, ctx)["perplexity"].to_numpy()
            times["curate"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = per_document()
            times["per_document"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pad = batched()
            times["batched"].append(time.perf_counter() - t0)
        assert np.allclose(ours, ref, rtol=1e-4) and np.allclose(pad, ref, rtol=1e-3), "the paths must agree"
        med = {k: statistics.median(v) for k, v in times.items()}
        report = {"docs": len(texts), "tokens": n_tokens, "batch": args.batch, "layers": args.layers,
                  "width": args.width, "torch_threads": torch.get_num_threads(),
                  "tokens_per_s": {k: round(n_tokens / v) for k, v in med.items()},
                  "ratio_vs_per_document": round(med["per_document"] / med["curate"], 3),
                  "ratio_vs_batched": round(med["batched"] / med["curate"], 3)}
    write_report(report, args.json)


if __name__ == "__main__":
    main()

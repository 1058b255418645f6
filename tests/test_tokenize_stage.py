"""The ``tokenize`` stage through a real run: ids, counts, ``min_tokens`` drops and ``append_eos``."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tests.conftest import cli, make_text, write_jsonl, write_manifest


def _run(tmp_path, params: str):
    rows = [{"id": f"d{i}", "text": "x" if i % 5 == 0 else make_text(i, 30 + i)} for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: tok
        source: {{kind: jsonl, paths: ["{tmp_path}/in.jsonl"], batch_rows: 7}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages: [{{tokenize: {params}}}]
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 2}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    table = pq.read_table(sorted((tmp_path / "run" / "parquet").glob("*.parquet")))
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())["stages"]["tokenize"]
    return rows, table.sort_by("id"), stats


def test_short_documents_are_dropped_and_counted(tmp_path):
    rows, table, stats = _run(tmp_path, "{min_tokens: 3}")
    ids = table.column("id").to_pylist()
    assert "d0" not in ids and "d5" not in ids and len(ids) == 48  # the 12 one-character documents
    assert stats["drops"] == {"too_few_tokens": 12} and stats["rows_out"] == 48
    lengths = [len(x) for x in table.column("input_ids").to_pylist()]
    assert lengths == table.column("n_tokens").to_pylist() and min(lengths) >= 3
    assert str(table.schema.field("n_tokens").type) == "int32"
    assert str(table.schema.field("input_ids").type.value_type) == "int32"


def test_end_of_text_is_appended_and_nothing_dropped_by_default(tmp_path):
    rows, table, stats = _run(tmp_path, "{append_eos: true}")
    assert table.num_rows == 60 and not stats.get("drops")
    eos = {ids[-1] for ids in table.column("input_ids").to_pylist()}
    assert len(eos) == 1

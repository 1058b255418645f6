"""The one-pass character classes equal the regular expressions they replace (polars' ``\\p{…}``, ``\\s``, ``\\S+``)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import curate.char_classes as cc
from curate.testing import _paragraphs

PATTERNS = {"letters": r"\p{L}", "upper": r"\p{Lu}", "numbers": r"\p{N}", "punct": r"\p{P}", "spaces": r"\s",
            "words": r"\S+", "newlines": "\n"}

EDGE = ["", None, " ", "x", "  two  spaces  ", "\n\n", "tab\there", "Ünïcödé ΑΒΓ δ 123 ٣ ½ Ⅻ",
        "astral: 😀 𝐀𝐁𝟏 𠀀 end", "no-break\u00a0space\u2003em\u3000ideo", "separators\x1c\x1d\x1e\x1fstay solid",
        "\u2028line\u2029para\x85nel", "«quotes» ¿qué? ¡sí! — dash… ‘curly’", "combining e\u0301 and \u0915\u093f"]


def _regex_counts(texts: pa.Array) -> dict[str, np.ndarray]:
    col = pl.col("t")
    df = pl.from_arrow(pa.table({"t": texts})).select(
        col.str.len_chars().alias("chars"), *[col.str.count_matches(p).alias(k) for k, p in PATTERNS.items()])
    return {k: df[k].fill_null(0).to_numpy() for k in df.columns}


def _corpus() -> list[str | None]:
    paras = _paragraphs()
    docs = ["\n\n".join(paras[i:i + 7]) for i in range(0, 1400, 7)]
    return docs + EDGE + [" ".join(EDGE[4:]) * 50]


@pytest.mark.parametrize("slice_chars", [cc._SLICE_CHARS, 1000, 1])
def test_counts_equal_the_regular_expressions(monkeypatch, slice_chars):
    monkeypatch.setattr(cc, "_SLICE_CHARS", slice_chars)  # slices of one document each, and of several
    texts = pa.array(_corpus(), pa.string())
    got, want = cc.class_counts(texts), _regex_counts(texts)
    for name in want:
        mismatched = np.flatnonzero(got[name] != want[name])
        assert not len(mismatched), (name, [(texts[int(i)], got[name][i], want[name][i]) for i in mismatched[:3]])


def test_sliced_chunked_and_large_inputs_give_the_same_counts():
    texts = pa.array(_corpus(), pa.string())
    whole = cc.class_counts(texts)
    part = cc.class_counts(texts.slice(190, 20))
    chunked = cc.class_counts(pa.chunked_array([texts.slice(0, 100), texts.slice(100)]).cast(pa.large_string()))
    for name, values in whole.items():
        assert part[name].tolist() == values[190:210].tolist(), name
        assert chunked[name].tolist() == values.tolist(), name
    assert all(len(v) == 0 for v in cc.class_counts(pa.array([], pa.string())).values())

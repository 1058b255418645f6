"""``c4_quality`` with ``engine: fast`` against datatrove's ``C4QualityFilter`` on real text.

With datatrove's own sentence counts fed in, the fast rule must give datatrove's verdict, reason,
rewritten text and line counters for every document; with its own regular-expression sentence count
it must agree on at least 99.5% of verdicts, and every document that differs must differ only through
the sentence count (the one documented approximation).
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
import pyarrow as pa
import pytest

from curate.schema import documents_batch
from tests.conftest import make_stage

pytest.importorskip("datatrove", reason="the `quality` extra is not installed")
pytest.importorskip("spacy", reason="the `quality` extra is not installed")

# Web-page furniture written for this test (menus, footers, widgets); the prose comes from the machine.
MENU = ["Home", "About us", "Contact", "Blog | News | Events", "Sign in", "Share this:", "Next page »",
        "Categories", "Archives", "Search …", "Skip to content", "Posted by admin"]
BOILERPLATE = [
    "This website uses cookies to improve your experience.",
    "By continuing you agree to our Terms of Use and Privacy Policy.",
    "Please enable JavaScript in your browser to see the comments.",
    "Our cookie policy explains how we use cookies.",
    "Copyright 2021 Example Media. All rights reserved.",
    "Subscribe to our newsletter for weekly updates!",
    "Did you find this page useful?",
]
LOREM = "Lorem ipsum dolor sit amet, placeholder text for the layout."
CODE = ["function show() { return true; }", "var settings = {\"mode\": \"dark\"};"]


@functools.cache
def _real_paragraphs() -> list[str]:
    """Docstring paragraphs of a third of the standard library, and paragraphs of the licence texts here."""
    from curate.readers.stdlib_docs import _root, module_text, stdlib_files

    paras = []
    for rel in stdlib_files()[::3]:  # a third: the whole library takes ~15 s to parse on this machine
        paras += [p.strip() for p in module_text(os.path.join(_root(), rel)).split("\n\n") if len(p.strip()) > 40]
    for path in sorted(glob.glob("/usr/share/common-licenses/*"))[:12]:
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                paras += [p.strip() for p in fh.read().split("\n\n") if len(p.strip()) > 40]
    return paras


def _sentences(paragraph: str) -> list[str]:
    """A paragraph cut at '. ' into rough sentences (to build documents near the 5-sentence threshold)."""
    flat = " ".join(paragraph.split())
    return [s if s.endswith(".") else s + "." for s in flat.split(". ") if s]


def web_documents(paras: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` documents that look like crawled pages, built from real paragraphs.

    Each mixes prose (hard-wrapped as in the source, or one line per paragraph), a few loose sentences
    (so that many documents sit near the sentence threshold), menus, bullets, repeated lines, citation
    marks, boilerplate about cookies and JavaScript, and now and then lorem ipsum or code with braces.
    """
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines: list[str] = []
        if rng.random() < 0.6:
            lines += [MENU[i] for i in rng.choice(len(MENU), rng.integers(1, 5), replace=False)]
        for _ in range(rng.integers(0, 7)):
            para = paras[rng.integers(len(paras))]
            lines += para.splitlines() if rng.random() < 0.25 else [" ".join(para.split())]
        sents = _sentences(paras[rng.integers(len(paras))])
        for s in sents[: rng.integers(0, 9)]:
            lines.append(s + (" [" + str(rng.integers(1, 30)) + "]" if rng.random() < 0.15 else ""))
        if rng.random() < 0.3:
            lines += [f"- {w}" for w in paras[rng.integers(len(paras))].split()[:6]]
        if rng.random() < 0.4:
            lines.append(BOILERPLATE[rng.integers(len(BOILERPLATE))])
        if rng.random() < 0.04:
            lines.insert(rng.integers(len(lines) + 1), LOREM)
        if rng.random() < 0.05:
            lines.insert(rng.integers(len(lines) + 1), CODE[rng.integers(len(CODE))])
        if rng.random() < 0.2 and lines:
            lines += [lines[rng.integers(len(lines))]] * 2
        sep = "\r\n" if rng.random() < 0.05 else "\n"
        docs.append(sep.join(lines) + ("\n" if rng.random() < 0.5 else ""))
    return docs


# Crafted documents, one or more per rule and per detail of datatrove's behaviour.
EDGE_CASES = [
    "",
    "\n",
    "   \n\t\n",
    "One short line.",
    "First good line of the text.\r\nSecond good line of the text.\rThird good line here.\x0cFourth line "
    "is fine.\u2028Fifth line is here too.",
    "A line with a form feed\x0bin the middle. And more text after it. Then a third sentence here. "
    "A fourth one. A fifth one.",
    "Trailing citation mark here. [1]\nAnother sentence of the page [edit].\nThree words here [2].\n"
    "Only two [3][4][5].\nMark at start [citation needed] is removed. Then. More. Sentences. Here.",
    "[1] Leading citation leaves a space. Next sentence. Third one. Fourth one. Fifth one.",
    "Ends with an ellipsis...\nEnds with a quote, as he said \"yes.\"\nEnds with 'single quote'\n"
    "Asks a question? Shouts! Plain period. One more. And another. Last one.",
    "This line talks about JavaScript widgets.\nThis line has lorem ipsum text.\nNever counted line.",
    "This line talks about javascript { braces }.\nThis has a { brace in it.\nNever counted either.",
    "Read the terms of use carefully.\nThis site uses cookies, sadly.\nWe use cookies here.\n"
    "Mr. Smith went to Washington. He met Dr. Jones, e.g. at noon. It was 3 p.m. in the U.S. capital. "
    "They talked. Then they left.",
    "a " * 3 + "x" * 1001 + " end.\nwell formed line here. With sentences. Three. Four. Five.",
    "x" * 999 + "y. Short. Two. Three. Four.",
    "Non-breaking\u00a0spaces\u2003and ideographic\u3000spaces count as whitespace.\n"
    "Information\x1fseparator is whitespace too. Here. Are. More.",
    "The Kelvin sign: use of coo\u212aies is a policy phrase.\nAnother line. With. Many. Sentences. Here.",
    "Wait... what? Really?! Yes. (See above.) \"Quoted.\" End.",
    "Version 3.11 was released. See docs.python.org for more. Call os.path.join(a, b) here. Done.",
    "Lorem Ipsum in a line without end punctuation\nLine without the phrase ends here.",
    "\u0130stanbul is a city. Javascr\u0130pt is not javascript. One. Two. Three.",
    "Word\ttab separated\tline here.\nAnother  double  spaced  line.  Yes.  Three.  Four.",
]


def _datatrove(texts: list[str], **params):
    """datatrove's verdicts (reason or None), edited texts of kept documents, and line counters."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter

    f = C4QualityFilter(**params)
    reasons, edited = [], []
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i))
        verdict = f.filter(doc)
        keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
        reasons.append(None if keep else reason)
        edited.append(doc.text if keep else None)
    counters = {k: int(v.total) for k, v in f.stats.stats.items() if k.startswith("line-")}
    return reasons, edited, counters


def _spacy_counts(lines: list[str]) -> list[int]:
    """datatrove's sentence count of each line (spaCy's sentencizer), as its C4 filter computes it."""
    return [_spacy_count(line) for line in lines]


@functools.lru_cache(maxsize=100_000)
def _spacy_count(line: str) -> int:
    from datatrove.utils.text import split_into_sentences

    return len(split_into_sentences(line))


def _fast(texts: list[str], count_sentences=None, **params):
    from filters.fast_c4 import FastC4Rule

    v = FastC4Rule(**params).verdicts(pa.array(texts, type=pa.large_string()), count_sentences=count_sentences)
    counters = {k: c for k, c in v.counters.items() if c}
    texts_out = v.texts.to_pylist()
    return v.reasons.to_pylist(), [t if r is None else None for t, r in zip(texts_out, v.reasons.to_pylist(), strict=True)], \
        counters


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return web_documents(_real_paragraphs(), 500) + EDGE_CASES


@pytest.fixture(scope="module")
def reference(corpus):
    """datatrove's verdicts on the corpus with default parameters (computed once: ~6 s)."""
    return _datatrove(corpus)


#: Non-default parameters, each run on the edge cases and the first 200 documents.
PARAMS = [
    {"min_num_sentences": 2, "filter_curly_bracket": False, "remove_citations": False},
    {"filter_no_terminal_punct": False, "min_words_per_line": -1, "max_word_length": 20},
    {"min_num_sentences": -1, "filter_lorem_ipsum": False, "filter_javascript": False, "filter_policy": False},
    {"min_num_sentences": 0, "min_words_per_line": 0, "max_word_length": 0},
    {"filter_no_terminal_punct": False, "min_words_per_line": -1, "max_word_length": -3, "min_num_sentences": 1},
]


def test_identical_to_datatrove_given_its_sentence_counts(corpus, reference):
    """Every verdict, reason, rewritten text and line counter equals datatrove's when sentences are spaCy's."""
    reasons, edited, counters = reference
    f_reasons, f_edited, f_counters = _fast(corpus, count_sentences=_spacy_counts)
    assert f_reasons == reasons
    assert f_edited == edited
    assert f_counters == counters
    kept = sum(r is None for r in reasons)
    assert 0.3 * len(corpus) < kept < 0.7 * len(corpus), "the sample should keep and drop a fair share"
    assert {"too_few_sentences", "lorem_ipsum", "curly_bracket"} <= set(reasons)
    assert set(counters) == {"line-total", "line-kept", "line-filter-no_terminal_punc", "line-filter-too_few_words",
                             "line-filter-javascript", "line-filter-policy", "line-filter-too_long_word"}


@pytest.mark.parametrize("params", PARAMS)
def test_identical_to_datatrove_with_other_parameters(corpus, params):
    texts = corpus[:200] + EDGE_CASES
    reasons, edited, counters = _datatrove(texts, **params)
    f_reasons, f_edited, f_counters = _fast(texts, count_sentences=_spacy_counts, **params)
    assert (f_reasons, f_edited, f_counters) == (reasons, edited, counters)
    assert any(r is None for r in reasons) and (params.get("min_num_sentences") == 0 or any(reasons))


def test_edge_cases_each_identical(reference, corpus):
    """The crafted documents one by one (so that a failure names the document)."""
    reasons, edited, _ = reference
    offset = len(corpus) - len(EDGE_CASES)
    f_reasons, f_edited, _ = _fast(EDGE_CASES, count_sentences=_spacy_counts)
    a_reasons, a_edited, _ = _fast(EDGE_CASES)  # the regex sentence count models every one of them too
    for k, text in enumerate(EDGE_CASES):
        assert (f_reasons[k], f_edited[k]) == (reasons[offset + k], edited[offset + k]), text
        assert (a_reasons[k], a_edited[k]) == (reasons[offset + k], edited[offset + k]), text


def test_agreement_with_regex_sentence_count(corpus, reference):
    """>= 99.5% identical verdicts with the fast engine's own sentence count; every difference is the count's."""
    import polars as pl

    from filters.fast_c4 import approx_sentence_counts

    reasons, edited, counters = reference
    f_reasons, f_edited, f_counters = _fast(corpus)
    assert f_counters == counters, "line counters never depend on the sentence count"
    differ = [i for i, (a, b) in enumerate(zip(reasons, f_reasons, strict=True)) if a != b]
    rate = 1 - len(differ) / len(corpus)
    print(f"\nc4_quality engine: fast verdict agreement {rate:.4%} ({len(differ)} of {len(corpus)} differ)")
    assert rate >= 0.995
    for i in differ:  # documented difference: only the sentence count, on a document near the threshold
        assert "too_few_sentences" in (reasons[i], f_reasons[i]), corpus[i]
        kept_lines = _fast([corpus[i]], min_num_sentences=-1)[1][0].split("\n")
        assert list(approx_sentence_counts(pl.Series(kept_lines))) != _spacy_counts(kept_lines), corpus[i]
    same = [i for i in range(len(corpus)) if i not in set(differ) and reasons[i] is None]
    assert all(f_edited[i] == edited[i] for i in same), "kept documents get datatrove's text"


def test_sentence_count_model_on_real_lines():
    """The regex sentence count equals spaCy's on >= 99.5% of real lines, and on the cases it models."""
    import polars as pl

    from filters.fast_c4 import approx_sentence_counts

    paras = _real_paragraphs()
    lines = [line.strip() for p in paras[:400] for line in p.splitlines() if line.strip()]
    lines += [" ".join(p.split()) for p in paras[400:700]]
    modelled = ["Mr. Smith went home. He slept.", "It was 3 p.m. and late (e.g. dark). So.", "Wait... what? No!",
                "end.Next one here.", "pathlib.Path.open is a name.", "He said \"hi.\" Then left.",
                "The USA. Then Plan A. Then x. y. z.", "Tabs.\tCount.  Twice.", "Bang !important rule.",
                "[1] x.", "", "Hi. [1]", "a.m. e.g. i.e. done."]
    spacy_counts = np.array(_spacy_counts(lines + modelled))
    ours = approx_sentence_counts(pl.Series(lines + modelled))
    assert list(ours[len(lines):]) == list(spacy_counts[len(lines):])
    agree = float(np.mean(ours[: len(lines)] == spacy_counts[: len(lines)]))
    print(f"\nsentence count agreement on {len(lines)} real lines: {agree:.4%}")
    assert agree >= 0.995


def test_constants_follow_python_spacy_and_datatrove():
    """The copied facts (whitespace, exceptions, phrases) match the libraries installed here."""
    import sys

    import spacy
    from datatrove.pipeline.filters import c4_filters
    from spacy.pipeline.sentencizer import Sentencizer

    from filters import fast_c4

    assert set(fast_c4.PY_WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    rules = spacy.blank("en").tokenizer.rules
    assert set(fast_c4.SPACY_PERIOD_EXCEPTIONS) == {k for k in rules if "." in k}
    assert set(fast_c4._SPLIT_ENDS) <= set(Sentencizer.default_punct_chars)
    assert fast_c4.POLICY_PHRASES == tuple(c4_filters.POLICY_SUBSTRINGS)
    assert fast_c4.END_PUNCTUATION == c4_filters.END_PUNCTUATION
    assert all(name in fast_c4.COUNTERS or name is None for name in fast_c4.COUNTERS)


def test_stage_with_fast_engine_matches_datatrove_engine(corpus):
    """Through the stage: same kept rows and texts (outside sentence-count differences), same counters."""
    texts = corpus[:200] + EDGE_CASES
    out = {}
    for engine in ("datatrove", "fast"):
        stage, ctx = make_stage("c4_quality", engine=engine)
        batch = documents_batch([f"d{i}" for i in range(len(texts))], texts)
        kept = {i: t for b in stage.run(iter([batch]), ctx)
                for i, t in zip(b.column("id").to_pylist(), b.column("text").to_pylist(), strict=True)}
        stats = ctx.stats[stage.label]
        out[engine] = kept, dict(stats.drops), {k: v.total for k, v in stats.metrics.items() if k.startswith("line-")}
    (kept_d, drops_d, lines_d), (kept_f, drops_f, lines_f) = out["datatrove"], out["fast"]
    assert lines_f == lines_d
    assert {k: v for k, v in drops_f.items() if k != "too_few_sentences"} == \
        {k: v for k, v in drops_d.items() if k != "too_few_sentences"}
    assert len(set(kept_d) ^ set(kept_f)) <= 0.005 * len(texts)
    assert all(kept_f[i] == kept_d[i] for i in set(kept_d) & set(kept_f))


def test_fast_engine_refuses_sentence_lines():
    from curate.registry import get_stage

    cls = get_stage("c4_quality")
    with pytest.raises(ValueError, match="split_paragraph: true only.*engine: datatrove"):
        cls.Params(engine="fast", split_paragraph=False)
    assert cls.Params(engine="datatrove", split_paragraph=False).split_paragraph is False


def test_fast_engine_needs_neither_datatrove_nor_spacy():
    stage, _ = make_stage("c4_quality", engine="fast")
    assert stage.requirements() == {}
    v = stage.fast.verdicts(pa.array([None, "x"], type=pa.string()))
    assert v.reasons.to_pylist() == ["too_few_sentences", "too_few_sentences"]
    assert v.counters["line-total"] == 1 and v.counters["line-filter-no_terminal_punc"] == 1


def test_a_known_difference_is_the_sentence_count_only():
    """An unmodelled spaCy exception ("id." is "i" + "d.") changes the count and nothing else."""
    import polars as pl

    from filters.fast_c4 import approx_sentence_counts

    doc = "\n".join(f"Check the message id. Then stop at step {k}." for k in range(4))
    reasons, edited, counters = _datatrove([doc])
    assert reasons == ["too_few_sentences"]  # spaCy: one sentence per line, four in all
    assert _fast([doc], count_sentences=_spacy_counts) == (reasons, edited, counters)
    fast = _fast([doc])
    assert fast[0] == [None] and fast[2] == counters  # the regex count sees two sentences per line
    assert list(approx_sentence_counts(pl.Series(doc.split("\n")))) == [2] * 4

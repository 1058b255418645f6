"""``engine: fast`` for ``c4_quality``: datatrove's ``C4QualityFilter`` on a whole Arrow column with polars.

Contract (``split_paragraph: true``, the C4 default): for every row the same verdict, the same reason
string, the same rewritten text of a kept row and the same ``line-*`` counters as datatrove, with one
approximation — the sentence count of the ``min_num_sentences`` rule. datatrove counts sentences with
spaCy's sentencizer on the tokens of spaCy's English tokenizer; here :func:`approx_sentence_counts`
finds the same boundaries with regular expressions (see its docstring for what it models and what it
does not). Everything else is computed exactly as datatrove does it:

* lines are Python's ``str.splitlines()`` (every line break Python knows, no empty last line), each
  stripped of Python's whitespace;
* per line, in datatrove's order: a word (``line.split()``) longer than ``max_word_length`` →
  ``line-filter-too_long_word``; citation marks removed; no terminal punctuation (or ``...``) →
  ``line-filter-no_terminal_punc``; fewer words than ``min_words_per_line`` (words counted *before*
  citation removal) → ``line-filter-too_few_words``; "lorem ipsum" → the document is dropped
  (``lorem_ipsum``); "javascript" → ``line-filter-javascript``; ``{`` → the document is dropped
  (``curly_bracket``); a policy phrase → ``line-filter-policy``; else ``line-kept``;
* a document dropped on a line stops there: later lines are not counted (datatrove returns at once);
* kept documents get their kept lines (citations removed) joined by ``\\n`` and stripped.

The sentence count only decides documents that keep fewer lines than ``min_num_sentences`` (each kept
line has at least one sentence), so it is computed for those documents' lines only.
``split_paragraph: false`` is not offered (``C4Quality.Params`` refuses it with ``engine: fast``).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from filters.datatrove_adapter import FastRule, FastVerdicts

#: The characters ``str.isspace()`` is true for (what ``str.strip()`` and ``str.split()`` use);
#: ``tests/test_fast_c4.py`` checks this against the running Python.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
#: Line breaks of ``str.splitlines()`` other than ``\n`` (``\r\n`` counts as one).
OTHER_LINE_BREAKS = r"\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x{85}\x{2028}\x{2029}]"
#: datatrove's policy phrases (matched in the lowercased line).
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
#: datatrove's terminal punctuation.
END_PUNCTUATION = ('.', '?', '!', '"', "'")

#: Line counters in datatrove's check order; the index is the line's status code below.
COUNTERS = ("line-filter-too_long_word", "line-filter-no_terminal_punc", "line-filter-too_few_words", None,
            "line-filter-javascript", None, "line-filter-policy", "line-kept")
TOO_LONG, NO_PUNCT, TOO_FEW, LOREM, JAVASCRIPT, CURLY, POLICY, KEPT = range(8)


def _rust_class(chars: str) -> str:
    """A regex character class body (Rust syntax) matching exactly ``chars``."""
    return "".join(f"\\x{{{ord(c):x}}}" for c in chars)


WS = _rust_class(PY_WHITESPACE)
#: One word of ``str.split()``: a run of non-whitespace (Python's definition of whitespace).
PY_WORD = f"[^{WS}]+"


@functools.cache
def python_digit_class() -> str:
    """Character-class ranges of Python's ``\\d`` (Unicode Nd of the running Python), for Rust regex."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))  # one regex scan finds the runs of digits
    return "".join(f"\\x{{{m.start():x}}}-\\x{{{m.end() - 1:x}}}" for m in re.finditer(r"\d+", every))


@functools.cache
def citation_pattern() -> str:
    """datatrove's ``CITATION_REGEX`` (``[12]``, ``[]``, ``[edit]``, ``[citation needed]``) in Rust syntax."""
    return rf"\[[{python_digit_class()}]*\]|\[edit\]|\[citation needed\]"


class FastC4Rule(FastRule):
    """datatrove's C4 line and document rules (``split_paragraph: true``) over a column at once."""

    def __init__(self, *, remove_citations: bool = True, filter_no_terminal_punct: bool = True,
                 min_num_sentences: int = 5, min_words_per_line: int = 3, max_word_length: int = 1000,
                 filter_lorem_ipsum: bool = True, filter_javascript: bool = True,
                 filter_curly_bracket: bool = True, filter_policy: bool = True):
        self.remove_citations = remove_citations
        self.filter_no_terminal_punct = filter_no_terminal_punct
        self.min_num_sentences = min_num_sentences
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.filter_lorem_ipsum = filter_lorem_ipsum
        self.filter_javascript = filter_javascript
        self.filter_curly_bracket = filter_curly_bracket
        self.filter_policy = filter_policy

    def verdicts(self, texts: pa.Array,
                 count_sentences: Callable[[list[str]], Sequence[int]] | None = None) -> FastVerdicts:
        """Verdicts, rewritten texts and line counters of every row of ``texts`` (nulls are empty texts).

        ``count_sentences`` replaces the sentence approximation: it gets kept lines and returns the
        number of sentences of each (the test passes datatrove's own spaCy count here, to show that
        every other part of the rule agrees with datatrove exactly).
        """
        import polars as pl

        text = pl.Series(pl.from_arrow(texts)).cast(pl.String).fill_null("")
        rows = len(text)
        lines, row_of_line, line_pos = _split_lines(text)
        status, cleaned, at = self._line_status(lines)

        # A document ends at its first lorem-ipsum or curly-bracket line; later lines are never looked at.
        doc_drop = (status == LOREM) | (status == CURLY)
        first_drop = np.full(rows, np.iinfo(np.int64).max, dtype=np.int64)
        drop_rows, first_at = np.unique(row_of_line[doc_drop], return_index=True)
        first_drop[drop_rows] = line_pos[doc_drop][first_at]
        seen = line_pos <= first_drop[row_of_line]
        per_status = np.bincount(status[seen], minlength=8)
        counters = {"line-total": int(seen.sum())}
        counters.update({name: int(per_status[code]) for code, name in enumerate(COUNTERS) if name})

        reasons = np.full(rows, None, dtype=object)
        reason_of_line = np.where(status[doc_drop] == LOREM, "lorem_ipsum", "curly_bracket")
        reasons[drop_rows] = reason_of_line[first_at]

        kept_line = (status == KEPT) & seen
        kept_per_row = np.bincount(row_of_line[kept_line], minlength=rows)
        if self.min_num_sentences > 0:
            short = (kept_per_row < self.min_num_sentences) & (reasons == None)  # noqa: E711 (numpy)
            on_short = kept_line & short[row_of_line]
            kept_lines = cleaned.filter(pl.Series(on_short[at]))
            if count_sentences is None:
                per_line = approx_sentence_counts(kept_lines)
            else:
                per_line = np.asarray(count_sentences(kept_lines.to_list()), dtype=np.int64)
            sentences = np.bincount(row_of_line[on_short], weights=per_line, minlength=rows)
            reasons[short & (sentences < self.min_num_sentences)] = "too_few_sentences"

        return FastVerdicts(reasons=pa.array(reasons, type=pa.string()),
                            texts=_join_kept(cleaned.filter(pl.Series(kept_line[at])), kept_per_row, reasons),
                            counters=counters)

    def _line_status(self, lines):
        """Each line's status code (datatrove's first failing check) and its text after citation removal.

        Checks run on ever smaller subsets: a line that fails one check is not looked at again.
        ``cleaned`` holds the lines that passed the first three checks (citations removed), in order;
        ``at`` is the line index of each of them.
        """
        import polars as pl

        status = np.full(len(lines), KEPT, dtype=np.int8)
        stripped = lines.str.strip_chars(PY_WHITESPACE)
        at = np.arange(len(lines))
        if self.max_word_length != -1:
            too_long = _has_longer_word(stripped, self.max_word_length)
            status[too_long] = TOO_LONG
            stripped, at = stripped.filter(pl.Series(~too_long)), at[~too_long]
        cleaned = stripped.str.replace_all(citation_pattern(), "") if self.remove_citations else stripped
        if self.filter_no_terminal_punct:
            ends = cleaned.str.ends_with(END_PUNCTUATION[0])
            for mark in END_PUNCTUATION[1:]:
                ends = ends | cleaned.str.ends_with(mark)
            no_punct = (~ends | cleaned.str.ends_with("...")).to_numpy()
            status[at[no_punct]] = NO_PUNCT
            keep = pl.Series(~no_punct)
            stripped, cleaned, at = stripped.filter(keep), cleaned.filter(keep), at[~no_punct]
        too_few = stripped.str.count_matches(PY_WORD).to_numpy() < self.min_words_per_line
        status[at[too_few]] = TOO_FEW
        keep = pl.Series(~too_few)
        cleaned, at = cleaned.filter(keep), at[~too_few]

        lower = cleaned.str.to_lowercase()
        checks = (
            (self.filter_lorem_ipsum, LOREM, lambda: lower.str.contains("lorem ipsum", literal=True)),
            (self.filter_javascript, JAVASCRIPT, lambda: lower.str.contains("javascript", literal=True)),
            (self.filter_curly_bracket, CURLY, lambda: cleaned.str.contains("{", literal=True)),
            (self.filter_policy, POLICY, lambda: lower.str.contains("|".join(POLICY_PHRASES))),
        )
        undecided = np.ones(len(at), dtype=bool)
        for enabled, code, hits in checks:
            if enabled:
                hit = hits().to_numpy() & undecided
                status[at[hit]] = code
                undecided &= ~hit
        return status, cleaned, at


def _split_lines(text):
    """``str.splitlines()`` of every text: the lines, each line's row and its position in the row."""
    import polars as pl

    parts = text.str.replace_all(OTHER_LINE_BREAKS, "\n").str.split("\n")
    counts = parts.list.len().to_numpy().astype(np.int64)
    lines = parts.explode()
    ends = np.cumsum(counts)
    # splitlines() has no empty last line: "a\n" is ["a"], "" is [].
    last_empty = (lines.gather(ends - 1) == "").to_numpy() if len(ends) else np.zeros(0, bool)
    keep = np.ones(len(lines), dtype=bool)
    keep[(ends - 1)[last_empty]] = False
    counts = counts - last_empty
    lines = lines.filter(pl.Series(keep))
    row_of_line = np.repeat(np.arange(len(counts)), counts)
    line_pos = np.arange(len(lines)) - np.repeat(np.cumsum(counts) - counts, counts)
    return lines, row_of_line, line_pos


def _has_longer_word(lines, limit: int) -> np.ndarray:
    """For each line: does a word of ``str.split()`` have more than ``limit`` characters?"""
    import polars as pl

    could = lines.str.len_bytes().to_numpy() > limit  # a word of limit+1 characters has >= limit+1 bytes
    out = np.zeros(len(lines), dtype=bool)
    if could.any():
        longest = lines.filter(pl.Series(could)).str.extract_all(PY_WORD).list.eval(
            pl.element().str.len_chars().cast(pl.Int64)).list.max()  # null without words: any([]) is False
        out[np.flatnonzero(could)] = (longest > limit).fill_null(False).to_numpy()
    return out


def _join_kept(kept_lines, kept_per_row: np.ndarray, reasons: np.ndarray) -> pa.Array:
    """Each kept row's kept lines joined by ``\\n`` and stripped (datatrove's new text); null for dropped rows."""
    import polars as pl
    import pyarrow.compute as pc

    offsets = pa.array(np.concatenate([[0], np.cumsum(kept_per_row)]).astype(np.int64))
    nested = pa.LargeListArray.from_arrays(offsets, kept_lines.to_arrow().cast(pa.large_string()))
    joined = pl.Series(pl.from_arrow(nested)).list.join("\n").str.strip_chars(PY_WHITESPACE).to_arrow()
    return pc.if_else(pa.array(reasons == None), joined, pa.nulls(len(reasons), joined.type))  # noqa: E711


# --- sentence count: spaCy's sentencizer on spaCy's English tokens, by regular expressions -------------

#: spaCy's English tokenizer exceptions that contain a period (kept as one token, so never a sentence
#: end); ``tests/test_fast_c4.py`` checks this list against the installed spaCy.
SPACY_PERIOD_EXCEPTIONS = tuple(
    [f"{c}." for c in "abcdefghijklmnopqrstuvwxyzäöü"]
    + [f"{h}{m}" for h in range(1, 13) for m in ("a.m.", "p.m.")]
    + "a.m. p.m. e.g. E.g. E.G. i.e. I.e. I.E. v.s. vs. co. Ph.D. D.C. N.C. N.D. N.H. N.J. N.M. N.Y. S.C.".split()
    + [f"{w}." for w in (
        "Adm Ak Ala Apr Ariz Ark Aug Bros Calif Co Colo Conn Corp Dec Del Dr Feb Fla Ga Gen Gov Ia Id Ill Inc "
        "Ind Jan Jr Jul Jun Kan Kans Ky La Ltd Mar Mass Md Messrs Mich Minn Miss Mo Mont Mr Mrs Ms Mt Neb "
        "Nebr Nev Nov Oct Okla Ore Pa Prof Rep Rev Sen Sep Sept St Tenn Va Wash Wis").split()]
    + [f"°{c}." for c in "CFKcfk"]
    + "(._.) ._. 0.0 0.o o.0 o.O o.o O.O O.o V.V v.v <.< >.< >.>".split()
)
#: Characters spaCy strips from the front of a token before it looks up an exception (approximately).
_PREFIX = r"""\p{Ps}\p{Pe}\p{Pi}\p{Pf}"'`,:;!?¿¡_#*&§%=—–+…<>~·\p{Sc}"""
#: An exception that is a whole token (after prefixes, before suffix punctuation, or before a capital:
#: spaCy prefers the exception to its infix split) becomes one non-punctuation character: a token that
#: is no sentence end, and whose periods no regular expression below sees.
_EXCEPTION = (r"(^|\s)([" + _PREFIX + "]*)(?:"
              + "|".join(re.escape(e) for e in sorted(SPACY_PERIOD_EXCEPTIONS, key=len, reverse=True))
              + r")(\p{P}*(?:\s|$)|\p{Lu})")
#: spaCy's punctuation and quote characters after which its suffix rule splits a period off a word.
_SUFFIX_PUNCT = "…,:;!?¿؟¡()\\[\\]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉"
#: ``!``, ``?`` and the other ``punct_chars`` spaCy's tokenizer splits off a word.
_SPLIT_ENDS = "!?؟۔।。？！"
#: A token in spaCy's ``punct_chars`` (a sentence end) as spaCy's English tokenizer cuts it: a period
#: split off the end of a word after a lowercase or caseless letter, a digit, ``%²+-``, spaCy's
#: punctuation or two capitals, or standing alone; ``!``, ``?`` and their kin ending a word. A word
#: ends where only punctuation (spaCy's suffixes) is left before a space or the end of the line.
_END_TOKEN = "|".join((
    rf"(?:^|[\s\p{{Ll}}\p{{Lo}}0-9%²+\-{_SUFFIX_PUNCT}])\.",
    r"\p{Lu}\p{Lu}\.",
    f"[{_SPLIT_ENDS}]",
))
#: spaCy's sentencizer starts a sentence at the first token after a sentence end that is not
#: punctuation; whitespace other than one plain space is a token of its own. So a sentence end at the
#: end of a word starts a sentence unless only punctuation and single spaces follow it to the line's
#: end. A ``!`` or ``?`` at the front of a word (a prefix token) starts one at the rest of the word.
_SENTENCE_END = "|".join((
    rf"(?:{_END_TOKEN})\p{{P}}*(?:\s[\s\p{{P}}]*|$)",
    rf"(?:^|\s)[{_PREFIX}]*[{_SPLIT_ENDS}]\p{{P}}*[^\s\p{{P}}]",
))
_LAST_SENTENCE_END = rf"(?:{_END_TOKEN})\p{{P}}*(?: \p{{P}}+)* ?$"
#: A period between a lowercase (or caseless) letter or a quote and a capital or a quote: spaCy's
#: infix rule splits it off (``end.Next``) unless the word looks like a URL or host name.
_INFIX_CANDIDATE = r"[\p{Ll}\p{Lo}'\"`‘’“”]\.[\p{Lu}'\"`‘’“”]"
_QUOTES = "'\"`‘’“”"
#: A host name (dot-separated labels, the last of two or more lowercase letters), with an optional
#: scheme, port and path: spaCy's URL rule keeps such a word whole.
_URL_LIKE = re.compile(r"(?:[\w+.-]{2,}://)?(?:\S+@)?(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_A-Z]{2,63}"
                       r"(?::\d{2,5})?(?:[/?#]\S*)?")


def _split_infix_periods(line: str) -> str:
    """``line`` with a space on each side of every period spaCy splits off inside a word (see above)."""
    return _INFIX_WORD.sub(_split_word, line)


#: A word (run of non-space) with a candidate infix period, for Python's ``re``.
_INFIX_WORD = re.compile(r"\S*?(?:[^\W\d_]|[" + _QUOTES + r"])\.(?:[^\W\d_]|[" + _QUOTES + r"])\S*")


def _split_word(match: re.Match) -> str:
    word = match.group()
    start, end = 0, len(word)
    while start < end and (_is_punct(word[start]) or word[start] in "<>"):  # spaCy's prefixes, roughly
        start += 1
    while end > start and (_is_punct(word[end - 1]) or word[end - 1] in "<>"):  # and suffixes
        end -= 1
    core = word[start:end]
    if _URL_LIKE.fullmatch(core) and core.rsplit(".", 1)[-1][:2].islower():
        return word
    chars = list(core)
    for k in range(1, len(core) - 1):
        before, after = core[k - 1], core[k + 1]
        if core[k] == "." and (before.islower() or _caseless(before) or before in _QUOTES) and \
                (after.isupper() or after in _QUOTES):
            chars[k] = " . "
    return word[:start] + "".join(chars) + word[end:]


def _is_punct(char: str) -> bool:
    return unicodedata.category(char).startswith("P")


def _caseless(char: str) -> bool:
    return char.isalpha() and not char.islower() and not char.isupper()


def approx_sentence_counts(lines) -> np.ndarray:
    """The number of sentences spaCy's sentencizer finds in each line (a polars String Series), approximately.

    Models: spaCy's sentence starts (a non-punctuation token after a ``punct_chars`` token, with only
    punctuation between), which periods spaCy's English tokenizer splits into their own token (see
    ``_SENTENCE_END``), its exceptions (``Mr.``, ``e.g.``, single letters ``a.``), and ellipses (``..``
    or more is one token, not a sentence end). An empty line counts one sentence, as in datatrove.
    Periods inside a word (``end.Next``, ``email.message.Message``) are split as spaCy's infix rule
    does unless the word looks like a host name or URL; that check runs in Python on the few lines
    that have such a period. Does not model: spaCy's other exceptions (``id.`` is ``i`` + ``d.``),
    a suffix that is not punctuation after a sentence end (``<???>``: ``>`` is a symbol),
    rare ``punct_chars`` that spaCy does not split off a word, and languages other than English
    (the rules are those of spaCy's English tokenizer whatever ``language`` says).
    """
    if len(lines) == 0:
        return np.zeros(0, dtype=np.int64)
    text = lines.str.replace_all(r"\.\.+", "…")
    for _ in range(2):  # an exception's match takes the space after it: a second pass finds its neighbour
        text = text.str.replace_all(_EXCEPTION, "${1}${2}¤${3}")
    infix = text.str.contains(_INFIX_CANDIDATE).to_numpy()
    if infix.any():  # rare (dotted names): the URL test and the split are done in Python on these lines only
        at = np.flatnonzero(infix)
        text = text.scatter(at, [_split_infix_periods(line) for line in text.gather(at).to_list()])
    ends = text.str.count_matches(_SENTENCE_END).to_numpy().astype(np.int64)
    at_end = text.str.contains(_LAST_SENTENCE_END).to_numpy().astype(np.int64)
    return 1 + ends - at_end

"""Word splitting for the ``engine: fast`` quality rules, vectorized with polars regular expressions.

datatrove splits words with spaCy's blank English tokenizer, one document at a time in Python, and
drops the whitespace tokens. :func:`word_lists` follows the same procedure on a whole column at once:

1. the text is cut at whitespace (Python's ``str.isspace`` set) into *chunks* (:data:`CHUNK_PATTERN`);
2. each distinct chunk loses its leading and trailing punctuation one piece at a time, alternately
   from the front (:data:`PREFIX_PATTERN`) and the back (:data:`SUFFIX_PATTERN`), stopping at a known
   exception (contractions such as ``don't`` → ``do`` ``n't``, abbreviations such as ``e.g.``,
   emoticons; :data:`SPECIAL_CASES`), as spaCy does;
3. what remains is kept whole when it looks like a URL or an e-mail address, is split by its exception
   when it has one, or else is cut where spaCy cuts inside a word (:data:`INFIX_RULES`: ``a-b``,
   ``foo.Bar``, ``a,b``, ``a/b``, ``1+2``, ellipses and symbols).

Every step is a polars expression over the distinct chunks of a batch; nothing runs per document in
Python. The exception table is written here (it covers the common English contractions, abbreviations
and emoticons rather than spaCy's whole list) and the character classes use Unicode properties where
spaCy lists characters, so a few rare chunks split differently; ``docs/filters/quality.md`` gives the
measured agreement with datatrove's ``split_into_words``.

:data:`WORD_PATTERN` is a one-pass approximation (a single ``str.extract_all``) for callers that need
one expression; :func:`word_lists` is the splitter the fast rules use.
"""

from __future__ import annotations

import functools
import re

import pyarrow as pa

#: Whitespace as Python's ``str.isspace`` knows it (Unicode White_Space plus the separators \x1c-\x1f).
SPACE_CLASS = r"\s\x1c-\x1f"
#: A run of non-whitespace characters: spaCy tokenizes each one separately.
CHUNK_PATTERN = rf"[^{SPACE_CLASS}]+"

_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()\\[\\]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼₠-₿"
_HYPHENS = "-|–|—|--|---|——|~"
_UNITS = ("km|km²|km³|m|m²|m³|dm|dm²|dm³|cm|cm²|cm³|mm|mm²|mm³|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|oz|"
          "m/s|km/h|kmh|mph|hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%")

#: One leading piece spaCy splits off a chunk (group 1), tried at the chunk's start. A ``+`` counts only
#: when no digit follows (group 2 catches that case so it can be refused).
PREFIX_PATTERN = (rf"^(?:([§%=—–{_PUNCT}{_QUOTES}{_CURRENCY}\p{{So}}]|\.\.+|US\$|C\$|A\$|\+$)|(\+[0-9])|(\+))")
#: One trailing piece spaCy splits off (the first group that matched), tried at the chunk's end. The
#: groups after the first need a particular character before the piece (spaCy's look-behinds).
SUFFIX_PATTERN = (
    rf"(?:(\.\.+|'s|'S|’s|’S|[—–{_PUNCT}{_QUOTES}\p{{So}}])"
    rf"|[0-9](\+|[{_CURRENCY}]|US\$|C\$|A\$|{_UNITS})"
    rf"|°[FfCcKk](\.)"
    rf"|[0-9\p{{Ll}}%²\-+…|,:;!?¿؟¡()\[\]{{}}<>_#*&。？！，、；：～·।،۔؛٪{_QUOTES}](\.)"
    rf"|\p{{Lu}}\p{{Lu}}(\.))$"
)
#: Cuts inside what remains, as (pattern, replacement) rewrites that put a space at each cut; each is
#: applied twice because a match uses up the character a neighbouring match needs as context.
INFIX_RULES: tuple[tuple[str, str], ...] = (
    (r"(\.\.+|…|\p{So})", " $1 "),
    (r"([0-9])([+\-*^])([0-9\-])", "$1 $2 $3"),
    (rf"([\p{{Ll}}{_QUOTES}])(\.)([\p{{Lu}}{_QUOTES}])", "$1 $2 $3"),
    (r"(\p{L}),(\p{L})", "$1 , $2"),
    (rf"([\p{{L}}0-9])({_HYPHENS})(\p{{L}})", "$1 $2 $3"),
    (r"([\p{L}0-9])([:<>=/])(\p{L})", "$1 $2 $3"),
)
#: What spaCy keeps whole: a URL (optional scheme, optional user@, dotted host with a lowercase
#: top-level domain, optional port and path) or an e-mail address.
URL_PATTERN = (r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
               r"(?:(?:[A-Za-z0-9\x{a1}-\x{ffff}][A-Za-z0-9\x{a1}-\x{ffff}_-]{0,62})?[A-Za-z0-9\x{a1}-\x{ffff}]\.)+"
               r"\p{Ll}{2,63}(?::[0-9]{2,5})?(?:[/?#]\S*)?$")

#: A rough one-pass approximation (a single ``str.extract_all``: runs of letters, marks, digits and
#: underscores joined across inner ``'``, ``.`` and ``,``; an ellipsis; any other non-space character
#: alone). It miscounts about 10% of spaCy's words on real text; use :func:`word_lists` for the rules.
WORD_PATTERN = r"[\p{L}\p{M}\p{N}_]+(?:['’.,][\p{L}\p{M}\p{N}_]+)*|\.\.\.+|…|\S"



#: The characters datatrove counts as punctuation (``datatrove.utils.text.PUNCTUATION_SET``: ASCII
#: punctuation, control characters, common quotes and dashes, and every terminal punctuation mark), as
#: hexadecimal code-point ranges. A word made only of these is a "symbol word" for the Gopher rules.
PUNCTUATION_RANGES = (
    "0-8 B-1F 21-2F 3A-40 5B-60 7B-9F AB B4 BB 589 61D-61F 6D4 700-702 7F9 837 839 83D-83E 964-965 "
    "104A-104B 1362 1367-1368 166E 1735-1736 17D4-17D6 17D9-17DA 1803 1809 1944-1945 1AA8-1AAB 1B5A-1B5B "
    "1B5E-1B5F 1B7D-1B7E 1C3B-1C3C 1C7E-1C7F 2013-2014 2019 201C-201E 2026 203C-203D 2047-2049 2236 2501 "
    "25BA 2E2E 2E3C 2E53-2E54 3001-3002 3008-300D 3010-3011 A4FF A60E-A60F A6F3 A6F7 A876-A877 A8CE-A8CF "
    "A92F A9C8-A9C9 AA5D-AA5F AAF0-AAF1 ABEB FE52 FE56-FE57 FF01 FF05 FF08-FF09 FF0C FF0E FF11 FF1A-FF1B "
    "FF1F FF5E FF61 10A56-10A57 10F55-10F59 10F86-10F89 11047-11048 110BE-110C1 11141-11143 111C5-111C6 "
    "111CD 111DE-111DF 11238-11239 1123B-1123C 112A9 1144B-1144C 115C2-115C3 115C9-115D7 11641-11642 "
    "1173C-1173E 11944 11946 11A42-11A43 11A9B-11A9C 11C41-11C42 11EF7-11EF8 11F43-11F44 16A6E-16A6F "
    "16AF5 16B37-16B38 16B44 16E98 1BC9F 1DA88"
)
#: datatrove's ``TERMINAL_PUNCTUATION`` (sentence-ending marks of many scripts), the default
#: ``stop_chars`` of the FineWeb rules, as hexadecimal code-point ranges.
TERMINAL_PUNCTUATION_RANGES = (
    "21 2E 3F 589 61D-61F 6D4 700-702 7F9 837 839 83D-83E 964-965 104A-104B 1362 1367-1368 166E 1735-1736 "
    "17D4-17D6 17D9-17DA 1803 1809 1944-1945 1AA8-1AAB 1B5A-1B5B 1B5E-1B5F 1B7D-1B7E 1C3B-1C3C 1C7E-1C7F "
    "203C-203D 2047-2049 2E2E 2E3C 2E53-2E54 3002 A4FF A60E-A60F A6F3 A6F7 A876-A877 A8CE-A8CF A92F "
    "A9C8-A9C9 AA5D-AA5F AAF0-AAF1 ABEB FE52 FE56-FE57 FF01 FF0E FF1F FF61 10A56-10A57 10F55-10F59 "
    "10F86-10F89 11047-11048 110BE-110C1 11141-11143 111C5-111C6 111CD 111DE-111DF 11238-11239 "
    "1123B-1123C 112A9 1144B-1144C 115C2-115C3 115C9-115D7 11641-11642 1173C-1173E 11944 11946 "
    "11A42-11A43 11A9B-11A9C 11C41-11C42 11EF7-11EF8 11F43-11F44 16A6E-16A6F 16AF5 16B37-16B38 16B44 "
    "16E98 1BC9F 1DA88"
)


def code_points(ranges: str) -> list[str]:
    """The characters of a space-separated list of hexadecimal code points and ``A-B`` ranges."""
    out = []
    for item in ranges.split():
        first, _, last = item.partition("-")
        out += [chr(c) for c in range(int(first, 16), int(last or first, 16) + 1)]
    return out


def char_class(ranges: str) -> str:
    """The body of a regex character class (Rust syntax, without brackets) for such a list of ranges."""
    parts = []
    for item in ranges.split():
        first, _, last = item.partition("-")
        parts.append(f"\\x{{{first}}}" + (f"-\\x{{{last}}}" if last else ""))
    return "".join(parts)

def _contractions() -> dict[str, tuple[str, ...]]:
    """English contractions spaCy keeps as exceptions, generated: ``don't`` → do n't, ``I'm`` → I 'm …"""
    table: dict[str, tuple[str, ...]] = {}

    def add(parts: tuple[str, ...]) -> None:
        for case in (parts, (parts[0].title(),) + parts[1:]):
            for apostrophe in ("'", "’"):
                table["".join(case).replace("'", apostrophe)] = tuple(p.replace("'", apostrophe) for p in case)
            bare = tuple(p.replace("'", "") for p in case)
            if "".join(bare).lower() not in _NOT_BARE:
                table["".join(bare)] = bare

    for verb in ("do does did is are was were has have had could would should must might need dare ought may"
                 " ca wo sha ai").split():
        add((verb, "n't"))
    for word, endings in _PRONOUN_ENDINGS.items():
        for ending in endings.split():
            add((word, ending))
    for a, b in (("can", "not"), ("gon", "na"), ("got", "ta")):
        table[a + b], table[(a + b).title()] = (a, b), (a.title(), b)
    for hour in range(1, 13):
        for suffix in ("am", "pm", "a.m.", "p.m."):
            table[f"{hour}{suffix}"] = (str(hour), suffix)
    return table


_PRONOUN_ENDINGS = {"i": "'ll 've 'd 'm", "you": "'ll 're 've 'd", "he": "'ll 'd 's", "she": "'ll 'd 's",
                    "it": "'ll 'd 's", "we": "'ll 're 've 'd", "they": "'ll 're 've 'd", "that": "'ll 'd 's",
                    "this": "'ll 'd 's", "these": "'ll 're 've 'd", "those": "'ll 're 've 'd",
                    **{w: "'ll 're 've 'd 's" for w in ("who", "what", "where", "when", "why", "how", "there")}}
#: Apostrophe-less forms spaCy does not split because they are words of their own.
_NOT_BARE = {"ill", "well", "were", "shell", "hell", "shed", "its", "whore"}

#: Chunks that spaCy keeps whole although their punctuation would otherwise be split off.
_WHOLE = (
    [f"{c}." for c in "abcdefghijklmnopqrstuvwxyzäöü"]
    + "e.g. i.e. E.g. I.e. E.G. I.E. a.m. p.m. v.s. vs. co. Ph.D. D.C. N.Y. N.C. N.J. S.C.".split()
    + "Mr. Mrs. Ms. Dr. Prof. St. Jr. Mt. Rev. Rep. Sen. Gen. Gov. Adm. Messrs. Bros. Co. Corp. Inc. Ltd.".split()
    + "Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec.".split()
    + ":) :( ): (: :-) :-( ;) ;-) :D :P :p :/ :-/ :| :] [: :* :> :} :') :() =D".split()
    + ":0 :1 :3 :o :O :x :X <3 =) =( =/ =] =| 8) (= (;".split()
    + "C++ and/or w/o '' ’’ 's 'S ’s ’S 'd ’d 'll ’ll 're ’re 'em ’em 'cause \\n \\t ._. o.O O.o o.o -_- ^_^".split()
)


def _special_cases() -> dict[str, str]:
    """Chunk → its tokens joined by single spaces, for every exception spaCy makes."""
    table = {k: " ".join(v) for k, v in _contractions().items()}
    table.update({w: w for w in _WHOLE})
    return table


#: spaCy's exceptions as this module knows them: chunk → its tokens joined by spaces.
SPECIAL_CASES: dict[str, str] = _special_cases()


@functools.cache
def _merges() -> tuple[str, tuple[tuple[str, str], ...]]:
    """spaCy also finds its exceptions across tokens it has already split inside one chunk (``c.Emin``
    gives ``c.`` ``Emin``; ``foo():`` ends in the emoticon ``):``). Returns a pattern that finds any such
    token run in a chunk's space-joined tokens, and (run, exception) rewrites."""
    import polars as pl

    odd = [k for k, v in SPECIAL_CASES.items() if v == k and not re.fullmatch(r"\w+", k)]
    runs = split_chunks(pl.Series(odd, dtype=pl.String), specials={}).to_list()
    pairs = tuple((run, k) for run, k in zip(runs, odd, strict=True) if run != k)
    pattern = "(?:^| )(?:" + "|".join(re.escape(run) for run, _ in pairs) + ")(?: |$)"
    return pattern, pairs


def word_lists(texts: pa.Array):
    """A polars Series with the words of every text (a list of strings per row; nulls give empty lists)."""
    import polars as pl

    series = pl.from_arrow(texts).cast(pl.String).fill_null("")
    chunks = series.str.extract_all(CHUNK_PATTERN)
    frame = pl.DataFrame({"row": pl.int_range(len(series), eager=True, dtype=pl.UInt32), "chunk": chunks})
    frame = frame.explode("chunk").drop_nulls("chunk")
    distinct = frame.select(pl.col("chunk").unique())
    tokens = split_chunks(distinct.get_column("chunk"))
    mapping = distinct.with_columns(tokens.alias("tokens"))
    joined = frame.join(mapping, on="chunk", how="left", maintain_order="left")
    per_row = joined.group_by("row", maintain_order=True).agg(pl.col("tokens").str.join(" "))
    full = pl.DataFrame({"row": pl.int_range(len(series), eager=True, dtype=pl.UInt32)})
    text = full.join(per_row, on="row", how="left", maintain_order="left").get_column("tokens").fill_null("")
    return text.str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias("words")


def split_chunks(chunks, specials: dict[str, str] | None = None):
    """The tokens of every chunk (a polars String Series without whitespace), joined by single spaces.

    ``specials`` replaces :data:`SPECIAL_CASES` (an empty table also skips the merging of exceptions).
    """
    import polars as pl

    table = SPECIAL_CASES if specials is None else specials
    keys = pl.Series(list(table), dtype=pl.String).implode()
    frame = pl.DataFrame({"core": chunks}).with_row_index("index").with_columns(pre=pl.lit(""), suf=pl.lit(""))
    plain = pl.col("core").str.contains(r"^(?:\p{L}+|[0-9]+)$") & ~pl.col("core").is_in(keys)
    frame = frame.with_columns(plain=plain)
    words = frame.filter(pl.col("plain")).select("index", joined=pl.col("core"))  # nothing to split
    frame = frame.filter(~pl.col("plain")).drop("plain")
    frame = frame.with_columns(active=~pl.col("core").is_in(keys) & (pl.col("core") != ""))
    settled = [frame.filter(~pl.col("active"))]
    frame = frame.filter(pl.col("active"))
    while frame.height:  # each turn strips one prefix and/or suffix; settled chunks leave the loop
        frame = _strip_once(frame, keys)
        settled.append(frame.filter(~pl.col("active")))
        frame = frame.filter(pl.col("active"))
    frame = pl.concat(settled)
    core = pl.col("core")
    frame = frame.with_columns(
        special=core.replace_strict(list(table), list(table.values()), default=None, return_dtype=pl.String),
        url=core.str.contains(URL_PATTERN))
    split = core
    for pattern, replacement in INFIX_RULES:
        split = split.str.replace_all(pattern, replacement).str.replace_all(pattern, replacement)
    frame = frame.with_columns(split=pl.when(pl.col("special").is_null() & ~pl.col("url")).then(split))
    inner = pl.coalesce("special", "split", "core")
    frame = frame.select("index", joined=pl.concat_str([pl.col("pre"), inner, pl.col("suf")], separator=" "))
    frame = frame.with_columns(pl.col("joined").str.replace_all(" +", " ").str.strip_chars(" "))
    if table:
        pattern, pairs = _merges()
        frame = frame.with_columns(merge=pl.col("joined").str.contains(pattern))
        if frame.get_column("merge").any():
            joined = pl.col("joined")
            for run, special in pairs:
                joined = joined.str.replace_all(rf"(^| ){re.escape(run)}( |$)", f"${{1}}{special}${{2}}", literal=False)
            frame = pl.concat([frame.filter(~pl.col("merge")), frame.filter(pl.col("merge")).with_columns(joined)])
    return pl.concat([words, frame.select("index", "joined")]).sort("index").get_column("joined")


def _strip_once(frame, keys):
    """One turn of spaCy's affix loop on active chunks: split off a prefix and/or a suffix, or settle."""
    import polars as pl

    core = pl.col("core")
    groups = core.str.extract_groups(PREFIX_PATTERN)
    frame = frame.with_columns(p=groups.struct.field("1").fill_null(groups.struct.field("3")),
                               n=core.str.len_chars())
    frame = frame.with_columns(plen=pl.col("p").str.len_chars().fill_null(0))
    frame = frame.with_columns(minus_pre=core.str.slice(pl.col("plen")))
    sgroups = pl.col("minus_pre").str.extract_groups(SUFFIX_PATTERN)
    frame = frame.with_columns(s=pl.coalesce([sgroups.struct.field(str(i)) for i in range(1, 6)]))
    frame = frame.with_columns(slen=pl.col("s").str.len_chars().fill_null(0))
    plen, slen, n = pl.col("plen"), pl.col("slen"), pl.col("n")
    frame = frame.with_columns(minus_suf=core.str.slice(0, n - slen))
    frame = frame.with_columns(
        pre_stop=(plen > 0) & (pl.col("minus_pre") != "") & pl.col("minus_pre").is_in(keys))
    frame = frame.with_columns(
        suf_stop=~pl.col("pre_stop") & (slen > 0) & (pl.col("minus_suf") != "") & pl.col("minus_suf").is_in(keys))
    pre_stop, suf_stop = pl.col("pre_stop"), pl.col("suf_stop")
    frame = frame.with_columns(both=~pre_stop & ~suf_stop & (plen > 0) & (slen > 0) & (plen + slen <= n))
    both = pl.col("both")
    frame = frame.with_columns(take_pre=pre_stop | (~suf_stop & (plen > 0)),
                               take_suf=suf_stop | both | (~pre_stop & ~suf_stop & (plen == 0) & (slen > 0)))
    take_pre, take_suf = pl.col("take_pre"), pl.col("take_suf")
    frame = frame.with_columns(
        core=pl.when(both).then(core.str.slice(plen, n - plen - slen))
        .when(take_pre).then(pl.col("minus_pre"))
        .when(take_suf).then(pl.col("minus_suf"))
        .otherwise(core),
        pre=pl.when(take_pre).then(pl.concat_str([pl.col("pre"), pl.col("p")], separator=" ")).otherwise(pl.col("pre")),
        suf=pl.when(take_suf).then(pl.concat_str([pl.col("s"), pl.col("suf")], separator=" ")).otherwise(pl.col("suf")),
        active=(take_pre | take_suf) & ~pre_stop & ~suf_stop,
    )
    frame = frame.with_columns(active=pl.col("active") & (core != "") & ~core.is_in(keys))
    return frame.select("index", "core", "pre", "suf", "active")

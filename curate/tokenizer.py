"""The tokenizer layer: one Hugging Face tokenizer per run, with the special tokens recipes need.

The manifest's ``tokenizer:`` names a tokenizer folder or Hub name (``path``), or asks for a small
byte-level BPE to be trained on the source at run time (``train``; what the offline quickstart uses).
Before the first phase the driver resolves it once into ``RUN/tokenizer/``:

- ``tokenizer.json`` — the exact tokenizer the corpus was made with, canonically serialized;
- ``specials.json`` — the id of every special token the stages asked for (UtK knots, ``<D>`` …), keyed
  by the name the stage uses (``ids``), and the string that id has in ``tokenizer.json`` (``strings``).
  A stage's marker never shares an id with anything the tokenizer already uses: not with its own
  specials (BOS/EOS/PAD/UNK…: ``<s>`` is Llama's BOS and also UtK's backtrace separator), not with
  an ordinary vocabulary piece (text would encode to it). A colliding name gets a free reserved token
  of the tokenizer, else a new token spelled ``<|curate_NAME|>``; only an existing *non-role* special
  token with the very same string (a tokenizer a previous run already extended) is reused as it is;
- ``vocab_sha256`` — a digest of the vocabulary and merges, recorded in ``stats.json``.

Workers load that folder (``ctx.tokenizer``). Encoding is the Rust ``encode_batch`` (all cores).
Very long documents are cut into pieces before encoding so one document does not hold one core while
the others wait; a cut is only made where encoding the two sides separately gives the same ids as
encoding them together (checked on a window around the cut), so the ids equal whole-document ids.

SentencePiece-style BPE tokenizers (Llama 2, Mistral, … as Hugging Face converts them) encode a whole
text as one word, and their merge loop slows as the word grows. Where the tokenizer provably allows
it (:func:`free_cuts`), every text is cut into pieces of about :data:`PIECE_CHARS` characters before
a space, with no check needed: the same ids, ~13% less encoder CPU on documents of up to 30K characters.
The same property lets the ``tokenize`` stage cut at *every* such space and encode each distinct word
once (:meth:`CurateTokenizer.encode_column`, :mod:`curate.word_memo`): natural text repeats its words,
so most of the encoder's work is never done twice.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from pydantic import Field, model_validator

from curate.errors import ConfigError
from curate.stage import StageParams

#: Reserved-token spellings of common tokenizers, reused for new special tokens before growing the vocab.
#: Each starts with ``<`` or ``[``: the vocabulary scan tests that first character before the expression.
RESERVED_PATTERNS = (
    r"<\|reserved_special_token_\d+\|>",  # Llama 3
    r"<\|extra_\d+\|>",  # Qwen
    r"\[unused\d+\]",  # BERT
    r"<extra_id_\d+>",  # T5
    r"<SPECIAL_\d+>",  # Mistral Tekken
)
_RESERVED = re.compile("|".join(f"(?:{p})" for p in RESERVED_PATTERNS))
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
#: Spellings tokenizers use for their own roles (BOS/EOS/PAD/UNK/CLS/SEP/MASK, chat turns): never a marker's id.
ROLE_SPELLINGS = EOS_CANDIDATES + (
    "<s>", "<unk>", "<pad>", "<mask>", "<bos>", "<|startoftext|>", "<|begin_of_text|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<|padding|>", "<|pad|>", "<|unk|>", "[CLS]", "[PAD]", "[UNK]", "[MASK]",
    "[BOS]", "[EOS]",
)
#: Role keys of ``tokenizer_config.json`` / ``special_tokens_map.json``.
ROLE_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TrainSpec(StageParams):
    vocab_size: int = Field(8192, ge=300, description="vocabulary size of the BPE trained on the source")
    min_frequency: int = Field(2, ge=1, description="merges seen fewer times are not learned")
    max_docs: int = Field(200_000, gt=0, description="train on at most this many source documents")


class TokenizerSpec(StageParams):
    """The manifest's ``tokenizer:`` section."""

    path: str | None = Field(None, description="tokenizer folder (tokenizer.json, or anything AutoTokenizer loads) or Hub name")
    train: TrainSpec | None = Field(None, description="train a byte-level BPE on the source instead")
    special_tokens: dict[str, str] = Field(default_factory=dict, description="spell special tokens differently: name → string")
    reuse_reserved: bool = Field(True, description="map new special tokens onto the tokenizer's unused reserved tokens")
    split_chars: int = Field(100_000, ge=1000, description="cut documents longer than this before encoding")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSpec:
        if (self.path is None) == (self.train is None):
            raise ValueError("give either `path` or `train`")
        return self


def _cut_loop(text: str, longer_than: int, cut_after) -> list[str]:
    """``text`` cut while what is left is longer than ``longer_than``: ``cut_after(start)`` gives the next
    cut after ``start`` (None: no more cuts)."""
    pieces, start = [], 0
    while len(text) - start > longer_than:
        cut = cut_after(start)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


#: How far a verified cut's window may reach out of a run (then the candidate, and the search, stop).
RUN_REACH = 2048


def _pattern_start(text: str, i: int, floor: int) -> int | None:
    """``i`` moved back (not below ``floor``) out of a run of one character or a two-character pattern;
    None when the run goes on for more than :data:`RUN_REACH` characters."""
    stop = i - RUN_REACH
    while i > floor and (text[i - 1] == text[i] or (i + 1 < len(text) and text[i - 1] == text[i + 1])):
        if i <= stop:
            return None
        i -= 1
    return i


def _pattern_end(text: str, j: int) -> int | None:
    """``j`` moved forward out of such a run; None when it goes on for more than :data:`RUN_REACH`."""
    stop = j + RUN_REACH
    while 2 <= j < len(text) and (text[j] == text[j - 1] or text[j] == text[j - 2]):
        if j >= stop:
            return None
        j += 1
    return j


def _start_of(match: re.Match | None) -> int | None:
    return None if match is None else match.start()


#: Characters per piece when the tokenizer allows free cuts (measured on the Mistral tokenizer: pieces of
#: 300 characters cost more encoder CPU than whole documents, 1,000 the least, 4,000 about as much as whole).
PIECE_CHARS = 1000


def free_cuts(tk) -> re.Pattern | None:
    """A pattern matching the spaces before which any text can be cut with its ids unchanged, or None.

    Holds for a BPE model (no dropout, no word prefix or suffix, merges not skipped) that sees the whole
    text, spaces turned into the metaspace ``▁``, as one BPE word — a Metaspace pre-tokenizer that does
    not split (``split: false``) and no normalizer, or (:func:`drops_cut_space`) the older conversion's
    normalizer ``Prepend("▁")`` then ``Replace(" ", "▁")`` and no pre-tokenizer — when no vocabulary
    token has the metaspace right after another character, the metaspace itself is a token, and no added
    token holds a space or the metaspace or takes the spaces around it. Cut before a space that follows a
    character other than a space or ``▁``: no token can span the cut, so no merge joins its sides, and
    BPE (which merges by rank, each merge local) gives the whole text the ids of the two sides, one after
    the other. With Metaspace the side after the cut starts with ``▁``, so no prefix is added to it, as
    in the whole text; with the ``Prepend`` normalizer that side is encoded without its first space,
    which the normalizer puts back as the ``▁`` it adds (see :func:`drops_cut_space`).
    """
    form = _one_word_form(tk)
    return None if form is None else re.compile(f"(?<=[^ {re.escape(form[0])}]) ")


def drops_cut_space(tk) -> bool:
    """True for the ``Prepend``/``Replace`` normalizer form of :func:`free_cuts` (Llama 2's published
    ``tokenizer.json``): each side after a cut is encoded without the space the cut is before, since the
    normalizer adds its ``▁`` to every non-empty text. Holds only while special tokens are encoded as
    text (as :class:`CurateTokenizer` does) and the tokenizer has no non-special added token: an added
    token splits the text, and the normalizer would prefix each part."""
    form = _one_word_form(tk)
    return form is not None and form[1]


def _one_word_form(tk) -> tuple[str, bool] | None:
    """``(metaspace, drops_cut_space)`` for a tokenizer that allows free cuts, else None."""
    from tokenizers import models, pre_tokenizers

    pre, norm = tk.pre_tokenizer, tk.normalizer
    if norm is None and isinstance(pre, pre_tokenizers.Metaspace) and not pre.split:
        meta, drops = pre.replacement, False
    elif pre is None and norm is not None:
        state = orjson.loads(norm.__getstate__())
        parts = state.get("normalizers") if state.get("type") == "Sequence" else None
        if not (isinstance(parts, list) and len(parts) == 2 and parts[0].get("type") == "Prepend"
                and parts[1] == {"type": "Replace", "pattern": {"String": " "}, "content": parts[0].get("prepend")}):
            return None
        meta, drops = parts[0]["prepend"], True
        as_text = getattr(tk, "encode_special_tokens", False)
        if not isinstance(meta, str) or len(meta) != 1 or meta == " " or not as_text:
            return None
    else:
        return None
    model = tk.model
    if not isinstance(model, models.BPE) or model.dropout or model.continuing_subword_prefix \
            or model.end_of_word_suffix or getattr(model, "ignore_merges", False):
        return None
    vocab = tk.get_vocab(with_added_tokens=False)
    if meta not in vocab or any(meta in t.lstrip(meta) for t in vocab):
        return None
    for added in tk.get_added_tokens_decoder().values():
        if " " in added.content or meta in added.content or added.lstrip or added.rstrip or added.single_word:
            return None
        if drops and not added.special:
            return None
    return meta, drops


class CurateTokenizer:
    """A loaded run tokenizer: ``encode_batch``, ``decode``, special ids, and the vocab digest."""

    def __init__(self, tokenizer, specials: dict[str, int], split_chars: int = 100_000):
        self.tk = tokenizer  # a tokenizers.Tokenizer
        # Document text never turns into special ids: a literal "<s>" or "<|endoftext|>" in the data
        # is encoded as ordinary text, so only stages insert special tokens.
        self.tk.encode_special_tokens = True
        # Documents are encoded whole, or in pieces whose ids are concatenated: a padding or truncation
        # setting saved in tokenizer.json would pad or cut each piece (and change the ids). Off.
        self.tk.no_padding()
        self.tk.no_truncation()
        self.specials = specials  # string -> id
        self.split_chars = split_chars
        self._names = {i: s for s, i in specials.items()}
        self._free_cut = free_cuts(tokenizer)
        self._drop_cut_space = self._free_cut is not None and drops_cut_space(tokenizer)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_run(cls, folder: str | os.PathLike) -> CurateTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        meta = orjson.loads((folder / "specials.json").read_bytes())
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), meta["ids"], meta["split_chars"])

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def special_id(self, token: str) -> int:
        try:
            return self.specials[token]
        except KeyError:
            raise KeyError(f"special token {token!r} was not prepared for this run") from None

    @cached_property
    def eos_id(self) -> int | None:
        for cand in EOS_CANDIDATES:
            i = self.tk.token_to_id(cand)
            if i is not None:
                return i
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as Python lists (for short texts; see :meth:`encode_arrays`)."""
        if texts and sum(map(len, texts)) <= 500_000:  # one group, nothing to cut: no arrays in between
            return [enc.ids for enc in self._encode(list(texts))]
        return [a.tolist() for a in self.encode_arrays(texts)]

    @cached_property
    def word_memo(self):
        """A :class:`curate.word_memo.WordMemo` when the tokenizer allows free cuts, else None."""
        form = _one_word_form(self.tk) if self._free_cut is not None else None
        if form is None:
            return None
        from curate.word_memo import WordMemo

        return WordMemo(self, *form)

    def encode_column(self, texts: pa.Array | pa.ChunkedArray, eos: int | None = None) -> pa.ListArray:
        """Token ids of an Arrow string column as a ``list<int32>`` array, ``eos`` (if given) ending each.

        Where the tokenizer allows free cuts, texts are encoded by distinct words (:mod:`curate.word_memo`,
        the same ids for a fraction of the encoder's work); otherwise through :meth:`encode_arrays`.
        """
        from curate.arrays import int_lists, numeric

        if self.word_memo is None or texts.null_count or len(texts) == 0:
            ids = self.encode_arrays(texts.to_pylist())
            if eos is not None:
                ids = [np.append(row, np.int32(eos)) for row in ids]
            return int_lists(ids, np.int32)
        offsets, values = self.word_memo.encode(texts)
        if eos is not None:
            values = np.insert(values, offsets[1:], np.int32(eos))
            offsets = offsets + np.arange(len(offsets))
        if offsets[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"a batch of {offsets[-1]:,} tokens does not fit a list<int32> column: read smaller "
                             "batches (source.batch_bytes)")
        return pa.ListArray.from_arrays(numeric(offsets.astype(np.int32)), numeric(values.astype(np.int32, copy=False)))

    def encode_arrays(self, texts: Sequence[str], group_chars: int = 500_000) -> list[np.ndarray]:
        """Token ids (int32 arrays) of each text, no special tokens added.

        Long texts are cut into pieces (:meth:`split`); pieces are encoded in parallel
        (``encode_batch``) in groups of about ``group_chars`` characters, so memory stays bounded
        and one huge document keeps every core busy instead of one.
        """
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            cut = self.split(text)
            pieces += cut
            owners += [i] * len(cut)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        start = 0
        while start < len(pieces):
            stop, size = start, 0
            while stop < len(pieces) and (stop == start or size + len(pieces[stop]) <= group_chars):
                size += len(pieces[stop])
                stop += 1
            for owner, enc in zip(owners[start:stop], self._encode(pieces[start:stop]), strict=True):
                parts[owner].append(np.array(enc.ids, dtype=np.int32))
            start = stop
        return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.zeros(0, np.int32) for p in parts]

    def _encode(self, pieces: list[str]):
        if sum(map(len, pieces)) < 4096:  # a few short strings: a thread-pool round trip costs more
            return [self.tk.encode(p, add_special_tokens=False) for p in pieces]
        if hasattr(self.tk, "encode_batch_fast"):
            return self.tk.encode_batch_fast(pieces, add_special_tokens=False)
        return self.tk.encode_batch(pieces, add_special_tokens=False)

    def split(self, text: str) -> list[str]:
        """Cut ``text`` into pieces whose ids, one after the other, are the whole text's ids.

        With :func:`free_cuts`, pieces of about :data:`PIECE_CHARS` (a piece left longer than
        ``split_chars``, having no space to cut at, is cut at verified points); otherwise pieces of about
        ``split_chars`` at points verified on a window around each (:meth:`_safe_cut`). For the
        :func:`drops_cut_space` form the pieces after the first lack the space their cut was before.
        """
        if self._free_cut is None:
            return self._verified_pieces(text)
        free = self._free_cut.search
        pieces = _cut_loop(text, 2 * PIECE_CHARS,
                           lambda start: _start_of(free(text, start + PIECE_CHARS, len(text) - PIECE_CHARS)))
        if self._drop_cut_space:
            pieces[1:] = [p[1:] for p in pieces[1:]]
        if all(len(p) <= self.split_chars for p in pieces):
            return pieces
        return [q for p in pieces for q in self._verified_pieces(p)]

    def _verified_pieces(self, text: str) -> list[str]:
        if self._drop_cut_space:  # each side would get the normalizer's prefix: no verified cut can hold
            return [text]
        return _cut_loop(text, self.split_chars, lambda start: self._safe_cut(text, start + self.split_chars, start))

    def _safe_cut(self, text: str, near: int, floor: int, window: int = 512) -> int | None:
        """A position near ``near`` where left and right encode as the whole does (window-checked).

        A window never starts or ends inside a run of one character or of a two-character pattern: BPE
        pairs such a run from its start, so windows cut into one can agree where the whole text does not
        (a run of spaces one longer pairs differently). A run reaching further than :data:`RUN_REACH`
        past a window's edge ends the search with no cut (the next candidates would sit in the same run:
        checking each would cost quadratic time), and the rest of the text stays one piece.
        """
        limit = min(len(text), near + self.split_chars // 2)
        for match in re.finditer(r"\n+(?=\S)|\s(?=\S)", text[near:limit]):
            cut = near + match.end() if text[near + match.start()] == "\n" else near + match.start()
            if cut <= floor:
                continue
            start = _pattern_start(text, max(floor, cut - window), floor)
            end = _pattern_end(text, min(len(text), cut + window))
            if start is None or end is None:
                return None
            left, right = text[start:cut], text[cut:end]
            whole = self.tk.encode(left + right, add_special_tokens=False).ids
            parts = (self.tk.encode(left, add_special_tokens=False).ids
                     + self.tk.encode(right, add_special_tokens=False).ids)
            if whole == parts:
                return cut
        return None

    def decode(self, ids: Iterable[int], *, show_special: bool = True) -> str:
        """Text of ``ids``; prepared special tokens are shown by their curate names."""
        out, run = [], []
        for i in ids:
            if i in self._names:
                if run:
                    out.append(self.tk.decode(run, skip_special_tokens=False))
                    run = []
                if show_special:
                    out.append(self._names[i])
            else:
                run.append(i)
        if run:
            out.append(self.tk.decode(run, skip_special_tokens=False))
        return "".join(out)


# ---------------------------------------------------------------------- preparation (driver side)
def prepare(spec: TokenizerSpec, folder: Path, wanted: list[str], training_texts) -> dict[str, Any]:
    """Resolve the run tokenizer into ``folder`` once; returns the metadata written there.

    ``wanted`` are the special-token names the stages asked for. The metadata maps each name to its id
    (``ids``) and to its string in the written ``tokenizer.json`` (``strings``); every id is distinct
    and none is an id the tokenizer already uses for a role or for text (see :func:`_assign_specials`).
    """
    meta_path = folder / "specials.json"
    if meta_path.exists():
        return orjson.loads(meta_path.read_bytes())
    tk = train_bpe(spec.train, training_texts()) if spec.train else load_base(spec.path)
    roles = role_tokens(tk, spec.path)
    ids, strings = _assign_specials(tk, {w: spec.special_tokens.get(w, w) for w in wanted}, spec.reuse_reserved,
                                    roles, renamed=set(spec.special_tokens))
    folder.mkdir(parents=True, exist_ok=True)
    canonical = canonical_json(tk)  # serialized once: written, and hashed for the vocab digest
    from curate.rundir import AtomicFile

    f = AtomicFile(folder / "tokenizer.json")
    f.write(canonical)
    f.commit()
    meta = {"ids": ids, "strings": strings, "split_chars": spec.split_chars,
            "vocab_size": tk.get_vocab_size(with_added_tokens=True),
            "vocab_sha256": hashlib.sha256(canonical).hexdigest()}
    f = AtomicFile(meta_path)
    f.write(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    f.commit()
    return meta


def load_base(path: str):
    """A ``tokenizers.Tokenizer`` from a folder/file with tokenizer.json, else via AutoTokenizer."""
    from tokenizers import Tokenizer

    p = Path(os.path.expanduser(path))
    if p.is_file() and p.suffix == ".json":
        return Tokenizer.from_file(str(p))
    if (p / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(p / "tokenizer.json"))
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"tokenizer.path: {path} has no tokenizer.json; loading it needs transformers: "
                          "pip install 'curate-longctx[text]'") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(p) if p.exists() else path, use_fast=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer.path: cannot load {path!r}: {e}") from None
    if not getattr(hf, "is_fast", False):
        raise ConfigError(f"tokenizer.path: {path!r} has no fast (Rust) tokenizer; convert it first")
    return hf.backend_tokenizer


def train_bpe(spec: TrainSpec, texts: Iterable[str]):
    """A byte-level BPE trained on ``texts`` (deterministic for the same texts and settings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                  special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return tk


def role_tokens(tk, path: str | None = None) -> set[str]:
    """Strings ``tk`` uses for its own roles (BOS/EOS/PAD/UNK/CLS/SEP/MASK …), as far as can be told.

    From the model's ``unk_token``, the post-processor's special tokens, the role keys of a
    ``tokenizer_config.json`` / ``special_tokens_map.json`` beside ``path`` (a local folder or file), and
    the usual spellings (:data:`ROLE_SPELLINGS`) present in the vocabulary.
    """
    vocab = tk.get_vocab(with_added_tokens=True)
    roles = {t for t in ROLE_SPELLINGS if t in vocab}
    unk = getattr(tk.model, "unk_token", None)  # BPE, WordPiece, WordLevel
    if isinstance(unk, str):
        roles.add(unk)
    if type(tk.model).__name__ == "Unigram":  # its unknown token is known by id, in the serialized model only
        model = orjson.loads(tk.model.__getstate__())
        if model.get("unk_id") is not None and model.get("vocab"):
            roles.add(model["vocab"][model["unk_id"]][0])
    # only the post-processor is parsed: serializing the whole tokenizer costs ~0.1 s per 30K tokens
    stack = [orjson.loads(tk.post_processor.__getstate__()) if tk.post_processor is not None else None]
    while stack:
        proc = stack.pop()
        if not isinstance(proc, dict):
            continue
        stack += proc.get("processors") or []
        roles.update((proc.get("special_tokens") or {}).keys())
        roles.update(proc[k][0] for k in ("sep", "cls") if isinstance(proc.get(k), list) and proc[k])
    if path:
        p = Path(os.path.expanduser(path))
        folder = p.parent if p.is_file() else p
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            try:
                config = orjson.loads((folder / name).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            for key in ROLE_KEYS:
                value = config.get(key) if isinstance(config, dict) else None
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    roles.add(value)
    return roles


def _fresh_strings(name: str):
    """Candidate strings for a special token whose own name collides: ``<|curate_NAME|>``, then ``…_2|>`` …"""
    core = re.sub(r"[^A-Za-z0-9]+", "_", name.replace("/", "end_")).strip("_") or "special"
    yield f"<|curate_{core}|>"
    k = 2
    while True:
        yield f"<|curate_{core}_{k}|>"
        k += 1


def _assign_specials(tk, wanted: dict[str, str], reuse_reserved: bool, roles: set[str] = frozenset(),
                     renamed: set[str] = frozenset()) -> tuple[dict[str, int], dict[str, str]]:
    """Ids and strings for the special tokens ``wanted`` (name → string); new ones are added to ``tk``.

    Contract: every returned id is distinct, and no id is one the tokenizer already uses for a role
    (``roles``) or for ordinary text. A string already in the tokenizer keeps its id only when it is an
    added *special* token that is not a role (a tokenizer an earlier run extended). Otherwise the name
    collides and takes, in this order: an existing non-role special ``<|curate_NAME|>`` (an earlier run's
    answer to the same collision), a free reserved token (with ``reuse_reserved``), or a new token
    spelled ``<|curate_NAME|>`` (or its own string when that did not collide). A string chosen in the
    manifest (``renamed``) that collides is a :class:`ConfigError` rather than silently respelled.
    """
    from tokenizers import AddedToken

    seen: dict[str, str] = {}
    for name, string in wanted.items():
        if string in seen:
            raise ConfigError(f"tokenizer.special_tokens: {string!r} is given to more than one special token "
                              f"({seen[string]!r} and {name!r})")
        seen[string] = name
    vocab = tk.get_vocab(with_added_tokens=True)
    special = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}

    def reusable(string: str) -> bool:
        return string in special and string not in roles and vocab[string] not in taken

    ids: dict[str, int] = {}
    strings: dict[str, str] = {}
    taken: set[int] = set()
    for name, string in wanted.items():  # pass 1: strings the tokenizer already has as our kind of token
        if string in vocab and reusable(string):
            ids[name], strings[name] = vocab[string], string
            taken.add(vocab[string])
        elif string in vocab and name in renamed:
            raise ConfigError(f"tokenizer.special_tokens: {name!r} → {string!r} is already used by the tokenizer "
                              "(a role such as BOS/EOS/PAD/UNK, ordinary text, or another special token); "
                              "choose a string it does not have")
    is_reserved = _RESERVED.fullmatch
    reserved = sorted(i for t, i in vocab.items() if t[:1] in "<[" and i not in taken and is_reserved(t))
    pending: dict[str, str] = {}  # name → string to add
    for name, string in wanted.items():  # pass 2: everything that needs an id of its own
        if name in ids:
            continue
        if string in vocab or string in pending.values():
            string = None
            for candidate in _fresh_strings(name):  # ends: the vocabulary is finite
                if candidate in vocab and reusable(candidate):
                    ids[name], strings[name] = vocab[candidate], candidate
                    taken.add(vocab[candidate])
                    break
                if candidate not in vocab and candidate not in pending.values():
                    string = candidate
                    break
            if string is None:
                continue
        if reuse_reserved and reserved:
            ids[name] = reserved.pop(0)
            strings[name] = tk.id_to_token(ids[name])
            taken.add(ids[name])
        else:
            pending[name] = string
    if pending:
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in pending.values()])
        for name, string in pending.items():
            ids[name], strings[name] = tk.token_to_id(string), string
    role_ids = {vocab[r] for r in roles if r in vocab}
    if len(set(ids.values())) != len(ids) or role_ids & set(ids.values()):  # the contract, checked
        raise AssertionError(f"special token ids collide: {ids}")
    return {n: ids[n] for n in wanted}, {n: strings[n] for n in wanted}


def canonical_json(tk) -> bytes:
    """The tokenizer's JSON with sorted keys: the same bytes for the same vocabulary, merges and pipeline."""
    return orjson.dumps(orjson.loads(tk.to_str()), option=orjson.OPT_SORT_KEYS)


def vocab_digest(tk) -> str:
    """sha256 of the canonical tokenizer JSON (vocabulary, merges, added tokens, pipeline)."""
    return hashlib.sha256(canonical_json(tk)).hexdigest()


def file_digest(path: str) -> str | None:
    """sha256 of a local tokenizer's files (for the fingerprint); None for a Hub name."""
    p = Path(os.path.expanduser(path))
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.is_file()) if p.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()

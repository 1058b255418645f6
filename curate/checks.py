"""Validation helpers the planner runs before any work: column paths, models and the run tokenizer.

Everything here answers one question about a manifest without running a stage, and answers it with a
message the planner attaches to the manifest line (``manifest.error(loc, message)``):

- **Column parameters** (:func:`column_params`, :func:`check_column`): ``select``'s ``where[].column`` and
  ``top.column``, every ``text_column``/``*_column``, ``mix``'s ``by`` and a sink's ``partition_by`` must
  name a column that reaches that point of the pipeline (:class:`Reach`); a ``scores.<label>.<metric>``
  path must name the label of an earlier scoring stage and, where that stage declares
  :meth:`~curate.stage.Stage.score_names`, one of its metrics. A close match is suggested.
- **Models** (:func:`check_model_ref`): a reference is an existing local path, or a Hugging Face Hub name
  that can be fetched (the Hub answers within :data:`HUB_TIMEOUT` seconds) or is already in the local
  Hugging Face cache. Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) a name that is not cached is
  an error now, instead of minutes of retries in every shard later.
- **The run tokenizer** (:func:`check_tokenizer`): a ``tokenizer: {path: …}`` is loaded once, through the
  public functions of :mod:`curate.tokenizer`, and must have what the stages need (an end-of-text token
  for ``append_eos``). A tokenizer trained at run time (``train:``) is not checked.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from curate.errors import ConfigError

#: A model reference that must be a local path (never looked up on the Hub).
LOCAL = "local:"
#: Seconds the Hub has to answer the reachability probe (made at most once per process).
HUB_TIMEOUT = 3.0
#: Suffixes of model and tokenizer files: a reference ending so is a path, never a Hub name.
FILE_SUFFIXES = (".json", ".bin", ".model", ".arpa", ".klm", ".gz", ".pt", ".pth", ".safetensors", ".ftz",
                 ".onnx", ".ckpt", ".vocab")
_HUB_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE = ("1", "on", "yes", "true")

#: Column parameters read otherwise than as a column path that must reach the stage, by (stage, field):
#: ``meta_key`` — a column, else a key of each row's JSON ``meta`` (only ``meta`` can be checked);
#: ``meta_path`` — a column, or ``meta.<key>`` from the JSON ``meta``.
COLUMN_MODES: dict[tuple[str, str], str] = {
    ("homologous_gap", "context_column"): "meta_key",
    ("homologous_gap", "instruction_column"): "meta_key",
    ("homologous_gap", "response_column"): "meta_key",
    ("mix", "by"): "meta_path",
}
#: Sources whose rows never carry a ``scores`` column; Parquet and Arrow files are looked at; any other
#: source (a ``datasets`` folder, a third-party reader) may carry any scores.
NO_SCORES_SOURCES = frozenset({"jsonl", "webdataset", "stdlib_docs", "img2dataset", "image_folder", "hf_images"})
#: Columns of the three schemas, none of them a struct: a dotted path can only start at ``scores``.
_FLAT_COLUMNS = frozenset({"id", "text", "source", "meta", "texts", "images", "input_ids", "loss_mask",
                           "doc_offsets", "n_tokens", "n_image_tokens", "lineage"})


# ============================================================================ column flow
@dataclass
class Reach:
    """What reaches one point of the pipeline: the top-level ``columns``, the ``scores`` labels with
    their metric names (None: not known in advance) and ``open_scores`` (the source may carry labels
    nobody declared, so an unknown label is accepted)."""

    columns: list[str]
    scores: dict[str, list[str] | None] = field(default_factory=dict)
    open_scores: bool = False

    def paths(self) -> list[str]:
        """Every column path known here (for "did you mean" suggestions)."""
        out = [c for c in self.columns if c != "scores"]
        if "scores" in self.columns:
            for label, names in self.scores.items():
                out += [f"scores.{label}.{m}" for m in names] if names else [f"scores.{label}"]
        return out

    def after(self, stage: Any, columns: list[str]) -> Reach:
        """The reach after ``stage``, whose output columns are ``columns``; a stage that writes scores
        adds (or replaces) ``scores.<label>``; one whose output has no ``scores`` column drops them all."""
        writes, names = writes_scores(stage)
        columns = list(columns)
        if writes and "scores" not in columns:
            columns.append("scores")
        if "scores" not in columns:
            return Reach(columns)
        scores = dict(self.scores)
        if writes:
            scores[stage.label] = names
        return Reach(columns, scores, self.open_scores)


def writes_scores(stage: Any) -> tuple[bool, list[str] | None]:
    """``(writes, metric names)``: whether ``stage`` writes ``scores.<label>`` and, when declared, what.

    A stage writes scores when it lists ``scores`` in ``provides``, declares metric names, or is a
    :class:`~curate.stage.Filter` with its own ``score`` method and no declaration (names unknown).
    """
    from curate.stage import Filter

    names = stage.score_names()
    if names is not None:
        return bool(names) or "scores" in stage.provides, list(names)
    if "scores" in stage.provides:
        return True, None
    return isinstance(stage, Filter) and type(stage).score is not Filter.score, None


def source_reach(manifest: Any, kind: str, shards: list) -> Reach:
    """What the source delivers: its schema's columns and, for local Parquet/Arrow inputs, the
    ``scores`` labels their files carry (curate's own output read back keeps its scores). Inputs whose
    schemas are not read here (remote files, more than 256 files, other columnar sources) may carry any
    ``scores`` label."""
    from curate.schema import SCHEMAS

    if kind == "table":  # a source that keeps its files' own columns
        from curate.planner import make_reader

        columns = make_reader(manifest).table_columns()
        return Reach(columns, {}, open_scores="scores" in columns)
    columns = list(SCHEMAS[kind].names)
    source = manifest.source
    meta_fields = getattr(source.params, "meta_fields", None)
    if source.kind in NO_SCORES_SOURCES or (meta_fields is not None and "scores" not in meta_fields):
        return Reach(columns)
    if source.kind not in ("parquet", "arrow"):
        return Reach(columns + ["scores"], {}, open_scores=True)
    uris = list(dict.fromkeys(s.uri for s in shards))
    if len(uris) > 256 or any("://" in u and not u.startswith("file://") for u in uris):  # not worth the reads
        return Reach(columns + ["scores"], {}, open_scores=True)
    labels: dict[str, list[str] | None] = {}
    for uri in uris:
        schema = _schema_of(source.kind, uri)
        if schema is None:
            return Reach(columns + ["scores"], labels, open_scores=True)
        labels = _merge_labels(labels, schema)
    return Reach(columns + (["scores"] if labels else []), labels)


def _schema_of(kind: str, uri: str):
    """The Arrow schema of one Parquet or Arrow input file (None when it cannot be read here)."""
    try:
        if kind == "parquet":
            from curate.readers.parquet import footer

            return footer(uri).schema.to_arrow_schema()
        from curate.readers.arrow_ipc import ipc_schema

        return ipc_schema(uri)
    except Exception:  # noqa: BLE001 - the reader reports unreadable inputs itself; here: unknown
        return None


def _merge_labels(labels: dict[str, list[str] | None], schema) -> dict[str, list[str] | None]:
    import pyarrow as pa

    if "scores" not in schema.names or not pa.types.is_struct(schema.field("scores").type):
        return labels
    out = dict(labels)
    for f in schema.field("scores").type:
        names = [g.name for g in f.type] if pa.types.is_struct(f.type) else None
        old = out.get(f.name, [])
        out[f.name] = None if names is None or old is None else list(dict.fromkeys(old + names))
    return out


def column_params(stage_name: str, params: BaseModel, loc: tuple = ()) -> list[tuple[tuple, str, str]]:
    """``(loc, value, mode)`` for every column parameter of a stage's ``params`` (nested models and
    lists of them included): fields named ``column``, ``*_column`` or ``by``. ``loc`` is relative to the
    stage's entry; ``mode`` is ``path``, or the :data:`COLUMN_MODES` entry of that field."""
    out = []
    for name in type(params).model_fields:
        value = getattr(params, name, None)
        if isinstance(value, str) and (name in ("column", "by") or name.endswith("_column")):
            out.append((loc + (name,), value, COLUMN_MODES.get((stage_name, name), "path")))
        elif isinstance(value, BaseModel):
            out += column_params(stage_name, value, loc + (name,))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += column_params(stage_name, item, loc + (name, i))
    return out


def check_column(value: str, mode: str, reach: Reach, later: dict[str, str] | None = None) -> str | None:
    """None when the column parameter ``value`` can be read at ``reach``, else what is wrong.

    ``mode``: ``path`` (a top-level column or ``scores.<label>.<metric>``), ``name`` (a top-level column
    only), ``meta_key`` or ``meta_path`` (see :data:`COLUMN_MODES`). ``later`` maps the labels of the
    stages after this point to where they are, to say "runs after this one" instead of "no such label".
    """
    cols = reach.columns
    here = f"; columns here: {', '.join(cols)}"
    if mode == "meta_key":
        if value in cols or "meta" in cols:
            return None
        return f"no column {value!r} and no `meta` to take it from{_hint(value, reach.paths())}{here}"
    if mode in ("name", "meta_path"):
        if value in cols:
            return None
        if mode == "meta_path" and value.startswith("meta."):
            if "meta" in cols:
                return None
            return f"no `meta` column reaches this stage to read {value[5:]!r} from{here}"
        names = [c for c in cols if c != "scores"]
        if mode == "meta_path":
            meta = "meta" in cols and "." not in value
            hint = f" (did you mean 'meta.{value}'?)" if meta else _hint(value, names)
            return f"no column {value!r} (a column, or `meta.<key>` for a field of the JSON meta){hint}{here}"
        return f"no column {value!r} (a top-level column name){_hint(value, names)}{here}"
    parts = value.split(".")
    if parts[0] not in cols:
        if parts[0] == "scores":
            return (f"no `scores` reach this stage (no scoring stage before it, or a stage that builds "
                    f"new rows dropped them){_later(parts, later)}{_hint(value, reach.paths())}{here}")
        return f"no column {value!r} reaches this stage{_hint(value, reach.paths())}{here}"
    if parts[0] != "scores":
        if len(parts) > 1 and parts[0] in _FLAT_COLUMNS:
            return (f"{parts[0]!r} is not a struct column, so {value!r} names nothing (only "
                    f"`scores.<stage>.<metric>` paths have dots){_hint(value, reach.paths())}")
        return None
    if len(parts) == 1:
        return f"names the whole `scores` struct; give scores.<stage>.<metric>{_hint(value, reach.paths())}"
    label = parts[1]
    if label not in reach.scores:
        if reach.open_scores:
            return None
        known = ", ".join(reach.scores) or "none"
        return (f"no stage labelled {label!r} writes scores before this one (labels here: {known})"
                f"{_later(parts, later)}{_hint(value, reach.paths())}")
    names = reach.scores[label]
    if len(parts) == 2:
        return f"give a metric: scores.{label}.<metric>" + (f", one of {', '.join(names)}" if names else "")
    if names is not None and parts[2] not in names:
        written = ", ".join(names) or "no metrics"
        return f"{label} writes no metric {parts[2]!r} (it writes {written}){_hint(value, reach.paths())}"
    return None


def _later(parts: list[str], later: dict[str, str] | None) -> str:
    if later and len(parts) > 1 and parts[1] in later:
        return f"; {parts[1]!r} is {later[parts[1]]}, which runs after this stage"
    return ""


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _hint(value: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidates, else empty."""
    close = difflib.get_close_matches(value, candidates, n=2, cutoff=0.6)
    if len(close) == 2 and _ratio(value, close[0]) - _ratio(value, close[1]) > 0.05:
        close = close[:1]  # one clearly closer: name only it
    if not close and "." in value:  # a path: compare its last part with the candidates' last parts
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        last = value.rsplit(".", 1)[-1]
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.75)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# ============================================================================ models
def looks_like_path(ref: str) -> bool:
    """True when ``ref`` can only be a filesystem path (never a Hub name): absolute, ``~``/``.``-relative,
    with two or more ``/``, a backslash, or a model-file suffix."""
    return (os.path.isabs(ref) or ref.startswith(("~", ".")) or "\\" in ref or ref.count("/") > 1
            or ref.endswith("/") or ref.lower().endswith(FILE_SUFFIXES))


def is_hub_name(ref: str) -> bool:
    """True when ``ref`` has the form of a Hugging Face Hub repository name (``name`` or ``org/name``)."""
    return (bool(_HUB_NAME.match(ref)) and not looks_like_path(ref) and "--" not in ref and ".." not in ref
            and not ref.endswith((".", "-")))


@functools.cache
def hub_offline_reason() -> str | None:
    """Why the Hub cannot be used from this process (None when it can): ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set, or the endpoint not answering within :data:`HUB_TIMEOUT` seconds.
    Probed at most once per process."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except Exception as e:  # noqa: BLE001 - DNS, refused, timeout, TLS: unreachable all the same
        return f"{endpoint} did not answer within {HUB_TIMEOUT:g} s ({type(e).__name__})"
    return None


def in_hf_cache(repo_id: str) -> bool:
    """True when a snapshot of the Hub model ``repo_id`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return False
    try:
        snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or a malformed name: either way not usable offline
        return False
    return True


def check_model_ref(ref: str, kind: str = "model") -> str | None:
    """None when the model (or tokenizer) ``ref`` can be loaded, else a message saying why not.

    ``ref`` is fine when it is an existing local file or folder (``~`` expanded), or a Hub name when the
    Hub can be reached (see :func:`hub_offline_reason`) or the name is in the local Hugging Face cache.
    With the ``local:`` prefix only a local path will do. ``kind`` names the thing in the message
    ("no tokenizer folder at …").
    """
    local_only = ref.startswith(LOCAL)
    ref = ref[len(LOCAL):] if local_only else ref
    path = Path(os.path.expanduser(ref))
    if path.exists():
        return None
    where = f"no {kind} at {path.absolute()}"
    if local_only or looks_like_path(ref):
        return where + (" (give a local path; nothing is downloaded)" if local_only else "")
    if not is_hub_name(ref):
        return f"{where}, and {ref!r} is not a Hugging Face Hub name either"
    offline = hub_offline_reason()
    if offline is None or in_hf_cache(ref):
        return None
    return (f"{ref!r} is not in the local Hugging Face cache and the Hub cannot be used ({offline}), nor is it "
            f"a local path ({where}); download it where there is a network (`hf download {ref}`) or give a "
            "local path")


# ============================================================================ tokenizer
def load_tokenizer(spec: Any, wanted: list[str]):
    """The run tokenizer of ``spec`` (a ``TokenizerSpec`` with ``path``) as a
    :class:`~curate.tokenizer.CurateTokenizer`, loaded once. With renamed ``special_tokens`` it is
    prepared as the driver would (into a temporary folder), so a collision shows now. Raises the
    :class:`ConfigError` of :mod:`curate.tokenizer` ("tokenizer.<field>: …")."""
    from curate import tokenizer as tk

    if spec.special_tokens:
        with tempfile.TemporaryDirectory(prefix="curate-validate-") as tmp:
            tk.prepare(spec, Path(tmp), wanted, lambda: iter(()))
            return tk.CurateTokenizer.load_run(tmp)
    return tk.CurateTokenizer(tk.load_base(spec.path), {}, spec.split_chars)


def check_tokenizer(manifest: Any, stages: list, wanted: list[str]) -> None:
    """Raise a :class:`ConfigError` naming the manifest line when the manifest's ``tokenizer: {path}``
    does not exist, cannot be loaded (offline and not cached), or lacks what a stage needs: an
    end-of-text token for a stage with ``append_eos: true``. Nothing is checked for ``train:``."""
    spec = manifest.tokenizer
    if spec is None or spec.path is None:
        return
    kind = "tokenizer file" if spec.path.lower().endswith(".json") else "tokenizer folder"
    problem = check_model_ref(spec.path, kind)
    if problem:
        raise manifest.error(("tokenizer", "path"), problem)
    try:
        tok = load_tokenizer(spec, wanted)
    except ConfigError as e:
        path = Path(os.path.expanduser(spec.path))
        if not path.exists():  # a Hub name that the Hub could not serve: say both
            raise manifest.error(("tokenizer", "path"), f"no {kind} at {path.absolute()}, and loading "
                                 f"{spec.path!r} from the Hugging Face Hub failed: {e}") from None
        raise _tokenizer_error(manifest, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file: say which and why
        raise manifest.error(("tokenizer", "path"), f"cannot load {spec.path!r}: {e}") from None
    if tok.eos_id is not None:
        return
    from curate.tokenizer import EOS_CANDIDATES

    for s, stage in zip(manifest.stages, stages):
        if getattr(stage.params, "append_eos", False):
            raise manifest.error(s.loc + ("append_eos",), (
                f"the tokenizer {spec.path!r} has no end-of-text token "
                f"(none of {', '.join(EOS_CANDIDATES)}); "
                "use a tokenizer that has one, or set append_eos: false"))


def _tokenizer_error(manifest: Any, message: str) -> ConfigError:
    """A tokenizer-module ConfigError (``tokenizer.<field>: …``) placed on its manifest line."""
    m = re.match(r"tokenizer\.(\w+): (.*)", message, re.S)
    if m:
        return manifest.error(("tokenizer", m.group(1)), m.group(2))
    return manifest.error(("tokenizer",), message)

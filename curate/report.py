"""``curate report RUN``: one self-contained HTML page about a finished run, with its plots.

Sections: the run (name, fingerprint, shards, outputs, global stages' results); tokens per sample for
each output and partition, images per sample and evidence depth where the rows have them (from
:func:`curate.output_profile.profile_run`); the distribution of every score a filter recorded, with
the bounds that filter (or a later ``select``) dropped by drawn as vertical lines; drops by reason per
stage; time per stage; and a few samples, rendered as ``curate inspect --html`` renders them (token
rows decoded with the run tokenizer, chunks coloured by document; interleaved rows with their images).

The page needs nothing else: plots are PNG ``data:`` URIs, no script, no network (its
Content-Security-Policy allows only inline styles and ``data:`` images). Every string from the run —
ids, stage labels, drop reasons, column paths, sample text — is HTML-escaped, and sample images are
inlined only for sniffed raster types (:mod:`curate.inspect_html`). The PNGs are also written to a
folder, under names made only of ``[a-z0-9_-]`` and derived from what they show, so the same run gives
the same file names.
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import re
from pathlib import Path
from typing import Any

import orjson

from curate.errors import ConfigError

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
nav a{margin-right:1em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f4}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:.5em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption,.note{font-size:.8em;color:#666}
section.sample{border:1px solid #ccc;border-radius:6px;padding:1em;margin-bottom:1.5em}
section.sample h2{font-size:1em;border:0;margin:0 0 .5em}
table.fields td:first-child{font-weight:600;color:#555;white-space:nowrap}
p.text,pre.tokens{white-space:pre-wrap;word-break:break-word;margin:.5em 0;font-size:.9em}
pre.tokens{font-family:ui-monospace,monospace;line-height:1.5}
.missing{background:#fee;padding:.5em;display:inline-block}
.sp{background:#333;color:#fff;border-radius:3px;padding:0 2px}.dim{color:#888}
.c0{background:#c8f0c8}.c1{background:#f3c8f3}.c2{background:#c8eef0}.c3{background:#f5efb0}
.c4{background:#cad9f8}.c5{background:#f8caca}.c6{background:#a8eca8}.c7{background:#eaa8ea}
"""


def write_report(run_dir: Path, html_path: Path | None = None, png_dir: Path | None = None,
                 samples: int = 3) -> dict[str, Any]:
    """Write the report of the finished run at ``run_dir``; returns ``{"html": path, "pngs": {name: path}}``.

    ``html_path`` defaults to ``RUN/report.html``, ``png_dir`` (each plot also as a PNG file) to
    ``RUN/report/``; ``samples`` is how many output samples to render. The PNGs are named by what
    they show (:class:`Figures`), so a rerun overwrites the same files. Raises
    :class:`~curate.errors.ConfigError` for a run that has not finished (no ``stats.json``) and for a
    ``png_dir`` inside a sink's folder (the output must stay as the run wrote it).
    """
    run_dir = Path(run_dir)
    stats_path = run_dir / "stats.json"
    if not stats_path.is_file():
        raise ConfigError(f"{run_dir}: the run has not finished (no stats.json): run `curate run` to the end "
                          "before `curate report`")
    stats = orjson.loads(stats_path.read_bytes())
    html_path = Path(html_path) if html_path is not None else run_dir / "report.html"
    png_dir = Path(png_dir) if png_dir is not None else run_dir / "report"
    from curate.output_profile import profile_output, sink_folders

    folders = sink_folders(run_dir) if (run_dir / "manifest.resolved.yaml").is_file() else {}
    for label, folder in folders.items():
        if png_dir.resolve().is_relative_to(folder.resolve()):
            raise ConfigError(f"{png_dir} is inside the folder of {label}: choose another folder for the plots "
                              "(--png-dir)")
    profiles = {label: profile_output(f) for label, f in folders.items() if (f / "index.json").is_file()}
    stages = _in_pipeline_order(stats.get("stages", {}), run_dir, list(folders))
    figures = Figures()
    sections = [
        ("summary", "Run", _summary(run_dir, stats, stages, folders, profiles)),
        ("lengths", "Tokens, images and depth per sample", _lengths(profiles, folders, figures)),
        ("scores", "Score distributions", _scores(stages, figures)),
        ("drops", "Drops by reason", _drops(stages, figures)),
        ("time", "Time per stage", _times(stages, figures)),
        ("samples", "Samples", _samples(run_dir, folders, profiles, samples)),
    ]
    page = _page(f"curate report: {stats.get('name', run_dir.name)}", sections)
    png_dir.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for name, data in figures.items():
        pngs[name] = png_dir / f"{name}.png"
        _write(pngs[name], data)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    _write(html_path, page.encode("utf-8"))
    return {"html": html_path, "pngs": pngs}


class Figures(dict):
    """Plot name → PNG bytes; :meth:`add` names a plot from its parts and returns its ``<figure>``."""

    def add(self, parts: list[str], png: bytes, caption: str) -> str:
        name = "-".join(_slug(p) for p in parts)[:96]
        if name in self:  # two labels that slug alike (``a.b`` and ``a_b``): keep both, apart
            name = f"{name}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:8]}"
        self[name] = png
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return f"<figure><img src='{uri}' alt='{_e(caption)}'><figcaption>{_e(caption)}</figcaption></figure>"


def _in_pipeline_order(stages: dict[str, dict], run_dir: Path, sinks: list[str]) -> dict[str, dict]:
    """``stats.json``'s stages (stored with sorted keys) in pipeline order: ``read``, the manifest's
    stages (labelled as the manifest labels them: ``name``, or ``name_1``, ``name_2`` … for a repeated
    one), the sinks, then anything else as it comes."""
    import yaml

    names: list[str] = []
    path = run_dir / "manifest.resolved.yaml"
    if path.is_file():
        resolved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for item in resolved.get("stages") or []:
            if isinstance(item, dict) and len(item) == 1:
                names.append(str(next(iter(item))))
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if names.count(name) == 1 else f"{name}_{seen[name]}")
    order = ["read", *labels, *sinks]
    return {**{k: stages[k] for k in order if k in stages}, **{k: v for k, v in stages.items() if k not in order}}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", str(text).lower()).strip("-") or "x"


# ---------------------------------------------------------------------- sections
def _summary(run_dir: Path, stats: dict, stages: dict[str, dict], folders: dict[str, Path],
             profiles: dict[str, dict]) -> str:
    fingerprint = _json_file(run_dir / "fingerprint").get("digest")
    read = stages.get("read", {})
    rows = [("name", stats.get("name")), ("run directory", str(run_dir)),
            ("fingerprint", fingerprint or "—"), ("input shards", _n(stats.get("shards"))),
            ("stages", " → ".join(stages) or "—"), ("rows read", _n(read.get("rows_in")))]
    tok = stats.get("tokenizer")
    if tok:
        rows.append(("tokenizer", f"vocabulary {_n(tok.get('vocab_size'))}, sha256 {str(tok.get('vocab_sha256'))[:16]}…"))
    dup = stats.get("duplicate_ids") or {}
    if dup.get("rows"):
        rows.append(("repeated ids", f"{_n(dup['rows'])} rows ({_n(dup.get('ids'))} ids)"))
    out = [_kv_table(rows)]
    outputs = stats.get("outputs", {})
    if outputs:
        table = []
        for label, o in outputs.items():
            fmt = profiles.get(label, {}).get("format", "not finished" if label in folders else "—")
            path = folders.get(label, Path(str(o.get("path", ""))))
            table.append([label, fmt, _n(o.get("files")), _n(o.get("samples")), _n(o.get("bytes")),
                          _relative(path, run_dir)])
        out.append("<h3>Outputs</h3>" + _table(["sink", "format", "files", "samples", "bytes", "folder"], table,
                                                numeric={2, 3, 4}))
    global_states = stats.get("global") or {}
    if global_states:
        table = [[label, _brief({k: v for k, v in state.items() if k != "tables" and not k.startswith("_")})]
                 for label, state in global_states.items()]
        out.append("<h3>Global stages</h3>" + _table(["stage", "combined state"], table))
    return "".join(out)


def _lengths(profiles: dict[str, dict], folders: dict[str, Path], figures: Figures) -> str:
    if not profiles:
        return "<p class='note'>No finished output (no sink folder with an index.json).</p>"
    from curate import report_plots

    out, seen = [], {}
    for label, prof in profiles.items():
        out.append(f"<h3>{_e(label)} <span class='note'>({_e(prof['format'])}, {_n(prof['samples'])} samples)</span></h3>")
        key = orjson.dumps(prof["groups"], option=orjson.OPT_SORT_KEYS)
        if key in seen:
            out.append(f"<p class='note'>The same samples as {_e(seen[key])}.</p>")
            continue
        seen[key] = label
        groups = prof["groups"]
        sink = label.removeprefix("sink:")
        values = _json_file(folders[label] / "index.json").get("partitions") or {}
        keys = ("count", "sum", "min", "p50", "p90", "p99", "max", "mean")
        if not any(g.get("tokens") for g in groups.values()):
            keys = ()  # no token columns at all
        rows = []
        for name, g in groups.items():
            t = g.get("tokens") or {}
            value = _brief(values[name].get("value")) if isinstance(values.get(name), dict) else "—"
            rows.append([name, value, _n(g["samples"]), *(_n(t.get(k)) for k in keys)])
        head = ["group", "value", "samples", "with tokens", "tokens", "min", "p50", "p90", "p99", "max", "mean"]
        out.append(_table(head[:3 + len(keys)], rows, numeric=set(range(2, 11))))
        hists = {n: g["token_histogram"] for n, g in groups.items() if g.get("token_histogram")}
        if hists:
            png = report_plots.token_lengths(hists, f"{label}: tokens per sample")
            out.append(figures.add(["token_lengths", sink], png, f"{label}: tokens per sample, by group"))
        else:
            out.append("<p class='note'>No token counts (no n_tokens or input_ids column).</p>")
        images = {n: g["images_per_sample"] for n, g in groups.items() if g.get("images_per_sample")}
        if images:
            png = report_plots.categories(images, f"{label}: images per sample", "images")
            out.append(figures.add(["images_per_sample", sink], png, f"{label}: images per sample"))
        depths = {n: _depth_bins(g["evidence_depth"]) for n, g in groups.items() if g.get("evidence_depth")}
        if depths:
            png = report_plots.categories(depths, f"{label}: evidence and needle depth", "depth in the context")
            out.append(figures.add(["evidence_depth", sink], png, f"{label}: depth of evidence and needles"))
    return "".join(out)


def _depth_bins(hist: dict) -> dict[str, int]:
    e = hist["edges"]
    return {f"{e[i]:.1f}–{e[i + 1]:.1f}": n for i, n in enumerate(hist["counts"])}


def _scores(stages: dict[str, dict], figures: Figures) -> str:
    from curate import report_plots
    from curate.stats import ScoreHistogram

    bounds_on: dict[tuple[str, str], list[tuple[str, str, float]]] = {}  # (stage, metric) → (by, side, value)
    placed: set[tuple[str, str]] = set()
    for label, s in stages.items():
        for key, bound in (s.get("thresholds") or {}).items():
            target = (label, key) if key in (s.get("scores") or {}) else _score_path(key, stages)
            for side in ("min", "max"):
                if target is not None and bound.get(side) is not None:
                    bounds_on.setdefault(target, []).append((label, side, float(bound[side])))
                    placed.add((label, key))
    out = []
    for label, s in stages.items():
        if not s.get("scores"):
            continue
        out.append(f"<h3>{_e(label)}</h3><div class='grid'>")
        rows = []
        for metric, d in s["scores"].items():
            h = ScoreHistogram.from_dict(d)
            lines = [(f"{by} {side}", v) for by, side, v in bounds_on.get((label, metric), [])]
            if h.count:
                png = report_plots.scores(h.bins(), lines, f"{label}: {metric}")
                out.append(figures.add(["scores", label, metric], png, f"scores.{label}.{metric}"))
            rows.append([metric, _n(h.count), _n(h.nan + h.null), _n(h.inf + h.neg_inf),
                         *(_n(d.get(k)) for k in ("min", "p50", "p90", "p99", "max", "mean")),
                         "; ".join(f"{name} = {v:.6g}" for name, v in lines) or "—"])
        out.append("</div>")
        out.append(_table(["metric", "rows", "missing", "infinite", "min", "p50", "p90", "p99", "max", "mean",
                           "bounds"], rows, numeric=set(range(1, 10))))
    other = [[label, key, _n(b.get("min")), _n(b.get("max"))] for label, s in stages.items()
             for key, b in (s.get("thresholds") or {}).items() if (label, key) not in placed]
    if other:
        out.append("<h3>Bounds on columns without a recorded distribution</h3>"
                   + _table(["stage", "column", "min", "max"], other, numeric={2, 3}))
    if not out:
        return "<p class='note'>No filter in this run recorded scores.</p>"
    return "".join(out)


def _score_path(key: str, stages: dict[str, dict]) -> tuple[str, str] | None:
    """``scores.<label>.<metric>`` → (label, metric) when that stage recorded that metric's distribution."""
    if not key.startswith("scores."):
        return None
    for label, s in stages.items():
        prefix = f"scores.{label}."
        if key.startswith(prefix) and key[len(prefix):] in (s.get("scores") or {}):
            return label, key[len(prefix):]
    return None


def _drops(stages: dict[str, dict], figures: Figures) -> str:
    from curate import report_plots

    rows = [(label, reason, n, s.get("rows_in") or 0) for label, s in stages.items()
            for reason, n in (s.get("drops") or {}).items()]
    if not rows:
        return "<p class='note'>No stage dropped a row.</p>"
    out = []
    shown = sorted(rows, key=lambda r: -r[2])[:40]
    shown = [r for r in rows if r in shown]  # pipeline order, largest 40
    png = report_plots.bars([f"{label}: {reason}" for label, reason, _, _ in shown], [n for *_, n, _ in shown],
                            "rows dropped, by stage and reason", "rows")
    out.append(figures.add(["drops_by_reason"], png, "rows dropped, by stage and reason"))
    if len(shown) < len(rows):
        out.append(f"<p class='note'>The plot shows the 40 largest of {len(rows)} reasons; the table has all.</p>")
    out.append(_table(["stage", "reason", "rows", "share of the stage's rows in"],
                      [[label, reason, _n(n), f"{100 * n / total:.2f}%" if total else "—"]
                       for label, reason, n, total in rows], numeric={2, 3}))
    return "".join(out)


def _times(stages: dict[str, dict], figures: Figures) -> str:
    from curate import report_plots

    if not stages:
        return "<p class='note'>No stage stats.</p>"
    labels = list(stages)
    seconds = [float(stages[k].get("seconds") or 0.0) for k in labels]
    png = report_plots.bars(labels, seconds, "seconds per stage (summed over shards)", "seconds")
    out = [figures.add(["time_per_stage"], png, "time per stage, summed over shards")]
    rows = []
    for label, sec in zip(labels, seconds):
        s = stages[label]
        rate = f"{s.get('rows_in', 0) / sec:,.0f}" if sec > 0 else "—"
        rows.append([label, _n(s.get("rows_in")), _n(s.get("rows_out")), _n(s.get("tokens_out")), f"{sec:,.2f}", rate])
    out.append(_table(["stage", "rows in", "rows out", "tokens out", "seconds", "rows in / s"], rows,
                      numeric={1, 2, 3, 4, 5}))
    return "".join(out)


def _samples(run_dir: Path, folders: dict[str, Path], profiles: dict[str, dict], n: int) -> str:
    from curate.inspect_html import sample_section
    from curate.inspect_output import samples

    label = next((k for k in folders if k in profiles), None)
    if label is None or n <= 0:
        return "<p class='note'>No finished output to show samples from.</p>"
    rows = list(itertools.islice(samples(folders[label], keep_bytes=True), n))
    tok = None
    if any("input_ids" in r for r in rows):
        from curate.inspect_tokens import find_tokenizer

        tok = find_tokenizer(run_dir)
    out = [f"<p class='note'>The first {len(rows)} samples of {_e(label)}."
           + (" Token rows are decoded with the run tokenizer: a colour per source document, special tokens "
              "dark." if tok else "") + "</p>"]
    for i, row in enumerate(rows):
        section = sample_section(i, row, 2000)
        if tok is not None and isinstance(row.get("input_ids"), list):
            section = section.removesuffix("</section>") + _tokens_html(row, tok) + "</section>"
        out.append(section.replace("<section>", "<section class='sample'>", 1))
    return "".join(out)


def _tokens_html(row: dict, tok) -> str:
    """A token row decoded as ``curate inspect`` shows it, as escaped spans with fixed CSS classes."""
    from curate.inspect_tokens import PALETTE, render

    text, backtraces = render(row, tok, 2000)
    plain, parts, pos = text.plain, [], 0
    for span in sorted(text.spans, key=lambda s: s.start):
        if span.start < pos:
            continue
        parts.append(_e(plain[pos:span.start]))
        style = str(span.style)
        cls = f"c{PALETTE.index(style)}" if style in PALETTE else "sp" if "reverse" in style else \
            "dim" if style == "dim" else ""
        parts.append(f"<span class='{cls}'>{_e(plain[span.start:span.end])}</span>")
        pos = span.end
    parts.append(_e(plain[pos:]))
    out = f"<pre class='tokens'>{''.join(parts)}</pre>"
    if backtraces:
        out += "<p class='note'>backtraces (each document's chunks in their original order):</p><ul>" + \
               "".join(f"<li>{_e(b)}</li>" for b in backtraces) + "</ul>"
    return out


# ---------------------------------------------------------------------- HTML helpers
def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f"<a href='#{key}'>{_e(name)}</a>" for key, name, _ in sections)
    body = "".join(f"<h2 id='{key}'>{_e(name)}</h2>{content}" for key, name, content in sections)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{_e(title)}</h1><nav>{nav}</nav>{body}</body></html>\n")


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td class='n'>{_e(v)}</td>" if i in numeric else f"<td>{_e(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    return "<table class='fields'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _n(v: Any) -> str:
    """A number for a table: integers with separators, floats to 4 significant digits; ``—`` for None."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"


def _brief(value: Any) -> str:
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= 600 else text[:600] + " …"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _json_file(path: Path) -> dict:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: bytes) -> None:
    from curate.rundir import AtomicFile

    f = AtomicFile(path)
    f.write(data)
    f.commit()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)

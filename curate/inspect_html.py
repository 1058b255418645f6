"""``curate inspect --html PAGE``: samples rendered as one self-contained HTML page, images inline.

Interleaved rows (``texts``/``images``) are laid out in order: text positions as paragraphs, image
positions as ``<img>`` with ``data:`` URIs, each captioned with its position, size and sha256 prefix.
Other columns (question, answer, needle, target, n_tokens, scores, meta) are listed above the body.
Rows read back from WebDataset tars are rebuilt from their ``json`` member and image files, rows from
JSONL outputs have their image bytes decoded from base64. The page needs nothing else: no script, no
network. Every string is HTML-escaped, and only raster image types (JPEG, PNG, WebP, GIF, BMP, TIFF)
become data URIs — an ``image/svg+xml`` or unknown type shows as a placeholder, so a hostile sample
cannot run code in the viewer's browser.
"""

from __future__ import annotations

import base64
import contextlib
import html
from typing import Any

import orjson

#: Image types shown inline; anything else (SVG can carry script) is a placeholder.
SAFE_MIMES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}
_MAGIC = [(b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff")]

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
section{border:1px solid #ccc;border-radius:6px;padding:1em;margin-bottom:2em}
h2{font-size:1.1em;margin:0 0 .5em}
table.fields{border-collapse:collapse;margin-bottom:1em;font-size:.9em}
table.fields td{border-top:1px solid #eee;padding:2px 8px;vertical-align:top}
table.fields td:first-child{font-weight:600;color:#555;white-space:nowrap}
p.text{white-space:pre-wrap;margin:.5em 0}
figure{margin:.8em 0}
figure img{max-width:100%;max-height:600px;border:1px solid #ddd}
figcaption{font-size:.8em;color:#666}
.missing{background:#fee;padding:.5em;display:inline-block}
"""


def sniff_mime(data: bytes) -> str | None:
    """The raster type the bytes start with (WebP by its RIFF header), or None."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def page(rows: list[dict[str, Any]], title: str, max_chars: int = 20_000) -> str:
    """The HTML page for ``rows`` (dicts as :func:`curate.inspect_output.samples` yields them)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"]
    for i, row in enumerate(rows):
        parts.append(sample_section(i, row, max_chars))
    parts.append("</body></html>")
    return "".join(parts)


def sample_section(i: int, row: dict[str, Any], max_chars: int) -> str:
    name = row.get("id") or row.get("__key__") or f"sample {i}"
    out = [f"<section><h2>{_e(str(name))}</h2><table class='fields'>"]
    files = row.get("files") or {}
    for key, value in row.items():
        if key in ("texts", "images", "text", "files", "__key__", "id", "input_ids", "loss_mask"):
            continue
        if key == "meta" and isinstance(value, str):
            with contextlib.suppress(orjson.JSONDecodeError):  # not JSON: shown as the string it is
                value = orjson.loads(value)
        out.append(f"<tr><td>{_e(key)}</td><td>{_e(_brief(value))}</td></tr>")
    out.append("</table>")
    texts, images = row.get("texts"), row.get("images")
    if isinstance(texts, list) and isinstance(images, list):
        n_image = 0
        for pos, (t, im) in enumerate(zip(texts, images)):
            if im is not None:
                n_image += 1
                out.append(_figure(pos, n_image, im, files))
            elif t is not None:
                out.append(f"<p class='text'>{_e(_cut(t, max_chars))}</p>")
    elif isinstance(row.get("text"), str):
        out.append(f"<p class='text'>{_e(_cut(row['text'], max_chars))}</p>")
    out.append("</section>")
    return "".join(out)


def _figure(pos: int, n: int, image: Any, files: dict) -> str:
    """One image: an IMAGE struct (Parquet/Arrow), or a WebDataset sample's entry naming its member file."""
    if isinstance(image, str):  # a bare tar member name
        image = {"file": image}
    if not isinstance(image, dict):
        image = {}
    data = image.get("bytes")
    if isinstance(data, str):  # a JSONL output: binary columns are written as base64 strings
        data = _base64(data)
    if data is None and isinstance(image.get("file"), str):  # a WebDataset sample: the member's bytes
        member = files.get(image["file"])
        data = member if isinstance(member, (bytes, bytearray)) else None
    meta = {k: image.get(k) for k in ("file", "width", "height", "mime") if image.get(k) is not None}
    if image.get("sha256"):
        meta["sha256"] = str(image["sha256"])[:12]
    caption = f"image {n} (position {pos}) " + " ".join(f"{k}={v}" for k, v in meta.items())
    mime = sniff_mime(bytes(data)) if data else None
    if mime not in SAFE_MIMES:
        why = "no bytes" if not data else "not a raster image type shown inline"
        return f"<figure><div class='missing'>{_e(why)}</div><figcaption>{_e(caption)}</figcaption></figure>"
    uri = f"data:{mime};base64,{base64.b64encode(bytes(data)).decode()}"
    return (f"<figure><img alt='{_e(caption)}' src='{uri}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error: not base64, so not image bytes
        return None


def _brief(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = value if isinstance(value, str) else orjson.dumps(
        value, default=lambda v: f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else str(v)).decode()
    return _cut(text, 2000)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f" … [{len(text):,} characters]"


def _e(text: str) -> str:
    return html.escape(text, quote=True)

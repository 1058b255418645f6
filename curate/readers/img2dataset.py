"""URL lists downloaded with img2dataset (``kind: img2dataset``), read back as interleaved rows.

**Input.** ``paths`` are URL lists in Parquet, CSV, TSV or JSON Lines (``.gz`` for the text formats;
the format comes from the extension unless ``input_format`` names it). ``url_col`` holds the image
URL, ``caption_col`` the caption (``null`` for URL-only lists), ``id_col`` an optional unique id, and
``save_additional_columns`` the columns kept in ``meta``. ``shards()`` reads each file's schema
(Parquet: its footer; CSV/JSONL: the whole file, once per planning) and raises ConfigError naming the
file when it is not of its format, cannot be parsed, or lacks a named column. Each file — or each
``shard_rows`` rows of a larger one — is a shard, with a content key from the file and the row range.

**Download.** Reading a shard runs img2dataset's ``download`` on the shard's valid rows, in a child
process of the shard's worker (``python -m curate.readers.img2dataset JOB``): img2dataset installs a
SIGINT handler that exits, prints to stdout, and starts its own ``spawn`` pools, none of which may
happen inside a curate worker (a Dask worker runs shards in threads, where ``signal`` refuses). The
child runs in its own session and kills its whole process group as soon as its parent (the worker)
is gone, so a killed run leaves no downloader behind; its output is appended to
``RUN/downloads/<shard>/img2dataset.log``. In that child (and in img2dataset's own pool processes)
``torch`` is made unimportable before img2dataset loads: img2dataset never uses it, but importing
``webdataset`` would import it (about 9 s and 250 MB per process).

The download goes to ``RUN/downloads/<shard>/``: ``urls.parquet`` (the rows sent, with their file row
and id), ``job.json`` (the shard's key and settings), ``out/`` (img2dataset's ``webdataset`` or
``parquet`` output, ``samples_per_download_shard`` samples per file, each with its ``_stats.json``)
and, once img2dataset has finished and every file of ``out/`` is there, ``complete.json`` with the
counts. A rerun reuses a folder with ``complete.json`` and the same key and settings without a single
request (read metric ``downloads_reused``); a folder without it (a run killed mid-download) resumes in
img2dataset's ``incremental`` mode, which skips every output file whose stats were written; a folder
made with another key or other settings is removed and the shard downloads from scratch.

**Rows.** Every sample img2dataset fetched becomes ``[image, caption]`` (``[image]`` when the caption
is null or blank) in input-row order, ``id`` = ``id_col`` or ``<file>:<row>`` (0-based row of the
input file), ``source`` = the file, ``meta`` = ``url``, ``row``, ``original_width``/``original_height``,
``original_sha256`` (of the downloaded bytes), ``exif`` (with ``extract_exif``) and the additional
columns. The image is img2dataset's encoded output (``encode_format``), with its own sha256 and the
size its header states. Parquet output holds one download file's images in memory at a time (sorted
by row); WebDataset output reads each image at its offset.

**Counted failures** (``read`` drops, each in ``failures/`` with file, row, url and img2dataset's
message), never fatal: ``missing_url`` / ``missing_id_field`` (not sent), ``http_<code>`` (``http_404``,
``http_500``, …), ``timeout``, ``disallowed_by_x_robots_tag`` (``disallowed_header_directives``),
``hash_mismatch``, ``download_failed`` (any other download error: refused connection, unknown host,
bad URL), ``undecodable_image`` (img2dataset or Pillow cannot decode it), ``image_too_large``
(``max_image_area``), ``image_too_small`` (``min_image_size``), ``aspect_ratio_too_large``
(``max_aspect_ratio``), ``resize_failed`` (any other resize error).
"""

from __future__ import annotations

import sys

if __name__ in ("__main__", "__mp_main__"):  # the download child and img2dataset's spawned processes
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type] - webdataset then skips its torch imports

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from curate.context import READ_LABEL
from curate.errors import ConfigError
from curate.plugins import register_source
from curate.readers import sniff
from curate.readers.base import Reader, Shard, content_key, list_files
from curate.readers.image_folder import ImageBatchParams, InterleavedBuilder, image_record, meta_string
from curate.seeds import digest

#: img2dataset's own column names: not allowed in ``save_additional_columns``.
RESERVED_COLUMNS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                              "status", "error_message", "exif", "md5", "sha256", "sha512"})
#: Columns this reader adds to the URL list it hands to img2dataset.
ROW_COLUMN, ID_COLUMN = "curate_row", "curate_id"
MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
#: Settings that do not change what is downloaded (excluded from a download folder's settings digest).
_NOT_SETTINGS = ("batch_rows", "batch_bytes", "processes_count", "thread_count", "shard_rows", "paths")
_FORMAT_NAMES = {"parquet": "a Parquet file", "csv": "a CSV file", "tsv": "a TSV file", "jsonl": "a JSON Lines file"}
_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl",
               ".json": "jsonl", ".ndjson": "jsonl"}


@register_source("img2dataset")
class Img2DatasetReader(Reader):
    """URL lists (Parquet, CSV, TSV, JSONL) downloaded by img2dataset, one download per shard."""

    class Params(ImageBatchParams):
        paths: list[str] = Field(description="URL lists: files, glob patterns or folders (Parquet, CSV, TSV, "
                                 "JSON Lines; .gz for the text formats)")
        input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
            "auto", description="format of the URL lists; auto: from each file's extension")
        url_col: str = Field("url", description="column with the image URL")
        caption_col: str | None = Field("caption", description="column with the caption; null: URL-only lists")
        id_col: str | None = Field(None, description="column with a unique id; default <file>:<row>")
        save_additional_columns: list[str] | None = Field(None, description="other input columns kept in meta")
        shard_rows: int = Field(100_000, gt=0, description="rows per shard; a larger file is split into row ranges")
        output_format: Literal["webdataset", "parquet"] = Field(
            "webdataset", description="img2dataset's output format in RUN/downloads/<shard>/out")
        samples_per_download_shard: int = Field(
            1000, gt=0, description="img2dataset's number_sample_per_shard: the unit an interrupted download "
            "resumes from")
        resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
            "border", description="img2dataset resize mode")
        image_size: int = Field(256, gt=0, description="target size of the resize")
        resize_only_if_bigger: bool = Field(False, description="never upscale")
        encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="format images are encoded in")
        encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality 0-100; png compression 0-9")
        skip_reencode: bool = Field(False, description="keep the downloaded bytes when no resize is needed")
        disable_all_reencoding: bool = Field(False, description="keep every downloaded image as it is (no "
                                             "decoding by img2dataset; curate still checks the header)")
        min_image_size: int = Field(0, ge=0, description="refuse images whose smaller side is below this")
        max_image_area: float | None = Field(None, gt=0, description="refuse images with more pixels; null: no limit")
        max_aspect_ratio: float | None = Field(None, gt=0, description="refuse images more elongated; null: no limit")
        processes_count: int = Field(1, gt=0, description="img2dataset download processes per shard")
        thread_count: int = Field(32, gt=0, description="download threads per process")
        retries: int = Field(0, ge=0, description="retries per failed download")
        timeout: float = Field(10.0, gt=0, description="seconds before a download times out")
        user_agent_token: str | None = Field(None, description="token added to the User-Agent (and matched "
                                             "against X-Robots-Tag)")
        disallowed_header_directives: list[str] = Field(
            ["noai", "noimageai", "noindex", "noimageindex"],
            description="X-Robots-Tag directives that refuse an image ([] honours none)")
        extract_exif: bool = Field(False, description="keep the EXIF tags (as JSON) in meta")

        @field_validator("paths", mode="before")
        @classmethod
        def _one_path(cls, v: Any) -> Any:
            return [v] if isinstance(v, str) else v

        @model_validator(mode="after")
        def _check(self):
            if self.encode_format == "png" and self.encode_quality > 9:
                raise ValueError("encode_quality is png's compression level 0-9 with encode_format: png")
            clash = RESERVED_COLUMNS.intersection(self.save_additional_columns or ())
            if clash:
                raise ValueError(f"save_additional_columns: {sorted(clash)} are img2dataset's own column names")
            ours = {ROW_COLUMN, ID_COLUMN}.intersection(self.save_additional_columns or ())
            if ours:
                raise ValueError(f"save_additional_columns: {sorted(ours)} are this reader's own column names")
            return self

    def output_kind(self) -> str:
        return "interleaved"

    # ------------------------------------------------------------------ listing
    def shards(self) -> list[Shard]:
        """One shard per file or per ``shard_rows`` rows; ConfigError naming a file that is not of its
        format or lacks a column (and when img2dataset is not installed)."""
        import importlib.util

        if importlib.util.find_spec("img2dataset") is None:
            raise ConfigError("kind: img2dataset needs the img2dataset package (pip install img2dataset)")
        out: list[Shard] = []
        for uri, info, rel in list_files(self.params.paths, tuple(_EXTENSIONS) + tuple(f"{e}.gz" for e in _EXTENSIONS)):
            fmt = self._format(uri)
            names, rows = _describe(uri, fmt)
            self._check_columns(uri, names)
            for start in range(0, rows, self.params.shard_rows):
                stop = min(rows, start + self.params.shard_rows)
                out.append(Shard(f"{len(out):05d}", content_key(uri, info, start, stop, fmt), uri, rel, start, stop,
                                 {"format": fmt}))
        return out

    def _format(self, uri: str) -> str:
        if self.params.input_format != "auto":
            return self.params.input_format
        name = uri.lower().removesuffix(".gz")
        for ext, fmt in _EXTENSIONS.items():
            if name.endswith(ext):
                return fmt
        raise ConfigError(f"{uri}: source.input_format: cannot tell the format from the name; "
                          "set input_format (parquet, csv, tsv or jsonl)")

    def _check_columns(self, uri: str, names: list[str]) -> None:
        p = self.params
        wanted = [("url_col", p.url_col), ("caption_col", p.caption_col), ("id_col", p.id_col)]
        wanted += [("save_additional_columns", c) for c in p.save_additional_columns or ()]
        for field, column in wanted:
            if column is not None and column not in names:
                hint = " (caption_col: null reads a URL-only list)" if field == "caption_col" else ""
                raise ConfigError(f"{uri}: source.{field}: no column {column!r} (has {names}){hint}")

    # ------------------------------------------------------------------ reading
    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        sent, skipped = self._sendable(_read_rows(shard, self._columns()), shard)
        folder = Path(ctx.run_dir.root) / "downloads" / shard.name
        self._download(folder, shard, sent, ctx)
        builder = InterleavedBuilder(p.batch_rows, int(p.batch_bytes))
        pending = iter(skipped)  # rows not sent, in row order, reported where they fall
        nxt = next(pending, None)
        for sample, data in self._samples(folder / "out", sent.column(ROW_COLUMN).to_pylist()):
            row = sample[ROW_COLUMN]
            while nxt is not None and nxt[0] < row:
                ctx.failure(nxt[1], nxt[2], file=shard.uri, line=nxt[0])
                nxt = next(pending, None)
            batch = self._row(sample, data, shard, builder, ctx)
            if batch is not None:
                yield batch
        while nxt is not None:
            ctx.failure(nxt[1], nxt[2], file=shard.uri, line=nxt[0])
            nxt = next(pending, None)
        last = builder.flush()
        if last is not None:
            yield last

    def _columns(self) -> list[str]:
        p = self.params
        cols = [p.url_col, p.caption_col, p.id_col, *(p.save_additional_columns or ())]
        return list(dict.fromkeys(c for c in cols if c is not None))

    def _sendable(self, table: pa.Table, shard: Shard) -> tuple[pa.Table, list[tuple[int, str, str]]]:
        """The URL list handed to img2dataset (``url``, ``caption``, :data:`ROW_COLUMN`, :data:`ID_COLUMN`
        and the additional columns with their types) and the rows not sent, as ``(row, reason, detail)``."""
        p = self.params
        urls = table.column(p.url_col).to_pylist()
        ids = table.column(p.id_col).to_pylist() if p.id_col else None
        keep, skipped, clean = [], [], []
        for i, url in enumerate(urls):
            row = shard.start + i
            url = str(url).strip() if url is not None else ""
            if not url:
                skipped.append((row, "missing_url", f"column {p.url_col!r} is null or blank"))
            elif ids is not None and ids[i] is None:
                skipped.append((row, "missing_id_field", f"column {p.id_col!r} is null"))
            else:
                keep.append(i)
                clean.append(url)
        rows = pa.array([shard.start + i for i in keep], pa.int64())
        columns = {"url": pa.array(clean, pa.string()), ROW_COLUMN: rows}
        take = pa.array(keep, pa.int64())
        if p.caption_col:
            captions = table.column(p.caption_col).take(take).to_pylist()
            columns["caption"] = pa.array([None if c is None else str(c) for c in captions], pa.string())
        if ids is not None:
            columns[ID_COLUMN] = pa.array([str(ids[i]) for i in keep], pa.string())
        for c in p.save_additional_columns or ():
            columns[c] = table.column(c).take(take)
        return pa.table(columns), skipped

    def _settings(self, shard: Shard) -> str:
        keep = {k: v for k, v in self.params.model_dump(mode="json").items() if k not in _NOT_SETTINGS}
        return digest(shard.key, shard.start, shard.stop, orjson.dumps(keep, option=orjson.OPT_SORT_KEYS),
                      size=12).hex()

    def _download(self, folder: Path, shard: Shard, sent: pa.Table, ctx) -> None:
        """Make ``folder`` a complete download of ``sent``: reuse it, resume it, or download from scratch."""
        settings = self._settings(shard)
        marker = folder / "complete.json"
        if _json(marker).get("settings") == settings:
            ctx.stats[READ_LABEL].count("downloads_reused")
            return
        job_path = folder / "job.json"
        if folder.exists() and _json(job_path).get("settings") != settings:
            shutil.rmtree(folder)  # another key or other settings (or a folder this reader did not make)
        folder.mkdir(parents=True, exist_ok=True)
        n = sent.num_rows
        expected = -(-n // self.params.samples_per_download_shard)
        started = time.perf_counter()
        if n:
            if not job_path.exists():
                _write_atomic(folder / "urls.parquet", _parquet_bytes(sent))
                _write_atomic(job_path, orjson.dumps({"settings": settings, "key": shard.key, "rows": n,
                                                      "download": self._download_args(folder)},
                                                     option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            _run_job(job_path, folder / "img2dataset.log", shard)
        missing = [k for k in range(expected) if not _download_done(folder / "out", k)]
        if missing:
            raise RuntimeError(f"img2dataset did not finish download file(s) {missing} of shard {shard.name} "
                               f"({shard.uri}); see {folder / 'img2dataset.log'}; a rerun resumes the download")
        counts = {"rows_sent": n, "download_files": expected, "seconds": round(time.perf_counter() - started, 3)}
        for k in range(expected):
            stats = _json(_stats_path(folder / "out", k))
            for name in ("successes", "failed_to_download", "failed_to_resize"):
                counts[name] = counts.get(name, 0) + int(stats.get(name, 0))
        _write_atomic(marker, orjson.dumps({"settings": settings, "key": shard.key, **counts},
                                           option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        ctx.stats[READ_LABEL].count("downloads_run")

    def _download_args(self, folder: Path) -> dict[str, Any]:
        """Keyword arguments of ``img2dataset.download`` for this source (``None`` limits mean none)."""
        p = self.params
        extras = [ROW_COLUMN] + ([ID_COLUMN] if p.id_col else []) + list(p.save_additional_columns or ())
        return {
            "url_list": str(folder / "urls.parquet"), "input_format": "parquet", "url_col": "url",
            "caption_col": "caption" if p.caption_col else None, "save_additional_columns": extras,
            "output_folder": str(folder / "out"), "output_format": p.output_format,
            "number_sample_per_shard": p.samples_per_download_shard, "incremental_mode": "incremental",
            "resize_mode": p.resize_mode, "image_size": p.image_size, "resize_only_if_bigger": p.resize_only_if_bigger,
            "encode_format": p.encode_format, "encode_quality": p.encode_quality, "skip_reencode": p.skip_reencode,
            "disable_all_reencoding": p.disable_all_reencoding, "min_image_size": p.min_image_size,
            "max_image_area": p.max_image_area, "max_aspect_ratio": p.max_aspect_ratio,
            "processes_count": p.processes_count, "thread_count": p.thread_count, "retries": p.retries,
            "timeout": p.timeout, "user_agent_token": p.user_agent_token,
            "disallowed_header_directives": list(p.disallowed_header_directives),
            "extract_exif": p.extract_exif, "compute_hash": "sha256", "enable_wandb": False,
            "distributor": "multiprocessing",
        }

    def _samples(self, out: Path, sent_rows: list[int]) -> Iterator[tuple[dict, bytes | None]]:
        """Every sent row's sample (successes with their image bytes), in input-row order; a row
        img2dataset wrote no record for comes as status ``missing``."""
        fmt, per = self.params.encode_format, self.params.samples_per_download_shard
        for k in range(-(-len(sent_rows) // per)):
            meta = pq.read_table(_meta_path(out, k))
            images: list | None = None
            if self.params.output_format == "parquet":
                images = meta.column(fmt).to_pylist() if fmt in meta.column_names else [None] * meta.num_rows
                meta = meta.drop_columns([c for c in (fmt, "txt") if c in meta.column_names])
            records = meta.to_pylist()
            order = sorted(range(len(records)), key=lambda i: records[i][ROW_COLUMN])
            found = {records[i][ROW_COLUMN] for i in order}
            lost = [{ROW_COLUMN: r, "status": "missing", "error_message": "img2dataset wrote no record for "
                     "this row (see img2dataset.log)"} for r in sent_rows[k * per:(k + 1) * per] if r not in found]
            merged = sorted([(records[i][ROW_COLUMN], i) for i in order] + [(r[ROW_COLUMN], -1 - j)
                                                                              for j, r in enumerate(lost)])
            with contextlib.ExitStack() as stack:
                tf = stack.enter_context(tarfile.open(out / f"{_file_name(k)}.tar", "r:")) if images is None else None
                members = ({m.name[: -len(fmt) - 1]: m for m in tf.getmembers() if m.name.endswith(f".{fmt}")}
                           if tf is not None else {})
                for _, i in merged:
                    if i < 0:
                        yield lost[-1 - i], None
                        continue
                    r = records[i]
                    if r.get("status") != "success":
                        yield r, None
                    elif images is not None:
                        yield r, images[i]
                    else:
                        member = members.get(r.get("key"))
                        yield r, (tf.extractfile(member).read() if member is not None else None)

    def _row(self, sample: dict, data: bytes | None, shard: Shard, builder: InterleavedBuilder,
             ctx) -> pa.RecordBatch | None:
        row, url = sample[ROW_COLUMN], sample.get("url")
        if sample.get("status") != "success":
            message = sample.get("error_message") or sample.get("status") or "unknown error"
            ctx.failure(failure_reason(sample.get("status"), message), message, file=shard.uri, line=row, record=url)
            return None
        image = image_record(data, MIME[self.params.encode_format]) if data else None
        if image is None:
            why = "no image in img2dataset's output" if not data else "Pillow cannot read the image header"
            ctx.failure("undecodable_image", why, file=shard.uri, line=row, record=url)
            return None
        meta = {"url": url, "row": row, "original_width": sample.get("original_width"),
                "original_height": sample.get("original_height"), "original_sha256": sample.get("sha256")}
        if self.params.extract_exif and sample.get("exif"):
            try:
                meta["exif"] = orjson.loads(sample["exif"])
            except orjson.JSONDecodeError:
                meta["exif"] = sample["exif"]
        for c in self.params.save_additional_columns or ():
            meta[c] = sample.get(c)
        caption = sample.get("caption") if self.params.caption_col else None
        caption = caption if isinstance(caption, str) and caption.strip() else None
        row_id = sample[ID_COLUMN] if self.params.id_col else f"{shard.rel}:{row}"
        return builder.add(row_id, [image], caption, shard.rel, meta_string(meta))


# ---------------------------------------------------------------------------- failure reasons
_HTTP = re.compile(r"HTTP Error (\d{3})")
_RESIZE = {"image decoding error": "undecodable_image", "image area too large": "image_too_large",
           "image too small": "image_too_small", "aspect ratio too large": "aspect_ratio_too_large"}


def failure_reason(status: str | None, message: str) -> str:
    """The counted reason for an img2dataset sample that failed with ``status`` and ``message``
    (``missing``: a row img2dataset wrote no record for is a ``download_failed``)."""
    text = (message or "").strip()
    low = text.lower()
    if status == "failed_to_resize":
        return _RESIZE.get(low, "undecodable_image" if "decod" in low else "resize_failed")
    match = _HTTP.search(text)
    if match:
        return f"http_{match.group(1)}"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "x-robots-tag" in low:
        return "disallowed_by_x_robots_tag"
    if low == "hash mismatch":
        return "hash_mismatch"
    return "download_failed"


# ---------------------------------------------------------------------------------- input
def _describe(uri: str, fmt: str) -> tuple[list[str], int]:
    """Column names and row count of one URL list; ConfigError naming it when it is not ``fmt``."""
    gz = uri.lower().endswith(".gz")
    if fmt == "parquet":
        sniff.expect(uri, ("parquet",), _FORMAT_NAMES[fmt])
        try:
            with fsspec.open(uri, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
                return md.schema.to_arrow_schema().names, md.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"{uri}: unreadable Parquet file: {e}") from None
    wanted = (("gzip",) if gz else ()) + (("json",) if fmt == "jsonl" else ())
    found = sniff.looks_like(sniff.head(uri))
    if found is not None and found not in wanted:
        words = sniff.DESCRIBE.get(found, (found, None))[0]
        raise ConfigError(f"{uri}: not {_FORMAT_NAMES[fmt]}: looks like {words} (set input_format when the "
                          "extension misleads)")
    table = _read_text_table(uri, fmt)
    return table.column_names, table.num_rows


def _read_text_table(uri: str, fmt: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    try:
        with fsspec.open(uri, "rb", compression="infer") as fh:
            if fmt == "jsonl":
                table = pajson.read_json(fh)
            else:
                parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
                convert = pacsv.ConvertOptions(include_columns=columns) if columns else None
                table = pacsv.read_csv(fh, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        raise ConfigError(f"{uri}: not {_FORMAT_NAMES[fmt]} that can be read: {e}") from None
    return table.select(columns) if columns else table


def _read_rows(shard: Shard, columns: list[str]) -> pa.Table:
    """Rows ``[start, stop)`` of the shard's file, with ``columns``."""
    fmt = shard.extra["format"]
    if fmt != "parquet":
        return _read_text_table(shard.uri, fmt, columns).slice(shard.start, (shard.stop or 0) - shard.start)
    with fsspec.open(shard.uri, "rb") as fh:
        pf = pq.ParquetFile(fh)
        groups, first, offset = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > shard.start and offset < (shard.stop or 0):
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return pa.table({c: pa.array([], pf.schema_arrow.field(c).type) for c in columns})
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(shard.start - first, (shard.stop or 0) - shard.start)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------- download folder
def _file_name(k: int) -> str:
    return f"{k:05d}"  # img2dataset's oom_shard_count default: 5 digits


def _meta_path(out: Path, k: int) -> Path:
    return out / f"{_file_name(k)}.parquet"


def _stats_path(out: Path, k: int) -> Path:
    return out / f"{_file_name(k)}_stats.json"


def _download_done(out: Path, k: int) -> bool:
    """img2dataset writes a file's stats after closing its output: stats present means the file is whole."""
    return _stats_path(out, k).is_file() and _meta_path(out, k).is_file()


def _json(path: Path) -> dict:
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _run_job(job: Path, log: Path, shard: Shard) -> None:
    """Run the download child for ``job`` to the end; kill its whole process group if this process is
    interrupted; RuntimeError with the log's last lines when it fails."""
    import curate

    here = str(Path(curate.__file__).resolve().parents[1])  # curate importable from the download folder too
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true",
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": here + (os.pathsep + path if path else "")}
    cmd = [sys.executable, "-W", "ignore::RuntimeWarning", "-m", "curate.readers.img2dataset", str(job),
           str(os.getpid())]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=job.parent, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        _kill_group(proc.pid)  # img2dataset's own processes, should any outlive it
    if code != 0:
        tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
        raise RuntimeError(f"img2dataset failed (exit code {code}) on shard {shard.name} ({shard.uri}); "
                           f"a rerun resumes the download; the end of {log}:\n{tail}")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone, or not ours
        os.killpg(pgid, signal.SIGKILL)


# ------------------------------------------------------------------------ the download child
def _watch_parent(parent: int) -> None:
    """Kill this process group (the child and img2dataset's processes) once the parent worker is gone."""

    def gone() -> bool:
        return os.getppid() != parent

    if gone():
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if gone():
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="curate-img2dataset-watch", daemon=True).start()


def _job_main(job: str, parent: int) -> None:
    spec = orjson.loads(Path(job).read_bytes())
    _watch_parent(parent)
    args = dict(spec["download"])
    for limit in ("max_image_area", "max_aspect_ratio"):
        if args.get(limit) is None:
            args[limit] = float("inf")
    from img2dataset import download

    download(**args)


if __name__ == "__main__":
    _job_main(sys.argv[1], int(sys.argv[2]))

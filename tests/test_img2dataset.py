"""``kind: img2dataset``: img2dataset really downloads from a loopback HTTP server (127.0.0.1, started and
stopped by each test) serving real photos, 404s, a URL slower than the timeout, random bytes served as
JPEG, an image over ``max_image_area`` and one refused by ``X-Robots-Tag: noai``. Every failure is
counted with its reason in ``stats.json``; a rerun — of a finished run, of a run whose shard failed
midway, of a run killed mid-download — requests nothing that was already fetched (the server counts).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("img2dataset", reason="img2dataset is not installed")
from PIL import Image

from curate.errors import ConfigError
from curate.readers.img2dataset import Img2DatasetReader, _read_rows, failure_reason
from curate.schema import validate
from curate.testing import real_images
from tests.conftest import cli, write_manifest


# ------------------------------------------------------------------------------ the server
class ImageServer:
    """A threading HTTP server on 127.0.0.1 serving ``routes`` (path → (status, headers, body, delay))
    and counting the requests per path."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict, bytes, float]] = {}
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.seen = threading.Event()  # set when a path in ``watch`` is requested
        self.release = threading.Event()  # a "hang" route waits for this (at most 30 s)
        self.watch: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                if self.path in server.watch:
                    server.seen.set()
                status, headers, body, delay = server.routes.get(self.path, (404, {}, b"not found", 0))
                if delay == "hang":
                    server.release.wait(30)
                elif delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in {"Content-Length": str(len(body)), **headers}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (the slow URL): nothing to answer
                    return

            def log_message(self, *args):
                """Requests are counted, not printed."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"

    def add(self, path: str, body: bytes, status: int = 200, mime: str = "image/jpeg", delay=0.0, **headers) -> str:
        self.routes[path] = (status, {"Content-Type": mime, **headers}, body, delay)
        return self.base + path

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = ImageServer()
    yield s
    s.stop()


def _big_png(side: int = 1100) -> bytes:
    """A real photo scaled up past ``max_image_area`` = 1,000,000 pixels."""
    _, data, _ = real_images("PNG", 128)[0]
    im = Image.open(io.BytesIO(data)).resize((side, side))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _stats(run: Path) -> dict:
    return json.loads((run / "stats.json").read_text())["stages"]["read"]


def _failures(run: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((run / "failures").glob("*.jsonl")) for line in p.read_text().splitlines()]


def _output(run: Path) -> pa.Table:
    return pq.read_table(sorted((run / "parquet").glob("*.parquet")))


def _digest(run: Path) -> dict[str, str]:
    """sha256 of every file of the parquet sink (index.json included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "parquet").iterdir())}


# --------------------------------------------------------------------------------- the run
def test_download_counts_failures_and_a_rerun_requests_nothing(tmp_path, server):
    photos = real_images("JPEG", 128)
    good = [(server.add(f"/img/{name}.jpg", data), caption) for name, data, caption in photos[:5]]
    rows_a = [
        (good[0][0], good[0][1], "cc-by"),
        (server.url("/gone.jpg"), "A photo that is gone.", "cc0"),                          # 404
        (server.add("/slow.jpg", photos[6][1], delay=3.0), "Too slow.", "cc0"),            # > timeout
        (server.add("/corrupt.jpg", os.urandom(3000)), "Random bytes.", "cc0"),           # undecodable
        (server.add("/big.png", _big_png(), mime="image/png"), "Too many pixels.", "cc0"),  # max_image_area
        (server.add("/noai.jpg", photos[7][1], **{"X-Robots-Tag": "noai"}), "Opted out.", "cc0"),
        (None, "No URL at all.", "cc0"),                                                   # not sent
        (good[1][0], None, "cc-by-sa"),                                                     # no caption
        (good[2][0], good[2][1], "cc-by"),
    ]
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(pa.table({"url": [r[0] for r in rows_a], "caption": [r[1] for r in rows_a],
                             "license": [r[2] for r in rows_a]}), inputs / "part-a.parquet")
    csv_rows = [(good[3][0], good[3][1], "cc0"), (server.url("/missing.png"), "Missing.", "cc0"),
                (good[4][0], good[4][1], "cc-by")]
    (inputs / "part-b.csv").write_text("url,caption,license\n" + "".join(f'{u},"{c}",{lic}\n' for u, c, lic in csv_rows))
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: i2d
        source:
          kind: img2dataset
          paths: ["{inputs}/part-a.parquet", "{inputs}/part-b.csv"]
          save_additional_columns: [license]
          resize_mode: keep_ratio
          image_size: 64
          max_image_area: 1000000
          timeout: 1
          thread_count: 4
          batch_rows: 3
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 2}}
        """)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress")

    table = _output(run)
    validate(table, "interleaved")
    assert table.column("id").to_pylist() == ["part-a.parquet:0", "part-a.parquet:7", "part-a.parquet:8",
                                              "part-b.csv:0", "part-b.csv:2"]
    texts = table.column("texts").to_pylist()
    assert texts == [[None, good[0][1]], [None], [None, good[2][1]], [None, good[3][1]], [None, good[4][1]]]
    for images in table.column("images").to_pylist():
        image = images[0]
        assert image["mime"] == "image/jpeg" and image["sha256"] == hashlib.sha256(image["bytes"]).hexdigest()
        assert min(image["width"], image["height"]) == 64  # keep_ratio: the smaller side to 64
        assert Image.open(io.BytesIO(image["bytes"])).size == (image["width"], image["height"])
    metas = [json.loads(m) for m in table.column("meta").to_pylist()]
    assert [m["url"] for m in metas] == [good[0][0], good[1][0], good[2][0], good[3][0], good[4][0]]
    assert [m["license"] for m in metas] == ["cc-by", "cc-by-sa", "cc-by", "cc0", "cc-by"]
    assert metas[0]["original_width"] == Image.open(io.BytesIO(photos[0][1])).width
    assert metas[0]["original_sha256"] == hashlib.sha256(photos[0][1]).hexdigest()
    assert set(table.column("source").to_pylist()) == {"part-a.parquet", "part-b.csv"}

    read = _stats(run)
    assert read["drops"] == {"http_404": 2, "timeout": 1, "undecodable_image": 1, "image_too_large": 1,
                             "disallowed_by_x_robots_tag": 1, "missing_url": 1}
    assert read["rows_out"] == 5 and read["rows_in"] == 12
    assert read["metrics"]["downloads_run"]["sum"] == 2
    fails = {(Path(f["file"]).name, f["line"]): f for f in _failures(run)}
    assert fails[("part-a.parquet", 1)]["reason"] == "http_404"
    assert fails[("part-a.parquet", 1)]["record"] == server.url("/gone.jpg")
    assert "404" in fails[("part-a.parquet", 1)]["detail"]
    assert fails[("part-a.parquet", 2)]["reason"] == "timeout"
    assert fails[("part-b.csv", 1)]["reason"] == "http_404"
    assert fails[("part-a.parquet", 6)]["reason"] == "missing_url"
    assert (run / "downloads" / "00000" / "complete.json").exists()

    hits = dict(server.hits)
    assert all(hits[path] == 1 for path in hits), hits  # retries: 0, one request per URL
    assert len(hits) == 12 - 1  # every sent URL, the null one never
    before = _digest(run)
    again = cli("run", str(m), "-o", str(run), "--no-progress")
    assert dict(server.hits) == hits, "a rerun of a finished run requested images again"
    assert _digest(run) == before
    assert "2 shard-phase(s) already done" in again.stdout + again.stderr


def test_a_shard_failing_midway_reruns_to_the_same_bytes_without_downloading(tmp_path, server):
    photos = real_images("JPEG", 96)
    inputs = tmp_path / "in"
    inputs.mkdir()
    lines = ["uid,url,caption"]
    for k, (name, data, caption) in enumerate(photos[:6]):
        lines.append(f"u{k},{server.add(f'/p/{name}.jpg', data)},{caption.replace(',', '')}")
    lines.append(f"u6,{server.url('/p/gone.jpg')},Gone.")
    (inputs / "urls.csv").write_text("\n".join(lines) + "\n")
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: i2d-fault
        source:
          kind: img2dataset
          paths: ["{inputs}/urls.csv"]
          id_col: uid
          output_format: parquet
          resize_mode: "no"
          encode_format: png
          encode_quality: 3
          thread_count: 4
          batch_rows: 2
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "clean"), "--no-progress")
    clean_hits = dict(server.hits)
    assert all(n == 1 for n in clean_hits.values()) and len(clean_hits) == 7

    run = tmp_path / "run"
    fault = json.dumps([{"point": "sink", "shard": "00000", "after": 2, "action": "raise"}])
    failed = cli("run", str(m), "-o", str(run), "--no-progress", check=False, env={"CURATE_FAULTS": fault})
    assert failed.returncode != 0 and "00000" in failed.stdout + failed.stderr
    assert not (run / "completions" / "p0-00000.json").exists()
    assert (run / "downloads" / "00000" / "complete.json").exists()
    hits = dict(server.hits)
    assert all(n == 2 for n in hits.values())  # the clean run's and this run's downloads

    cli("run", str(m), "-o", str(run), "--no-progress")
    assert dict(server.hits) == hits, "the rerun downloaded again"
    assert _digest(run) == _digest(tmp_path / "clean")
    read = _stats(run)
    assert read["drops"] == {"http_404": 1} and read["rows_out"] == 6
    assert read["metrics"]["downloads_reused"]["sum"] == 1
    table = _output(run)
    assert table.column("id").to_pylist() == [f"u{k}" for k in range(6)]
    assert {im[0]["mime"] for im in table.column("images").to_pylist()} == {"image/png"}


@pytest.mark.slow
def test_a_run_killed_mid_download_resumes_from_the_finished_download_files(tmp_path, server):
    """SIGKILL of the driver while img2dataset waits on a URL: no downloader survives it, and the rerun
    requests only what the unfinished download file holds."""
    psutil = pytest.importorskip("psutil")
    photos = real_images("JPEG", 96)
    urls = [server.add(f"/k/{name}.jpg", data) for name, data, _ in photos[:4]]
    urls.append(server.add("/k/hang.jpg", photos[4][1], delay="hang"))
    urls.append(server.add("/k/after.jpg", photos[5][1]))
    server.watch = {"/k/hang.jpg"}
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "urls.jsonl").write_text("".join(json.dumps({"url": u}) + "\n" for u in urls))
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: i2d-kill
        source:
          kind: img2dataset
          paths: ["{inputs}/urls.jsonl"]
          caption_col: null
          samples_per_download_shard: 2
          timeout: 60
          thread_count: 2
        sink: {{kind: parquet}}
        executor: {{kind: local, workers: 1}}
        """)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(m), "-o", str(run), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert server.seen.wait(120), "img2dataset never reached the hanging URL"
        jobs = [p for p in psutil.process_iter(["cmdline"])
                if "curate.readers.img2dataset" in " ".join(p.info["cmdline"] or [])
                and str(run) in " ".join(p.info["cmdline"] or [])]
        downloaders = jobs + [c for j in jobs for c in j.children(recursive=True)]
        assert len(jobs) == 1 and len(downloaders) >= 3  # the child, img2dataset's pool process and logger
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 10
        while (alive := [d for d in downloaders if _running(d)]) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive, f"downloaders outlived the killed run: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run / "downloads" / "00000" / "complete.json").exists()
    first = dict(server.hits)
    assert all(first[f"/k/{name}.jpg"] == 1 for name, _, _ in photos[:4])
    server.release.set()
    cli("run", str(m), "-o", str(run), "--no-progress")
    extra = Counter(server.hits) - Counter(first)
    assert set(extra) <= {"/k/hang.jpg", "/k/after.jpg"}, extra  # files 0 and 1 were finished: not fetched again
    assert _output(run).num_rows == 6


def _running(proc) -> bool:
    """True while ``proc`` runs (a zombie left to an init that does not reap counts as gone)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------ fast checks, no download
def _reader(**params) -> Img2DatasetReader:
    return Img2DatasetReader(Img2DatasetReader.Params(**params))


def test_input_files_are_checked_up_front(tmp_path):
    pq.write_table(pa.table({"link": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "links.parquet")
    with pytest.raises(ConfigError, match=r"links\.parquet: source\.url_col: no column 'url'"):
        _reader(paths=[str(tmp_path / "links.parquet")]).shards()
    assert len(_reader(paths=[str(tmp_path / "links.parquet")], url_col="link").shards()) == 1
    with pytest.raises(ConfigError, match=r"links\.parquet: source\.caption_col: no column 'text'"):
        _reader(paths=[str(tmp_path / "links.parquet")], url_col="link", caption_col="text").shards()
    (tmp_path / "fake.parquet").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    with pytest.raises(ConfigError, match=r"fake\.parquet: unreadable Parquet file"):
        _reader(paths=[str(tmp_path / "fake.parquet")]).shards()
    (tmp_path / "list.csv").write_bytes((tmp_path / "links.parquet").read_bytes())
    with pytest.raises(ConfigError, match=r"list\.csv: not a CSV file: looks like Parquet"):
        _reader(paths=[str(tmp_path / "list.csv")]).shards()
    (tmp_path / "urls.jsonl").write_text('{"url": "http://127.0.0.1:9/a.jpg"}\n{"url": \n')
    with pytest.raises(ConfigError, match=r"urls\.jsonl: not a JSON Lines file that can be read"):
        _reader(paths=[str(tmp_path / "urls.jsonl")], caption_col=None).shards()
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    with pytest.raises(ConfigError, match=r"urls\.txt: source\.input_format: cannot tell"):
        _reader(paths=[str(tmp_path / "urls.txt")]).shards()


def test_params_refuse_what_img2dataset_would_refuse_later():
    with pytest.raises(ValueError, match="png's compression level"):
        _reader(paths=["x.parquet"], encode_format="png", encode_quality=95)
    with pytest.raises(ValueError, match="img2dataset's own column names"):
        _reader(paths=["x.parquet"], save_additional_columns=["status"])
    with pytest.raises(ValueError, match="resize_mode"):
        _reader(paths=["x.parquet"], resize_mode="stretch")


def test_large_files_are_cut_into_row_ranges(tmp_path):
    urls = [f"http://127.0.0.1:9/{i}.jpg" for i in range(10)]
    pq.write_table(pa.table({"url": urls, "caption": [str(i) for i in range(10)]}), tmp_path / "u.parquet",
                   row_group_size=4)
    reader = _reader(paths=[str(tmp_path / "u.parquet")], shard_rows=3)
    shards = reader.shards()
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert len({s.key for s in shards}) == 4
    for s in shards:
        assert _read_rows(s, ["url"]).column("url").to_pylist() == urls[s.start:s.stop]
    (tmp_path / "u.tsv").write_text("url\tcaption\n" + "".join(f"{u}\t{i}\n" for i, u in enumerate(urls)))
    tsv = _reader(paths=[str(tmp_path / "u.tsv")], shard_rows=6).shards()
    assert [(s.start, s.stop) for s in tsv] == [(0, 6), (6, 10)]
    assert _read_rows(tsv[1], ["url", "caption"]).column("url").to_pylist() == urls[6:]


@pytest.mark.parametrize("status,message,reason", [
    ("failed_to_download", "HTTP Error 404: Not Found", "http_404"),
    ("failed_to_download", "HTTP Error 503: Service Unavailable", "http_503"),
    ("failed_to_download", "timed out", "timeout"),
    ("failed_to_download", "<urlopen error timed out>", "timeout"),
    ("failed_to_download", "The read operation timed out", "timeout"),
    ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive", "disallowed_by_x_robots_tag"),
    ("failed_to_download", "<urlopen error [Errno 111] Connection refused>", "download_failed"),
    ("failed_to_download", "<urlopen error unknown url type: ftp>", "download_failed"),
    ("failed_to_download", "hash mismatch", "hash_mismatch"),
    ("failed_to_resize", "Image decoding error", "undecodable_image"),
    ("failed_to_resize", "image area too large", "image_too_large"),
    ("failed_to_resize", "image too small", "image_too_small"),
    ("failed_to_resize", "aspect ratio too large", "aspect_ratio_too_large"),
    ("failed_to_resize", "OpenCV(4.10) error: (-215:Assertion failed)", "resize_failed"),
    ("missing", "img2dataset wrote no record for this row", "download_failed"),
])
def test_failure_reasons(status, message, reason):
    assert failure_reason(status, message) == reason

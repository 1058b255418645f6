"""``curate report``: score distributions recorded at filter time, output profiles, and the HTML page.

Two small real runs in this process: a token run (heuristics → select → tokenize → utk, Parquet and
WebDataset; hostile ids) and an interleaved image run (no stages, no tokens; a partitioned Arrow sink
with hostile partition values, JSONL, WebDataset). The report is checked for content and escaping, and
opened in headless Chromium through the DevTools protocol (a stdlib websocket client below): no console
error, every image decoded, a screenshot that is not blank.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import ConfigError
from curate.output_profile import profile_output, profile_run
from curate.report import write_report
from curate.stats import ScoreHistogram, StageStats
from tests.conftest import cli, make_text, write_jsonl, write_manifest

ROOT = Path(__file__).resolve().parents[1]
HOSTILE_ID = "<img src=x onerror=alert(1)>"
HOSTILE_PARTS = ["plain", "<b>&\"'x", "../up"]


def _execute(manifest: Path, out: Path) -> Path:
    from rich.console import Console

    from curate.driver import execute
    from curate.manifest import load

    execute(load(manifest, output=str(out)), console=Console(file=io.StringIO()), show_progress=False)
    return out


@pytest.fixture(scope="module")
def token_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-tokens")
    for f in range(3):
        rows = [{"id": f"{HOSTILE_ID}-{i}" if f == 0 else f"d{f}-{i}",  # in the lineage of the samples shown
                 "text": make_text(f * 40 + i, 20 + (i * 37) % 200) + (" 1234 5678 90" * 8 if i % 9 == 4 else "")}
                for i in range(40)]
        write_jsonl(root / "in" / f"p{f}.jsonl", rows)
    m = write_manifest(root / "m.yaml", f"""
        name: report-tokens
        seed: 5
        source: {{kind: jsonl, paths: ["{root}/in/*.jsonl"], id_field: id, batch_rows: 16}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - heuristics: {{min_words: 40, max_digit_ratio: 0.2, quarantine: true}}
          - select:
              where: [{{column: scores.heuristics.digit_ratio, max: 0.15}}]
              top: {{column: scores.heuristics.n_words, fraction: 0.8}}
          - tokenize: {{}}
          - utk: {{seq_len: 512, chunks: [2, 3], augment_fraction: 1.0, backtrace: true}}
        sink:
          - {{kind: parquet}}
          - {{kind: webdataset, shard_samples: 10}}
        executor: {{kind: local, workers: 1}}
        """)
    return _execute(m, root / "run")


def _png(seed: int, size: int = 48) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * np.array([255, 160, 90]) + seed * 37 % 90).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-images")
    rows = []
    for i in range(12):
        texts, images = [], []
        for k in range(i % 4):
            texts += [f"paragraph {k} of row {i}", None]
            images += [None, {"bytes": _png(i * 10 + k), "mime": "image/png", "sha256": None, "width": 48,
                              "height": 48}]
        texts.append(f"closing text of row {i}")
        images.append(None)
        meta = {"insert": {"kind": "text", "depth": (i % 5) / 4, "depth_actual": (i % 5) / 4}} if i % 2 else {}
        rows.append({"id": f"r{i}", "texts": texts, "images": images, "source": "gen", "meta": json.dumps(meta),
                     "part": HOSTILE_PARTS[i % 3]})
    (root / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "in" / "rows.parquet")
    m = write_manifest(root / "m.yaml", f"""
        name: report-images
        seed: 1
        source: {{kind: parquet, paths: ["{root}/in/*.parquet"], schema: table, id_field: id}}
        stages: []
        sink:
          - {{kind: arrow, partition_by: part}}
          - {{kind: jsonl}}
          - {{kind: webdataset}}
        executor: {{kind: local, workers: 1}}
        """)
    return _execute(m, root / "run")


# ---------------------------------------------------------------------- stats: ScoreHistogram
def test_score_histogram_merges_exactly_and_percentiles_are_close():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(3, 2, 3000), -rng.lognormal(0, 1, 500), np.zeros(40),
                             [np.nan] * 7, [np.inf] * 2, [-np.inf]])
    rng.shuffle(values)
    whole = ScoreHistogram()
    whole.add_array(pa.array(list(values) + [None] * 5, pa.float64()))
    parts = ScoreHistogram()
    for chunk in np.array_split(values, 7):
        h = ScoreHistogram()
        h.add_array(pa.array(chunk))
        parts.merge(ScoreHistogram.from_dict(json.loads(json.dumps(h.to_dict()))))  # through JSON, as shards do
    parts.null += 5
    assert parts.buckets == whole.buckets and parts.count == whole.count == 3540
    assert (parts.nan, parts.null, parts.inf, parts.neg_inf) == (whole.nan, whole.null, whole.inf, whole.neg_inf) == (7, 5, 2, 1)
    finite = values[np.isfinite(values)]
    assert parts.min == whole.min == finite.min() and parts.max == whole.max == finite.max()
    assert parts.total == pytest.approx(finite.sum()) and whole.total == pytest.approx(finite.sum())
    assert sum(whole.buckets.values()) == whole.count and whole.buckets[0] == 40
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        exact = np.quantile(finite, q)
        assert whole.percentile(q) == pytest.approx(exact, rel=0.07, abs=1e-9), q  # 40 buckets per decade
    d = whole.to_dict()
    assert d["count"] + d["nan"] + d["null"] + d["inf"] + d["neg_inf"] == len(values) + 5
    assert set(d) == {"count", "sum", "min", "max", "mean", "p50", "p90", "p99", "nan", "null", "inf", "neg_inf",
                      "per_decade", "buckets"}


def test_score_histogram_takes_integers_and_booleans_and_skips_other_types():
    h = ScoreHistogram()
    assert h.add_array(pa.array([3, 0, None, 1000], pa.int32()))
    assert h.add_array(pa.chunked_array([pa.array([True, False, True])]))
    assert not h.add_array(pa.array(["a", "b"]))
    assert not h.add_array(pa.array([[1.0], [2.0]]))
    assert (h.count, h.null, h.min, h.max) == (6, 1, 0.0, 1000.0)
    assert h.buckets[0] == 2 and h.percentile(0.0) == 0.0 and h.percentile(1.0) == 1000.0
    bins = h.bins()
    assert [b[2] for b in bins] == [2, 2, 1, 1] and bins[0] == (0.0, 0.0, 2)


def test_stage_stats_keep_old_files_loading_and_merge_thresholds():
    old = {"rows_in": 5, "rows_out": 4, "drops": {"x": 1}, "tokens_out": 0, "bytes_out": 9, "seconds": 0.5,
           "metrics": {}}
    st = StageStats.from_dict(old)
    assert st.to_dict() == old  # no scores or thresholds: no new keys
    st.threshold("n_words", 50, None)
    st.threshold("n_words", 40, 900)
    st.threshold("ppl", float("inf"), float("nan"))  # nothing to draw: not recorded
    other = StageStats(thresholds={"n_words": {"min": 60.0, "max": None}})
    st.merge(other)
    assert st.to_dict()["thresholds"] == {"n_words": {"min": 60.0, "max": 900.0}}


# ---------------------------------------------------------------------- stats recorded by a real run
def test_filters_record_score_distributions_and_thresholds(token_run):
    stats = json.loads((token_run / "stats.json").read_text())
    heur, sel = stats["stages"]["heuristics"], stats["stages"]["select"]
    assert set(heur["scores"]) == {"n_chars", "n_words", "n_lines", "mean_word_length", "alpha_ratio", "digit_ratio",
                                   "upper_ratio", "whitespace_ratio", "punct_ratio"}
    for metric, h in heur["scores"].items():  # every row the filter saw was scored once
        assert h["count"] + h["nan"] + h["null"] == heur["rows_in"] == 120, metric
    assert heur["scores"]["n_words"]["min"] >= 20 and heur["drops"]["n_words_below_min"] > 0
    assert heur["thresholds"] == {"digit_ratio": {"min": None, "max": 0.2}, "n_words": {"min": 40.0, "max": None}}
    cut = stats["global"]["select"]["value"]
    assert sel["thresholds"] == {"scores.heuristics.digit_ratio": {"min": None, "max": 0.15},
                                 "scores.heuristics.n_words": {"min": cut, "max": None}}
    assert "scores" not in sel  # select writes no scores of its own
    # the merged histogram is the sum of the shards' histograms (3 input shards, several batches each)
    shards = [json.loads(p.read_text()) for p in sorted((token_run / "stats").glob("p0-*.json"))]
    assert len(shards) == 3
    merged = ScoreHistogram()
    for s in shards:
        merged.merge(ScoreHistogram.from_dict(s["heuristics"]["scores"]["n_words"]))
    assert merged.to_dict() == heur["scores"]["n_words"]
    assert sum(s["heuristics"]["rows_in"] for s in shards) == merged.count


# ---------------------------------------------------------------------- output profiles
def test_profile_of_token_outputs(token_run):
    profiles = profile_run(token_run)
    assert list(profiles) == ["sink:parquet", "sink:webdataset"]
    pq_prof, wds_prof = profiles["sink:parquet"], profiles["sink:webdataset"]
    assert pq_prof["groups"] == wds_prof["groups"] and pq_prof["format"] == "parquet"
    g = pq_prof["groups"]["all"]
    table = pq.read_table(sorted((token_run / "parquet").glob("*.parquet")), columns=["n_tokens"])
    n = np.array(table.column("n_tokens").to_pylist())
    assert g["samples"] == pq_prof["samples"] == len(n) > 0
    assert g["tokens"]["sum"] == n.sum() and g["tokens"]["max"] == n.max() <= 512
    assert g["tokens"]["p50"] == pytest.approx(np.percentile(n, 50))
    hist = g["token_histogram"]
    assert sum(hist["counts"]) == len(n) and hist["edges"][0] <= n.min() and hist["edges"][-1] >= 2 ** 20
    assert hist["edges"][4] == pytest.approx(hist["edges"][0] * 2)  # quarter-octaves
    assert g["images_per_sample"] is None and g["evidence_depth"] is None


def test_profile_of_partitioned_interleaved_outputs(image_run):
    profiles = profile_run(image_run)
    arrow = profiles["sink:arrow"]
    folders = sorted(json.loads((image_run / "arrow" / "index.json").read_text())["partitions"])
    assert list(arrow["groups"]) == folders and len(folders) == 3
    assert sum(g["samples"] for g in arrow["groups"].values()) == arrow["samples"] == 12
    total = Counter()
    for g in arrow["groups"].values():
        assert g["tokens"] is None and g["token_histogram"] is None
        total.update({k: v for k, v in g["images_per_sample"].items()})
    assert total == {"0": 3, "1": 3, "2": 3, "3": 3}
    depth = sum(np.array(g["evidence_depth"]["counts"]) for g in arrow["groups"].values())
    assert depth.tolist() == [1, 0, 2, 0, 0, 1, 0, 1, 0, 1]  # odd rows: depths .25, .75, 0, .5, 1, .25
    for label in ("sink:jsonl", "sink:webdataset"):  # the same rows, read row by row
        g = profiles[label]["groups"]["all"]
        assert g["images_per_sample"] == {"0": 3, "1": 3, "2": 3, "3": 3}, label
        assert g["evidence_depth"]["counts"] == depth.tolist(), label


def test_profile_reads_evidence_and_needle_depths(tmp_path):
    from curate.plugins import kinds_of
    from curate.sinks.base import write_index

    evidence = pa.list_(pa.struct([("segment", pa.int32()), ("depth", pa.float32())]))
    qa = pa.table({"id": ["a", "b"], "n_tokens": pa.array([3000, 70000], pa.int32()),
                   "evidence": pa.array([[{"segment": 0, "depth": 0.05}, {"segment": 1, "depth": 0.95}],
                                         [{"segment": 2, "depth": 0.5}]], evidence)})
    target = pa.struct([("image", pa.int32()), ("row", pa.int32()), ("col", pa.int32())])
    needle = pa.table({"id": ["n0", "n1"], "meta": [json.dumps({"grid": 2, "images": 2}), json.dumps({"grid": 2, "images": 2})],
                       "target": pa.array([{"image": 2, "row": 2, "col": 2}, None], target)})
    for kind, table in (("parquet", qa), ("jsonl", needle)):
        cls = kinds_of("sink")[kind]
        sink = cls(cls.Params(), tmp_path)
        writer = sink.writer("00000")
        writer.write(table.to_batches()[0])
        write_index(sink, writer.close(), table.column_names)
    qa_prof = profile_output(tmp_path / "parquet")["groups"]["all"]
    assert qa_prof["evidence_depth"]["counts"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert qa_prof["tokens"]["sum"] == 73000 and qa_prof["images_per_sample"] is None
    needle_prof = profile_output(tmp_path / "jsonl")["groups"]["all"]
    assert needle_prof["evidence_depth"]["counts"] == [0] * 9 + [1]  # the last of 8 cells; the negative has none
    assert needle_prof["tokens"] is None and needle_prof["samples"] == 2
    with pytest.raises(ConfigError, match="no index.json"):
        profile_output(tmp_path)


# ---------------------------------------------------------------------- the report
def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_report_of_token_run(token_run, tmp_path):
    result = write_report(token_run, html_path=tmp_path / "r.html", png_dir=tmp_path / "png")
    page = result["html"].read_text(encoding="utf-8")
    for anchor in ("summary", "lengths", "scores", "drops", "time", "samples"):
        assert f"<h2 id='{anchor}'>" in page
    assert {"token_lengths-parquet", "scores-heuristics-n_words", "scores-heuristics-digit_ratio", "drops_by_reason",
            "time_per_stage"} <= set(result["pngs"])
    for name, path in result["pngs"].items():
        assert re.fullmatch(r"[a-z0-9_-]+", name) and path == tmp_path / "png" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(_embedded_pngs(page)) == sorted(p.read_bytes() for p in result["pngs"].values())
    stats = json.loads((token_run / "stats.json").read_text())
    fingerprint = json.loads((token_run / "fingerprint").read_text())["digest"]
    assert fingerprint in page and "heuristics → select → tokenize → utk" in page
    cut = stats["global"]["select"]["value"]
    assert f"heuristics min = 40; select min = {cut:.6g}" in page  # both bounds drawn on heuristics' n_words
    assert "select max = 0.15" in page and "The same samples as sink:parquet." in page
    assert "n_words_below_min" in page and "<script" not in page.lower()
    # samples: UtK windows decoded with the run tokenizer, chunks coloured by document, ids escaped
    assert "<pre class='tokens'>" in page and "class='c1'" in page and "class='sp'" in page and "backtraces" in page
    assert HOSTILE_ID not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    again = write_report(token_run, html_path=tmp_path / "r2.html", png_dir=tmp_path / "png2")
    assert sorted(again["pngs"]) == sorted(result["pngs"])
    assert again["html"].read_bytes() == result["html"].read_bytes()  # same run, same page


def test_report_escapes_hostile_stats(token_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(token_run, run)
    stats = json.loads((run / "stats.json").read_text())
    evil = "<script>alert('x')</script>"
    heur = stats["stages"]["heuristics"]
    stats["stages"][f"stage{evil}"] = {**heur, "drops": {f"reason\"'>{evil}": 3},
                                       "thresholds": {f"scores.heuristics.n_words{evil}": {"min": 1, "max": None},
                                                      "n_words": {"min": None, "max": 500}}}
    stats["name"] = evil
    (run / "stats.json").write_text(json.dumps(stats))
    result = write_report(run)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert result["html"] == run / "report.html" and all(p.parent == run / "report" for p in result["pngs"].values())
    assert "<script" not in page.lower() and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "reason&quot;&#x27;&gt;&lt;script&gt;" in page
    assert "Bounds on columns without a recorded distribution" in page  # the unmatched column path
    names = [n for n in result["pngs"] if n.startswith("scores-stage")]
    assert names and all(re.fullmatch(r"[a-z0-9_-]+", n) for n in names)


def test_report_of_image_run_without_tokens_or_filters(image_run):
    result = write_report(image_run)
    page = result["html"].read_text(encoding="utf-8")
    assert "No token counts (no n_tokens or input_ids column)." in page
    assert "No filter in this run recorded scores." in page and "No stage dropped a row." in page
    assert {"images_per_sample-arrow", "evidence_depth-arrow", "time_per_stage"} <= set(result["pngs"])
    assert "drops_by_reason" not in result["pngs"]
    assert HOSTILE_PARTS[1] not in page
    assert "&quot;&lt;b&gt;&amp;\\&quot;&#x27;x&quot;" in page  # the partition value (JSON), escaped
    samples = page[page.index("<h2 id='samples'>"):]
    shown = [int(i) for i in re.findall(r"<section class='sample'><h2>r(\d+)</h2>", samples)]
    assert len(shown) == 3  # the first partition folder's rows
    assert sorted(_embedded_pngs(samples)) == sorted(_png(i * 10 + k) for i in shown for k in range(i % 4))


def test_report_refuses_an_unfinished_run(token_run, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "manifest.resolved.yaml").write_text((token_run / "manifest.resolved.yaml").read_text())
    with pytest.raises(ConfigError, match="has not finished"):
        write_report(run)
    proc = cli("report", str(run), check=False)
    assert proc.returncode == 2 and "has not finished (no stats.json)" in proc.stderr
    assert not (run / "report.html").exists()


def test_report_never_writes_into_an_output_folder(token_run):
    with pytest.raises(ConfigError, match="inside the folder of sink:parquet"):
        write_report(token_run, png_dir=token_run / "parquet" / "plots")
    assert not (token_run / "parquet" / "plots").exists()


def test_report_command(token_run, tmp_path):
    proc = cli("report", str(token_run), "--out", str(tmp_path / "page.html"), "--png-dir", str(tmp_path / "plots"))
    assert "report →" in proc.stdout and (tmp_path / "page.html").is_file()
    assert (tmp_path / "plots" / "scores-heuristics-n_words.png").is_file()


# ---------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class _WebSocket:
    """The client half of RFC 6455, enough for the DevTools protocol: masked text frames out,
    unmasked (possibly fragmented) frames in."""

    def __init__(self, url: str):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.buf = bytearray(rest)

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        size = (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16
                else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        masked = (np.frombuffer(data, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(bytes([0x81]) + size + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("chromium closed the DevTools connection")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv(self) -> dict:
        message = bytearray()
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            n = int.from_bytes(self._read(2 if n == 126 else 8), "big") if n >= 126 else n
            payload = self._read(n)
            if b0 & 0x0F == 8:
                raise ConnectionError("chromium closed the DevTools connection")
            if b0 & 0x0F in (9, 10):  # ping, pong
                continue
            message += payload
            if b0 & 0x80:
                return json.loads(message)


class _Browser:
    """Headless Chromium in its own process group, DevTools on 127.0.0.1, one page session."""

    def __init__(self, binary: str, profile: Path):
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "--hide-scrollbars",
             "--disable-extensions", "--disable-background-networking", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            assert self.proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.port = int(port)
        self.ws = _WebSocket(f"ws://127.0.0.1:{self.port}{path}")
        self.next_id, self.events = 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method, page=True)
        self.call("Emulation.setDeviceMetricsOverride", page=True, width=1200, height=900, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, page: bool = False, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if page:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = self.ws.recv()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self.events.append(reply)

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", page=True, url=path.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self.ws.recv())

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True)["result"]["value"]

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"])
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(str(p["exceptionDetails"]))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str(p.get("args")))
        return out

    def screenshot(self) -> bytes:
        height = min(int(self.evaluate("document.documentElement.scrollHeight")), 6000)
        shot = self.call("Page.captureScreenshot", page=True, format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1})
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if int(hex_port, 16) == port and state == "0A":
                    out.add(address)
    return out


def test_report_in_headless_chromium(token_run, image_run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (chromium, chromium-browser, google-chrome) on PATH or at /usr/bin/chromium")
    from PIL import Image

    pages = {"tokens": write_report(token_run, html_path=tmp_path / "tokens.html", png_dir=tmp_path / "tp")["html"],
             "images": write_report(image_run, html_path=tmp_path / "images.html", png_dir=tmp_path / "ip")["html"]}
    browser = _Browser(binary, tmp_path / "profile")
    try:
        if os.path.exists("/proc/net/tcp"):
            assert _listening_addresses(browser.port) == {"0100007F"}  # 127.0.0.1 only
        for name, page in pages.items():
            browser.open(page)
            assert browser.errors() == [], name
            images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            assert len(images) >= 3 and all(done and width > 0 for done, width in images), (name, images)
            assert browser.evaluate("document.querySelectorAll('script').length") == 0
            png = browser.screenshot()
            shot = tmp_path / f"report-{name}.png"
            shot.write_bytes(png)
            if os.environ.get("CURATE_TEST_ARTIFACTS"):
                (ROOT / "test-artifacts").mkdir(exist_ok=True)
                shutil.copy(shot, ROOT / "test-artifacts" / shot.name)
            im = Image.open(io.BytesIO(png)).convert("RGB")
            assert im.width == 1200 and im.height > 900
            assert len(im.getcolors(1 << 24)) > 200, name  # plots and images, not a blank page
            dark = (np.asarray(im).min(axis=2) < 200).mean()
            assert dark > 0.02, (name, dark)  # a good share of non-white pixels
    finally:
        browser.close()
    assert browser.proc.poll() is not None

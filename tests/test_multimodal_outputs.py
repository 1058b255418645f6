"""count_tokens on interleaved rows (text + image tokens), and `curate inspect --html` pages."""

from __future__ import annotations

import hashlib
import io
import tarfile
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest

from curate.image_tokens import ImageTokenParams
from curate.inspect_html import page, sniff_mime
from tests.conftest import cli, write_manifest

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def photos():
    from curate.testing import real_images

    return real_images()


def _tars(folder, photos):
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for k in range(3):
            members = [(f"{j}.jpg", photos[k + j][1]) for j in range(k + 1)]
            members.append(("txt", (f"Document {k}. " + " ".join(c for _, _, c in photos[k:k + 3])).encode()))
            for ext, payload in members:
                info = tarfile.TarInfo(f"doc{k}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.srcs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_count_tokens_counts_text_and_images_and_inspect_renders_html(tmp_path, photos):
    shards = tmp_path / "docs"
    _tars(shards, photos)
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: mm-count
        source: {{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved}}
        tokenizer: {{train: {{vocab_size: 300, min_frequency: 1}}}}
        stages:
          - count_tokens: {{image_tokens: {{model: internvl, max_tiles: 4}}}}
        sink: [{{kind: parquet}}, {{kind: webdataset}}]
        """)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress")
    rows = pq.read_table(sorted((run / "parquet").glob("*.parquet"))).to_pylist()
    from curate.images import image_size
    from curate.tokenizer import CurateTokenizer

    tok = CurateTokenizer.load_run(run / "tokenizer")
    counter = ImageTokenParams(model="internvl", max_tiles=4).counter()
    assert len(rows) == 3
    for row in rows:
        images = [im for im in row["images"] if im]
        expected_images = sum(counter.count(*image_size(im["bytes"])) for im in images)
        text = sum(len(tok.encode_batch([t])[0]) for t in row["texts"] if t)
        assert row["n_image_tokens"] == expected_images > 0
        assert row["n_tokens"] == text + expected_images

    # an HTML page with every image inline, from the Parquet output and from the tars
    for sink in ("parquet", "webdataset"):
        html_path = tmp_path / f"{sink}.html"
        proc = cli("inspect", str(run / sink), "-n", "3", "--html", str(html_path))
        assert "3 samples" in proc.stdout
        parser = _Tags()
        parser.feed(html_path.read_text())
        assert "script" not in parser.tags
        assert len(parser.srcs) == sum(len([im for im in r["images"] if im]) for r in rows)
        import base64

        shown = {hashlib.sha256(base64.b64decode(s.split(",", 1)[1])).hexdigest() for s in parser.srcs}
        assert shown == {im["sha256"] for r in rows for im in r["images"] if im}


def test_html_page_escapes_and_refuses_unsafe_images(photos):
    svg = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    row = {"id": "<script>alert('id')</script>", "question": "</td><script>x</script>",
           "texts": ["<b>bold?</b> & text", None, None],
           "images": [None, {"bytes": svg, "mime": "image/png", "sha256": "x", "width": 1, "height": 1},
                      {"bytes": photos[0][1], "mime": "image/svg+xml", "sha256": "y", "width": 2, "height": 2}]}
    text = page([row], "t")
    parser = _Tags()
    parser.feed(text)
    assert "script" not in parser.tags and "b" not in parser.tags
    assert len(parser.srcs) == 1 and parser.srcs[0].startswith("data:image/jpeg;base64,")  # sniffed, not declared
    assert "&lt;script&gt;" in text
    assert sniff_mime(svg) is None


def test_parquet_images_as_the_datasets_image_feature(tmp_path, photos):
    import datasets
    from PIL import Image

    shards = tmp_path / "docs"
    _tars(shards, photos)
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: mm-feature
        source: {{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved, batch_rows: 2}}
        sink: [{{kind: parquet, images: feature}}, {{kind: parquet, images: struct, path: plain}}]
        """)
    run = tmp_path / "run"
    cli("run", str(m), "-o", str(run), "--no-progress")
    files = sorted(str(p) for p in (run / "parquet").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(ds.features["images"], datasets.List) and isinstance(ds.features["images"].feature,
                                                                            datasets.Image)
    plain = pq.read_table(sorted((run / "plain").glob("*.parquet"))).to_pylist()
    assert ds.num_rows == len(plain) == 3
    for row, ref in zip(ds, plain):
        assert row["texts"] == ref["texts"]
        for im, info, want in zip(row["images"], row["image_info"], ref["images"]):
            if want is None:
                assert im is None and info is None
            else:
                assert isinstance(im, Image.Image) and im.size == (want["width"], want["height"])
                assert info == {k: want[k] for k in ("mime", "sha256", "width", "height")}

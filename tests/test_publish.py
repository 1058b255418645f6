"""`curate publish --dry-run`: the Hub repository folder loads with `datasets` config by config, row
counts match stats.json, the card's YAML is what `huggingface_hub` and `datasets` read, and building
the folder again changes nothing on disk (so a resumed upload finds its files unchanged)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest

from tests.conftest import cli, make_text, write_jsonl, write_manifest

#: Partition values that would break a naive layout: path parts, case twins, empty, null, Markdown.
HOSTILE = ["../x", "A", "a", "", None, "p|q<b>*", "é"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run: decomposed sequences in length buckets (a partitioned Parquet sink), a second,
    unpartitioned Parquet sink, a WebDataset sink, and a `card` section."""
    root = tmp_path_factory.mktemp("publish")
    for f in range(3):
        write_jsonl(root / "in" / f"part-{f}.jsonl",
                    [{"id": f"d{f}-{i}", "text": make_text(f * 100 + i, 20 + 7 * (i % 13)),
                      "lang": HOSTILE[(f * 40 + i) % len(HOSTILE)]} for i in range(40)])
    m = write_manifest(root / "m.yaml", f"""
        name: pub
        description: "Decomposed sequences | for a test"
        seed: 5
        source: {{kind: jsonl, paths: ["{root}/in/*.jsonl"], text_field: text, id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - tokenize: {{append_eos: true}}
          - pack: {{strategy: decompose, min_log2: 3, max_log2: 7}}
        sink:
          - {{kind: parquet, partition_by: bucket}}
          - {{kind: parquet, path: flat, shard_samples: 40}}
          - {{kind: webdataset}}
        card: {{license: cc-by-4.0, language: [en], tags: [synthetic], pretty_name: "Pub test"}}
        """)
    cli("run", str(m), "-o", str(root / "run"), "--no-progress")
    return root / "run"


def _card(folder: Path):
    from huggingface_hub import DatasetCard

    return DatasetCard.load(folder / "README.md")


def _load(folder: Path, config: str, cache: Path):
    import datasets

    return datasets.load_dataset(str(folder), config, split="train", cache_dir=str(cache))


def test_every_config_loads_with_the_rows_stats_json_counts(run, tmp_path):
    folder = tmp_path / "repo"
    proc = cli("publish", str(run), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder))
    assert "nothing uploaded" in proc.stdout
    assert "webdataset" in proc.stderr and "one repository holds one format" in proc.stderr
    stats = orjson.loads((run / "stats.json").read_bytes())
    card = _card(folder)
    configs = card.data.to_dict()["configs"]
    names = [c["config_name"] for c in configs]
    assert names[0] == "parquet" and configs[0].get("default") is True
    assert "flat" in names and not any("webdataset" in n for n in names)
    buckets = [n for n in names if n.startswith("parquet-")]
    assert len(buckets) >= 3
    rows = {}
    for name in names:
        ds = _load(folder, name, tmp_path / "cache")
        rows[name] = ds.num_rows
        assert set(ds.column_names) >= {"input_ids", "n_tokens", "doc_offsets"}
        if name.startswith("parquet-"):  # one bucket per config: every row in it has that bucket
            assert len(set(ds["bucket"])) == 1
    assert rows["parquet"] == stats["outputs"]["sink:parquet"]["samples"] == sum(rows[b] for b in buckets)
    assert rows["flat"] == stats["outputs"]["sink:flat"]["samples"] == rows["parquet"]
    # the files are the run's own files, not copies
    for p in (folder / "data").rglob("*.parquet"):
        assert p.stat().st_nlink >= 2


def test_the_card_yaml_is_what_the_hub_and_datasets_read(run, tmp_path):
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    folder = tmp_path / "repo"
    cli("publish", str(run), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder))
    card = _card(folder)
    data = card.data.to_dict()
    assert DatasetCardData(**data).to_dict() == data  # round-trips through the card tooling
    assert data["license"] == "cc-by-4.0" and data["language"] == ["en"] and data["pretty_name"] == "Pub test"
    assert set(data["tags"]) >= {"synthetic", "curate", "long-context"}
    assert data["task_categories"] == ["text-generation"]
    assert data["size_categories"] == ["n<1K"]
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    assert set(configs) == {c["config_name"] for c in data["configs"]}
    flat = _load(folder, "flat", tmp_path / "cache")
    assert infos["flat"].features == flat.features
    assert infos["flat"].splits["train"].num_examples == flat.num_rows
    body = card.text
    fingerprint = orjson.loads((run / "fingerprint").read_bytes())
    assert fingerprint["digest"] in body and "| seed | 5 |" in body
    assert "Decomposed sequences \\| for a test" in body  # a pipe from the manifest cannot open a table cell
    assert "## Stages" in body and "| read |" in body and "```yaml" in body and "append_eos: true" in body
    # the stages are listed in pipeline order, sinks last
    order = [line.split("|")[1].strip() for line in body.split("## Stages")[1].split("\n\n")[1].splitlines()[2:]]
    assert order[:3] == ["read", "tokenize", "pack"] and order[-1] == "sink:webdataset"


def _written_run(root: Path, batch, **sink_params) -> Path:
    """A finished run directory whose one Parquet sink holds ``batch``, written by the real sink writer."""
    import yaml

    from curate.plugins import kinds_of
    from curate.sinks.base import write_index

    cls = kinds_of("sink")["parquet"]
    sink = cls(cls.Params(**sink_params), root)
    writer = sink.writer("00000")
    writer.write(batch)
    index = write_index(sink, writer.close(), batch.schema.names)
    (root / "manifest.resolved.yaml").write_text(yaml.safe_dump(
        {"name": "hostile", "seed": 0, "source": {"kind": "jsonl", "paths": ["x"]},
         "sink": {"kind": "parquet", **sink_params}}))
    (root / "stats.json").write_bytes(orjson.dumps({"name": "hostile", "stages": {}, "outputs": {
        "sink:parquet": {"path": str(sink.directory), "files": len(index["shards"]),
                         "samples": index["total_samples"], "bytes": index["total_bytes"]}}}))
    return root


def test_hostile_partition_values_give_safe_unique_configs_that_load(tmp_path):
    import pyarrow as pa

    batch = pa.RecordBatch.from_pydict({"id": [f"x{i}|<b>" for i in range(35)],
                                        "lang": [HOSTILE[i % len(HOSTILE)] for i in range(35)]})
    run = _written_run(tmp_path / "run", batch, partition_by="lang")
    folder = tmp_path / "repo"
    cli("publish", str(run), "--repo", "me/hostile", "--dry-run", "--no-report", "--folder", str(folder))
    names = [c["config_name"] for c in _card(folder).data.to_dict()["configs"]]
    assert len(names) == 1 + len(HOSTILE)
    assert len({n.casefold() for n in names}) == len(names)
    for n in names:
        assert n and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in n), n
        assert (folder / "data" / n).resolve().parent == (folder / "data").resolve() or n == "parquet"
    got = {}
    for n in names[1:]:
        ds = _load(folder, n, tmp_path / "cache")
        assert len(set(ds["lang"])) == 1
        got[ds["lang"][0]] = ds.num_rows
    assert got == {v: 5 for v in HOSTILE}
    assert _load(folder, "parquet", tmp_path / "cache").num_rows == 35
    # nothing escaped the repository folder
    assert all(folder.resolve() in p.resolve().parents for p in folder.rglob("*"))


def test_building_again_changes_nothing_on_disk(run, tmp_path):
    folder = tmp_path / "repo"
    args = ("publish", str(run), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder))
    cli(*args)

    def snapshot():
        return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns,
                                                  hashlib.sha256(p.read_bytes()).hexdigest())
                for p in folder.rglob("*") if p.is_file()}

    first = snapshot()
    cli(*args)
    assert snapshot() == first


def test_a_complete_compaction_is_published_instead_of_the_original(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cli("compact", str(copy), "--sink", "flat", "--target-samples", "1000")
    folder = tmp_path / "repo"
    cli("publish", str(copy), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder))
    flat = sorted((folder / "data" / "flat").iterdir())
    compacted = sorted((copy / "compacted" / "flat").glob("*.parquet"))
    assert len(flat) == len(compacted) == 1
    assert flat[0].stat().st_ino == compacted[0].stat().st_ino
    assert _load(folder, "flat", tmp_path / "cache").num_rows == orjson.loads(
        (copy / "stats.json").read_bytes())["outputs"]["sink:flat"]["samples"]
    # --original ignores it; and a compaction of another output (index.json changed) is never used
    cli("publish", str(copy), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder), "--original")
    assert len(list((folder / "data" / "flat").iterdir())) > 1
    state = copy / "compacted" / "flat" / ".compact-state.json"
    s = orjson.loads(state.read_bytes())
    s["settings"]["source_index_sha256"] = "0" * 64
    state.write_bytes(orjson.dumps(s))
    cli("publish", str(copy), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder))
    assert len(list((folder / "data" / "flat").iterdir())) > 1


def test_the_webdataset_sink_publishes_to_its_own_repository(run, tmp_path):
    import datasets

    folder = tmp_path / "repo"
    cli("publish", str(run), "--repo", "me/pub-wds", "--dry-run", "--no-report", "--folder", str(folder),
        "--sink", "webdataset")
    names = [c["config_name"] for c in _card(folder).data.to_dict()["configs"]]
    assert names == ["webdataset"]
    ds = datasets.load_dataset(str(folder), "webdataset", split="train", cache_dir=str(tmp_path / "cache"))
    stats = orjson.loads((run / "stats.json").read_bytes())
    assert ds.num_rows == stats["outputs"]["sink:webdataset"]["samples"]
    assert "input_ids.npy" in ds.column_names


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "-a/b", "a/b..c", "a/b--c", "a/" + "x" * 97, "a/b.git"])
def test_a_bad_repo_id_is_refused_before_anything_is_built(run, tmp_path, repo):
    proc = cli("publish", str(run), "--repo", repo, "--dry-run", "--folder", str(tmp_path / "repo"), check=False)
    assert proc.returncode == 2 and "namespace/name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "repo").exists()


def test_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    proc = cli("publish", str(tmp_path / "run"), "--repo", "me/x", "--dry-run", check=False)
    assert proc.returncode == 2 and "not a curate run directory" in proc.stderr
    (tmp_path / "run" / "manifest.resolved.yaml").write_text("name: x\nsink: {kind: parquet}\n")
    proc = cli("publish", str(tmp_path / "run"), "--repo", "me/x", "--dry-run", check=False)
    assert proc.returncode == 2 and "has not finished" in proc.stderr
    assert os.listdir(tmp_path / "run") == ["manifest.resolved.yaml"]


def test_the_card_names_teacher_models_with_their_prompt_template_hash(tmp_path):
    import pyarrow as pa
    import yaml

    from curate.registry import get_stage

    run = _written_run(tmp_path / "run", pa.RecordBatch.from_pydict({"id": ["a"], "text": ["t"]}))
    resolved = yaml.safe_load((run / "manifest.resolved.yaml").read_text())
    cls = get_stage("segment_qa")
    params = cls.Params.model_validate({"teacher": {"backend": "openai", "model": "tiny-teacher",
                                                    "base_url": "http://127.0.0.1:9/v1"}})
    resolved["stages"] = [{"segment_qa": params.model_dump(mode="json")}]
    (run / "manifest.resolved.yaml").write_text(yaml.safe_dump(resolved))
    folder = tmp_path / "repo"
    cli("publish", str(run), "--repo", "me/t", "--dry-run", "--no-report", "--folder", str(folder))
    body = (folder / "README.md").read_text()
    expected = cls(params, "segment_qa").template_hash
    assert "tiny-teacher" in body and expected in body
    line = next(x for x in body.splitlines() if "tiny-teacher" in x)
    assert "| segment\\_qa | openai | tiny-teacher |" in line


def test_curate_publish_uploads_the_folder_it_built_and_a_rerun_sends_nothing(run, tmp_path):
    """The whole command against the loopback fake of the Hub's API (tests/fake_hub.py)."""
    from tests.fake_hub import FakeHub
    from tests.test_hub_upload import TOKEN, hub_env

    folder = tmp_path / "repo"
    args = ("publish", str(run), "--repo", "me/pub", "--no-report", "--folder", str(folder), "--private")
    with FakeHub(tokens={TOKEN}, lfs_threshold=50_000) as hub:
        env = {**hub_env(hub.url, tmp_path), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
        proc = cli(*args, env=env)
        assert "uploaded" in proc.stdout and TOKEN not in proc.stdout + proc.stderr
        local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                 if p.is_file() and ".cache" not in p.parts}
        remote = hub.snapshot("me/pub")
        remote.pop(".gitattributes")  # the Hub's own, made with the repository
        assert remote == local
        assert hub.repos[("datasets", "me/pub")].private
        mark = hub.mark()
        cli(*args, env=env)
        assert not [c for c in hub.calls_since(mark) if c.kind in ("commit", "lfs_batch", "lfs_put", "lfs_part",
                                                                   "preupload")]


def test_interleaved_images_publish_as_the_datasets_image_feature(tmp_path):
    """An interleaved output written with `images: feature`: the card's features say Image, `datasets`
    hands back PIL images, the card counts images per sample and tags the task image-text-to-text."""
    import hashlib as h

    import pyarrow as pa

    from curate.schema import INTERLEAVED
    from curate.testing import real_images

    photos = real_images(size=128)[:4]
    rows = []
    for i in range(6):
        n = i % 3  # 0, 1 or 2 images per sample
        texts, images = [], []
        for k in range(n):
            _, data, _ = photos[(i + k) % len(photos)]
            texts += [f"text {i}.{k}", None]
            images += [None, {"bytes": data, "mime": "image/jpeg", "sha256": h.sha256(data).hexdigest(),
                              "width": 64, "height": 48}]
        texts.append(f"closing text {i}")
        images.append(None)
        rows.append({"id": f"doc-{i}", "texts": texts, "images": images, "source": "t", "meta": "{}"})
    batch = pa.RecordBatch.from_pylist(rows, schema=INTERLEAVED)
    run = _written_run(tmp_path / "run", batch, images="feature")
    folder = tmp_path / "repo"
    cli("publish", str(run), "--repo", "me/mm", "--dry-run", "--no-report", "--folder", str(folder))
    card = _card(folder)
    data = card.data.to_dict()
    assert data["task_categories"] == ["image-text-to-text"]
    assert data["dataset_info"][0]["features"][2] == {"name": "images", "list": "image"}
    ds = _load(folder, "parquet", tmp_path / "cache")
    assert ds.num_rows == 6
    import io

    from PIL import Image

    first = [im for im in ds[1]["images"] if im is not None]
    assert len(first) == 1 and first[0].size == Image.open(io.BytesIO(photos[1][1])).size
    assert "## Images per sample" in card.text and "| parquet | 0: 2; 1: 2; 2: 2 |" in card.text


def test_data_files_match_only_this_builds_files(run, tmp_path):
    """An earlier publish with another file count leaves its files on the Hub: the config's data_files
    must not read them too (the Hub keeps files the folder no longer has)."""
    folder = tmp_path / "repo"
    cli("publish", str(run), "--repo", "me/pub", "--dry-run", "--no-report", "--folder", str(folder))
    flat = folder / "data" / "flat"
    names = sorted(p.name for p in flat.iterdir())
    n = len(names)
    assert n > 1 and names[0] == f"train-00000-of-{n:05d}.parquet"
    stale = flat / "train-00000-of-00001.parquet"  # as a compacted publish before this one left it
    stale.write_bytes((flat / names[0]).read_bytes())
    assert _load(folder, "flat", tmp_path / "cache").num_rows == orjson.loads(
        (run / "stats.json").read_bytes())["outputs"]["sink:flat"]["samples"]


def test_a_cut_data_file_stops_the_publish(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    victim = sorted((copy / "flat").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    proc = cli("publish", str(copy), "--repo", "me/pub", "--dry-run", "--no-report", "--folder",
               str(tmp_path / "repo"), check=False)
    assert proc.returncode == 2 and victim.name in proc.stderr and "index.json says" in proc.stderr


def test_file_names_keep_their_order_past_99999_files():
    from types import SimpleNamespace

    from curate.hub_layout import HubConfig

    output = SimpleNamespace(extension="parquet")
    c = HubConfig("x", output, None, [Path(f"/f{i}") for i in range(100_001)])  # type: ignore[arg-type]
    names = c.file_names()
    assert names == sorted(names) and names[-1] == "train-100000-of-100001.parquet"


def test_markdown_block_markers_from_the_run_stay_text():
    from curate.dataset_card import cell

    assert cell("# Title\n\n---\nline") == "\\# Title --- line"
    assert cell("- item").startswith("\\-") and cell("1. one") == "1\\. one" and cell("a|b") == "a\\|b"

"""`curate compact`: a finished output rewritten into target-sized files, rows and bytes unchanged.

One small real run (Parquet inputs with an integer ``bucket`` column and a ``part`` column holding hostile
values: ``../x``, ``A``/``a``, the empty string, None) writes twelve sinks — Parquet, Arrow, JSONL (plain,
zstd, gzip) and WebDataset, without and with ``partition_by`` — in many small files. Every test
compacts a copy of it, so the run itself is never written. Checked: file sizes and sample counts per
file and per partition, the rows (or tar members) in the same order with the same bytes, loading with
``datasets``, identical bytes on reruns and on copies, resume after kills, exceptions and failed
writes, changed settings, refused inputs and damaged sources.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import ConfigError
from tests.conftest import cli, make_text, write_jsonl, write_manifest

#: The target file size of the main compaction: several files per sink, and per partition of most.
TARGET = 32_000
#: Every sink of the run: folder → (kind, partition column or None).
SINKS = {
    "parquet": ("parquet", None), "arrow": ("arrow", None), "jsonl": ("jsonl", None),
    "jsonl-zst": ("jsonl", None), "jsonl-gz": ("jsonl", None), "webdataset": ("webdataset", None),
    "pq-bucket": ("parquet", "bucket"), "pq-part": ("parquet", "part"), "arrow-part": ("arrow", "part"),
    "jsonl-part": ("jsonl", "part"), "zst-bucket": ("jsonl", "bucket"), "wds-part": ("webdataset", "part"),
}
HOSTILE = ["../x", "A", "a", "", None, "plain"]
STATE = ".compact-state.json"
ROWS = 480


# ------------------------------------------------------------------------------------ the run
def _texts(n: int, seed: int = 5) -> list[str]:
    """``n`` texts of 10–150 pseudo-words drawn Zipf-like from a random vocabulary: they compress about
    like prose (3×), unlike a repeated sentence, so the compressed formats' sizing is really tested."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(4000)]
    weights = [1 / (k + 1) for k in range(len(vocab))]
    return [" ".join(rng.choices(vocab, weights, k=rng.randint(10, 150))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """The finished run, never written by a test (tests compact copies of it)."""
    from rich.console import Console

    from curate.driver import execute
    from curate.manifest import load

    root = tmp_path_factory.mktemp("compact-src")
    texts = _texts(ROWS)
    for f in range(4):
        rows = [{"id": f"f{f}-{i:03d}", "text": texts[f * 120 + i], "bucket": 8 + (f * 120 + i) % 3,
                 "part": HOSTILE[((f * 120 + i) * 7) % len(HOSTILE)]} for i in range(120)]
        (root / "in").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "in" / f"p{f}.parquet")
    m = write_manifest(root / "m.yaml", f"""
        name: compact
        seed: 1
        source: {{kind: parquet, paths: ["{root}/in/*.parquet"], schema: table, id_field: id, batch_rows: 40}}
        sink:
          - {{kind: parquet, shard_samples: 23}}
          - {{kind: arrow, shard_samples: 11}}
          - {{kind: jsonl, shard_samples: 17}}
          - {{kind: jsonl, path: jsonl-zst, compression: zstd, shard_samples: 29}}
          - {{kind: jsonl, path: jsonl-gz, compression: gzip, shard_samples: 23}}
          - {{kind: webdataset, shard_samples: 7}}
          - {{kind: parquet, path: pq-bucket, partition_by: bucket, shard_samples: 13}}
          - {{kind: parquet, path: pq-part, partition_by: part, shard_samples: 10}}
          - {{kind: arrow, path: arrow-part, partition_by: part, shard_samples: 11}}
          - {{kind: jsonl, path: jsonl-part, partition_by: part, shard_samples: 7}}
          - {{kind: jsonl, path: zst-bucket, compression: zstd, partition_by: bucket, shard_samples: 9}}
          - {{kind: webdataset, path: wds-part, partition_by: part, shard_samples: 5}}
        executor: {{kind: local, workers: 1}}
        """)
    run = root / "run"
    execute(load(m, output=str(run)), console=Console(file=io.StringIO()), show_progress=False)
    for folder in SINKS:
        assert len(_index(run / folder)["shards"]) >= 16, folder  # many small files to compact
    return run


def _copy(run: Path, dest: Path, only: list[str] | None = None) -> Path:
    """A copy of ``run`` at ``dest``; with ``only``, the other sinks keep just their ``index.json`` (all a
    compaction of the sinks in ``only`` reads of them)."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        rel = Path(folder).relative_to(run).parts
        if only is None or not rel or rel[0] not in SINKS or rel[0] in only:
            return []
        return [n for n in names if not (len(rel) == 1 and n == "index.json")]

    shutil.copytree(run, dest, ignore=ignore)
    return dest


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _tree(root: Path, skip: str | None = None) -> dict[str, str]:
    """relative path → sha256 of every file under ``root`` (without the top-level folder ``skip``)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).parts[0] != skip}


def _originals(run: Path) -> dict[str, str]:
    """Every file of the run but the compaction's."""
    return _tree(run, skip="compacted")


def _compact(run: Path, faults: list | None = None, **kw):
    """:func:`curate.compact.compact` in this process, with ``CURATE_FAULTS`` set to ``faults``."""
    from curate.compact import compact

    old = os.environ.pop("CURATE_FAULTS", None)
    if faults:
        os.environ["CURATE_FAULTS"] = json.dumps(faults)
    try:
        return compact(run, **kw)
    finally:
        os.environ.pop("CURATE_FAULTS", None)
        if old is not None:
            os.environ["CURATE_FAULTS"] = old


@pytest.fixture(scope="module")
def reference(source_run, tmp_path_factory) -> tuple[Path, dict[str, str], list]:
    """A copy of the run compacted once, uninterrupted, to ``TARGET`` bytes: (run, tree of
    ``compacted/``, results). The original files are checked unchanged."""
    run = _copy(source_run, tmp_path_factory.mktemp("compact-ref") / "run")
    before = _originals(run)
    results = _compact(run, target_bytes=TARGET)
    assert _originals(run) == before
    return run, _tree(run / "compacted"), results


# ------------------------------------------------------------------------------------ reading back
def _groups(index: dict) -> dict[str, list[dict]]:
    """Index entries by partition folder ("" when unpartitioned), in index (name) order."""
    out: dict[str, list[dict]] = {}
    for e in index["shards"]:
        folder, _, _ = e["name"].rpartition("/")
        out.setdefault(folder, []).append(e)
    return out


def _rows(kind: str, path: Path) -> list:
    """One file's rows, in order, in a comparable form: for tars each sample's members (name, sha256
    of the bytes), for JSONL each decompressed line's bytes, else the rows as pyarrow reads them."""
    if kind == "webdataset":
        samples: list[list[tuple[str, str]]] = []
        key = None
        with tarfile.open(path) as tf:
            for m in tf:
                k = m.name.split(".", 1)[0]
                if k != key:
                    samples.append([])
                    key = k
                samples[-1].append((m.name, hashlib.sha256(tf.extractfile(m).read()).hexdigest()))
        return [tuple(s) for s in samples]
    if kind == "jsonl":
        data = path.read_bytes()
        if path.name.endswith(".zst"):
            import zstandard

            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
        elif path.name.endswith(".gz"):
            data = gzip.decompress(data)
        assert data.endswith(b"\n")
        return data[:-1].split(b"\n")
    if kind == "parquet":
        return pq.read_table(path).to_pylist()
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all().to_pylist()


def _schema(kind: str, path: Path) -> pa.Schema | None:
    if kind == "parquet":
        return pq.read_schema(path).remove_metadata()
    if kind == "arrow":
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).schema.remove_metadata()
    return None


def _group_rows(kind: str, folder: Path, entries: list[dict]) -> list:
    return [r for e in entries for r in _rows(kind, folder / e["name"])]


# ------------------------------------------------------------------------------------ the output
@pytest.mark.parametrize("folder", list(SINKS))
def test_compacted_output_has_the_same_rows_in_target_sized_files(reference, folder):
    run, _, results = reference
    kind, column = SINKS[folder]
    src, dest = run / folder, run / "compacted" / folder
    src_index, index = _index(src), _index(dest)
    result = next(r for r in results if r.label == f"sink:{folder}")
    assert (result.directory, result.skipped, result.files_in) == (dest, False, len(src_index["shards"]))
    assert (result.samples, result.files_out, result.bytes) == (ROWS, len(index["shards"]), index["total_bytes"])
    assert index["format"] == kind and index["columns"] == src_index["columns"]
    assert index["total_samples"] == src_index["total_samples"] == ROWS
    assert index["compacted_from"] == {"path": folder, "files": len(src_index["shards"]),
                                       "index_sha256": hashlib.sha256((src / "index.json").read_bytes()).hexdigest()}
    src_groups, groups = _groups(src_index), _groups(index)
    assert list(groups) == list(src_groups)
    assert len(index["shards"]) < len(src_index["shards"])  # fewer, larger files
    if column:
        assert len(groups) == (3 if column == "bucket" else len(HOSTILE))
        # the same partition folders, values and counts (the hostile values stay encoded, inside)
        assert {k: (v["value"], v["type"], v["samples"]) for k, v in index["partitions"].items()} == \
            {k: (v["value"], v["type"], v["samples"]) for k, v in src_index["partitions"].items()}
        assert {v["value"] for v in index["partitions"].values()} >= ({8, 9, 10} if column == "bucket" else
                                                                     {"../x", "A", "a", "", None})
        assert all((dest / g).parent == dest for g in groups)
    # nothing but the listed files, the indexes and the state: no temporaries, no leftovers
    listed = {e["name"] for e in index["shards"]} | {"index.json", ".compact-state.json"}
    listed |= {f"{g}/index.json" for g in groups if g}
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == listed
    for g, entries in groups.items():
        gdir = dest / g if g else dest
        if g:
            sub = _index(gdir)
            assert [e["name"] for e in sub["shards"]] == [e["name"].rpartition("/")[2] for e in entries]
            assert sub["total_samples"] == sum(e["samples"] for e in src_groups[g]) == index["partitions"][g]["samples"]
        names = [e["name"].rpartition("/")[2] for e in entries]
        assert names == [f"part-{i:05d}.{names[0].split('.', 1)[1]}" for i in range(len(entries))]
        for e in entries:
            data = (dest / e["name"]).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (e["bytes"], e["sha256"]), e["name"]
        # sizes: a tar never passes the target; the others by at most 10%; all but the last reasonably full
        sizes = [e["bytes"] for e in entries]
        assert max(sizes) <= (TARGET if kind == "webdataset" else TARGET * 1.1), (g, sizes)
        assert all(s >= TARGET * 0.5 for s in sizes[:-1]), (g, sizes)
        # the same rows (tar members, JSONL lines byte for byte), in the same order, as counted
        src_rows = _group_rows(kind, src, src_groups[g])
        rows = _group_rows(kind, dest, entries)
        assert len(rows) == len(src_rows) == sum(e["samples"] for e in src_groups[g])
        assert [len(_rows(kind, dest / e["name"])) for e in entries] == [e["samples"] for e in entries]
        assert rows == src_rows
        if kind in ("parquet", "arrow"):
            assert {_schema(kind, dest / e["name"]) for e in entries} == {_schema(kind, src / src_groups[g][0]["name"])}
        if kind == "webdataset":  # the original headers: same mtime, mode, owner in every member
            with tarfile.open(dest / entries[0]["name"]) as tf, tarfile.open(src / src_groups[g][0]["name"]) as sf:
                a, b = tf.getmembers()[0], sf.getmembers()[0]
                assert (a.name, a.mtime, a.mode, a.uname, a.gname) == (b.name, b.mtime, b.mode, b.uname, b.gname)


def test_original_output_is_never_changed(source_run, reference):
    run, tree, _ = reference
    assert _originals(run) == _originals(source_run)  # the copy compacted is the source, file for file
    assert tree and all(name.split("/")[0] in SINKS for name in tree)


@pytest.mark.parametrize("folder", ["parquet", "pq-bucket", "arrow-part", "jsonl-zst", "jsonl-part", "wds-part"])
def test_target_samples_fills_every_file_but_the_last(source_run, tmp_path, folder):
    run = _copy(source_run, tmp_path / "run", only=[folder])
    kind = SINKS[folder][0]
    [result] = _compact(run, sink=folder, target_samples=20)
    src_index, index = _index(run / folder), _index(run / "compacted" / folder)
    assert result.samples == ROWS and [p.name for p in (run / "compacted").iterdir()] == [folder]  # only that sink
    src_groups = _groups(src_index)
    for g, entries in _groups(index).items():
        counts = [e["samples"] for e in entries]
        assert all(c == 20 for c in counts[:-1]) and 0 < counts[-1] <= 20, (g, counts)
        assert sum(counts) == sum(e["samples"] for e in src_groups[g])
        assert _group_rows(kind, run / "compacted" / folder, entries) == _group_rows(kind, run / folder, src_groups[g])
    # both limits: whichever comes first closes the file
    [both] = _compact(run, sink=folder, target_samples=20, target_bytes=12_000)
    assert not both.skipped
    for g, entries in _groups(_index(run / "compacted" / folder)).items():
        assert all(e["samples"] <= 20 and e["bytes"] <= 12_000 * (1 if kind == "webdataset" else 1.1)
                   for e in entries), g
        # every file but the last was closed by one of the two limits: 20 samples, or reasonably full
        assert all(e["samples"] == 20 or e["bytes"] >= 6_000 for e in entries[:-1]), (g, entries)
        assert _group_rows(kind, run / "compacted" / folder, entries) == _group_rows(kind, run / folder, src_groups[g])


def test_compacted_output_loads_with_datasets(reference, tmp_path):
    import datasets

    run, _, _ = reference
    c = run / "compacted"
    for builder, pattern in [("parquet", "parquet/*.parquet"), ("parquet", "pq-part/*/*.parquet"),
                             ("json", "jsonl/*.jsonl"), ("json", "zst-bucket/*/*.jsonl.zst"),
                             ("json", "jsonl-gz/*.jsonl.gz"),
                             ("arrow", "arrow/*.arrow"), ("webdataset", "webdataset/*.tar"),
                             ("webdataset", "wds-part/*/*.tar")]:
        ds = datasets.load_dataset(builder, data_files=str(c / pattern), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == ROWS, pattern
        if builder == "webdataset":
            assert ds.num_rows == len(set(zip(ds["__url__"], ds["__key__"])))
            assert sorted(ds[0]["json"]) == ["bucket", "id", "part"] and ds[0]["txt"]
        else:
            assert set(ds.column_names) == {"id", "text", "bucket", "part"}
            assert sorted(ds["id"]) == sorted(f"f{f}-{i:03d}" for f in range(4) for i in range(120))
    ds = datasets.load_dataset("parquet", data_files=str(c / "pq-part" / "part_%41" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert set(ds["part"]) == {"A"} and ds.num_rows == _index(run / "pq-part")["partitions"]["part_%41"]["samples"]


# ------------------------------------------------------------------------------------ same bytes
def test_rerun_is_skipped_and_a_copy_elsewhere_gives_the_same_bytes(source_run, reference, tmp_path):
    ref_run, ref_tree, _ = reference
    run = _copy(ref_run, tmp_path / "again")
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "compacted").rglob("*") if p.is_file()}
    proc = cli("compact", str(run), "--target-bytes", str(TARGET))
    assert proc.stdout.count("already compacted") == len(SINKS), proc.stdout
    assert f"{ROWS:,} samples" in proc.stdout and "note" not in proc.stderr
    assert _tree(run / "compacted") == ref_tree
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    assert all(r.skipped for r in _compact(run, target_bytes=TARGET))
    # another copy of the run, elsewhere and deeper, compacted through the CLI: the same bytes
    other = _copy(source_run, tmp_path / "x" / "y" / "other-name")
    proc = cli("compact", str(other), "--target-bytes", "32KB")
    assert proc.stdout.count(": compacted: ") == len(SINKS)
    assert _tree(other / "compacted") == ref_tree


# ------------------------------------------------------------------------------------ interruptions
def _popen(run: Path, faults: list | None = None, *args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CURATE_FAULTS", None)
    if faults:
        env["CURATE_FAULTS"] = json.dumps(faults)
    return subprocess.Popen([sys.executable, "-m", "curate", "compact", str(run), "--target-bytes", str(TARGET),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state(run: Path, folder: str) -> dict:
    return json.loads((run / "compacted" / folder / ".compact-state.json").read_text())


@pytest.mark.parametrize("case", ["kill-file", "kill-index", "raise-file", "oserror-file", "oserror-index"])
def test_interrupted_compaction_resumes_to_the_same_bytes(source_run, reference, tmp_path, case):
    _, ref_tree, _ = reference
    action, point = case.split("-")
    folder = {"kill-file": "pq-bucket", "kill-index": "webdataset", "raise-file": "jsonl-zst",
              "oserror-file": "wds-part", "oserror-index": "arrow-part"}[case]
    fault = {"point": f"compact_{point}", "label": folder, "action": action}
    if point == "file":
        fault["after"] = 2
    # once over every sink (those before the fault must be kept, those after it started), else just the one
    every = case == "kill-file"
    only = {} if every else {"sink": folder}
    run = _copy(source_run, tmp_path / "run", only=None if every else [folder])
    before = _originals(run)
    if action == "kill":  # the real command, killed by SIGKILL at the fault point
        proc = _popen(run, [fault], *([] if every else ["--sink", folder]))
        proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
    else:
        with pytest.raises(OSError if action == "oserror" else RuntimeError, match="injected fault at compact_"):
            _compact(run, [fault], target_bytes=TARGET, **only)
    dest = run / "compacted" / folder
    assert not (dest / "index.json").exists()  # the commit point was not reached
    state = _state(run, folder)
    assert not state["complete"]
    if point == "file":
        # the second file of a group was committed but not recorded: the rerun must replace it
        [(group, done)] = [(g, d) for g, d in state["groups"].items() if not d["complete"]]
        assert len(done["files"]) == 1
        ext = {"pq-bucket": "parquet", "jsonl-zst": "jsonl.zst", "wds-part": "tar"}[folder]
        assert (dest / group / f"part-00001.{ext}").is_file()
    else:
        assert all(g["complete"] for g in state["groups"].values())
    order = list(SINKS) if every else [folder]
    # sinks before it are finished, sinks after it not started
    assert all((run / "compacted" / f / "index.json").is_file() for f in order[:order.index(folder)])
    assert not any((run / "compacted" / f).exists() for f in order[order.index(folder) + 1:])
    assert _originals(run) == before
    results = _compact(run, target_bytes=TARGET, **only)  # a plain rerun
    assert [r.skipped for r in results] == [f in order[:order.index(folder)] for f in order]
    assert _tree(run / "compacted") == {k: v for k, v in ref_tree.items() if k.split("/")[0] in order}
    assert _originals(run) == before


def test_kill_at_a_random_moment_then_rerun(source_run, reference, tmp_path):
    _, ref_tree, _ = reference
    run = _copy(source_run, tmp_path / "run")
    before = _originals(run)
    total = sum(1 for name in ref_tree if name.rpartition("/")[2].startswith("part-"))
    at = random.randint(1, total - 5)  # SIGKILL once this many files of all sinks exist (named in failures)
    # a short pause after each committed file keeps the command running while the test watches it
    slow = [{"point": "compact_file", "after": k, "action": "sleep", "seconds": 0.01} for k in range(1, 80)]
    proc = _popen(run, slow)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(1 for p in (run / "compacted").rglob("part-*")) >= at:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the command ended before {at} files were written: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = [f for f in SINKS if (run / "compacted" / f / STATE).is_file()
            and json.loads((run / "compacted" / f / STATE).read_text())["complete"]]
    assert len(done) < len(SINKS), at
    assert _originals(run) == before
    proc = cli("compact", str(run), "--target-bytes", str(TARGET))
    assert [f for f in SINKS if f"sink:{f}: already compacted" in proc.stdout] == done, at
    assert _tree(run / "compacted") == ref_tree, f"killed after {at} of {total} files"
    assert _originals(run) == before


# ------------------------------------------------------------------------------------ settings
def test_changed_settings_start_over(source_run, reference, tmp_path):
    _, ref_tree, _ = reference

    def subtree(tree: dict, folder: str) -> dict:
        return {k: v for k, v in tree.items() if k.split("/")[0] == folder}

    run = _copy(source_run, tmp_path / "run", only=["pq-part"])
    _compact(run, sink="pq-part", target_bytes=TARGET)
    assert _tree(run / "compacted") == subtree(ref_tree, "pq-part")
    proc = cli("compact", str(run), "--sink", "pq-part", "--target-bytes", "25KB")
    assert "settings or source changed" in proc.stderr and "starting it over" in proc.stderr
    assert "already compacted" not in proc.stdout
    fresh = _copy(source_run, tmp_path / "fresh", only=["pq-part"])
    _compact(fresh, sink="pq-part", target_bytes=25_000)
    smaller = _tree(run / "compacted")
    assert smaller == _tree(fresh / "compacted")
    assert len(smaller) > len(subtree(ref_tree, "pq-part"))  # more, smaller files: none of the old left
    assert max(e["bytes"] for e in _index(run / "compacted" / "pq-part")["shards"]) <= 25_000 * 1.1
    [r] = _compact(run, sink="pq-part", target_bytes=25_000, target_samples=5)
    assert not r.skipped and all(e["samples"] <= 5 for e in _index(run / "compacted" / "pq-part")["shards"])
    [r] = _compact(run, sink="pq-part", target_bytes=TARGET)  # back to the first settings
    assert not r.skipped and _tree(run / "compacted") == subtree(ref_tree, "pq-part")


def test_unfinished_runs_are_refused(source_run, tmp_path):
    run = _copy(source_run, tmp_path / "run", only=[])
    (run / "stats.json").unlink()
    proc = cli("compact", str(run), check=False)
    assert proc.returncode == 2 and "has not finished (no stats.json)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (run / "compacted").exists()
    run = _copy(source_run, tmp_path / "run2", only=[])
    (run / "wds-part" / "index.json").unlink()
    with pytest.raises(ConfigError, match=r"wds-part: no index\.json: this output is not complete"):
        _compact(run)
    with pytest.raises(ConfigError, match="not a curate run directory"):
        _compact(tmp_path)
    assert not (run / "compacted").exists()


def test_bad_arguments_say_what_is_wrong(source_run, tmp_path):
    run = _copy(source_run, tmp_path / "run", only=[])
    proc = cli("compact", str(run), "--sink", "nope", check=False)
    assert proc.returncode == 2 and "no sink 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert all(folder in proc.stderr for folder in SINKS)
    proc = cli("compact", str(run), "--target-bytes", "lots", check=False)
    assert proc.returncode == 2 and "--target-bytes 'lots': not a size" in proc.stderr
    with pytest.raises(ConfigError, match="--target-bytes must be positive"):
        _compact(run, target_bytes=0)
    with pytest.raises(ConfigError, match="--target-samples must be positive"):
        _compact(run, target_samples=-1)
    assert not (run / "compacted").exists()


def _tiny_run(tmp_path: Path, sinks: str) -> Path:
    from rich.console import Console

    from curate.driver import execute
    from curate.manifest import load

    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": f"d{i}", "text": make_text(i)} for i in range(30)])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: tiny
        source: {{kind: jsonl, paths: ["{tmp_path}/in/*.jsonl"], id_field: id}}
        sink: {sinks}
        executor: {{kind: local, workers: 1}}
        """)
    execute(load(m, output=str(tmp_path / "run")), console=Console(file=io.StringIO()), show_progress=False)
    return tmp_path / "run"


def test_sink_by_kind_must_be_unambiguous_and_folder_names_win(tmp_path):
    run = _tiny_run(tmp_path, "[{kind: jsonl, path: a}, {kind: jsonl, path: parquet}, {kind: parquet, path: p}]")
    with pytest.raises(ConfigError, match=r"2 jsonl sinks \(a, parquet\); name one by its folder"):
        _compact(run, sink="jsonl")
    [r] = _compact(run, sink="parquet")  # the folder named parquet (a jsonl sink), not the parquet sink
    assert r.label == "sink:parquet" and (run / "compacted" / "parquet" / "part-00000.jsonl").is_file()
    [r] = _compact(run, sink="sink:p")
    assert r.samples == 30 and (run / "compacted" / "p" / "part-00000.parquet").is_file()


# ------------------------------------------------------------------------------------ damaged sources
def _edit_index(folder: Path, name: str, **changes) -> None:
    index = _index(folder)
    entry = next(e for e in index["shards"] if e["name"] == name)
    for k, v in changes.items():
        index["total_" + k] += v - entry[k]
        entry[k] = v
    (folder / "index.json").write_text(json.dumps(index, indent=2))


@pytest.mark.parametrize("folder", ["parquet", "jsonl-zst", "wds-part"])
def test_index_with_more_or_fewer_rows_than_the_files_is_an_error(source_run, tmp_path, folder):
    for delta, message in ((+3, r"lists \d+ rows in .*the files hold \d+; the output is damaged"),
                           (-3, r"holds more rows than index\.json's \d+")):
        run = _copy(source_run, tmp_path / f"run{delta}", only=[folder])
        entry = _index(run / folder)["shards"][-4]
        _edit_index(run / folder, entry["name"], samples=entry["samples"] + delta)
        group = entry["name"].rpartition("/")[0]
        with pytest.raises(ConfigError, match=message) as e:
            _compact(run, sink=folder, target_bytes=TARGET)
        assert (group or "the sink") in str(e.value)
        assert not (run / "compacted" / folder / "index.json").exists()
        assert not list((run / "compacted").rglob(".tmp-*"))
        assert not any(p.stat().st_size == 0 for p in (run / "compacted").rglob("part-*"))


@pytest.mark.parametrize("folder", ["parquet", "arrow", "jsonl", "jsonl-zst", "jsonl-gz", "webdataset"])
def test_truncated_or_missing_file_is_an_error(source_run, tmp_path, folder):
    run = _copy(source_run, tmp_path / "run", only=[folder])
    name = _index(run / folder)["shards"][5]["name"]
    path = run / folder / name
    data = path.read_bytes()
    cut = len(data) * 2 // 3
    cut -= data[cut - 1:cut] == b"\n"  # inside a line, for JSONL
    path.write_bytes(data[:cut])  # cut inside the file, as a full disk leaves it
    if folder in ("parquet", "jsonl-zst"):  # through the command: exit 2 with the file named, no traceback
        proc = cli("compact", str(run), "--sink", folder, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "bug in curate" not in proc.stderr
        message = proc.stderr
    else:
        with pytest.raises(ConfigError) as e:
            _compact(run, sink=folder, target_bytes=TARGET)
        message = str(e.value)
    assert name in message and "index.json says" in message and "damaged" in message
    assert not (run / "compacted").exists()  # checked before anything is written
    # the same cut file with an index that agrees with it: the format itself says it is cut
    _edit_index(run / folder, name, bytes=cut)
    with pytest.raises(ConfigError, match=rf"{re.escape(name)}: .*(cannot be read|cut).*the output is damaged"):
        _compact(run, sink=folder, target_bytes=TARGET)
    assert not (run / "compacted" / folder / "index.json").exists()
    path.unlink()
    with pytest.raises(ConfigError, match=f"{re.escape(name)}: listed in .* but cannot be read"):
        _compact(run, sink=folder, target_bytes=TARGET)



def test_a_tar_cut_at_a_member_header_is_an_error(source_run, tmp_path):
    """tarfile reads a tar cut just before a member's header as a shorter archive, without an error: the
    last sample would lose its ``txt`` member and still count as a sample."""
    run = _copy(source_run, tmp_path / "run", only=["webdataset"])
    entry = _index(run / "webdataset")["shards"][-1]
    path = run / "webdataset" / entry["name"]
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    assert last.name.endswith(".txt")
    path.write_bytes(path.read_bytes()[:last.offset])
    _edit_index(run / "webdataset", entry["name"], bytes=last.offset)
    with pytest.raises(ConfigError, match=rf"{re.escape(entry['name'])}: no end-of-archive after byte "
                                          rf"{last.offset}: the tar is cut"):
        _compact(run, sink="webdataset", target_bytes=TARGET)
    assert not (run / "compacted" / "webdataset" / "index.json").exists()


def test_a_missing_compacted_file_is_compacted_again_to_the_same_bytes(reference, tmp_path):
    ref_run, ref_tree, _ = reference
    run = _copy(ref_run, tmp_path / "run")
    victim = sorted((run / "compacted" / "parquet").glob("part-*.parquet"))[1]
    victim.unlink()
    results = _compact(run, target_bytes=TARGET)
    assert [r.skipped for r in results if r.label == "sink:parquet"] == [False]
    assert _tree(run / "compacted") == ref_tree


def test_one_compaction_at_a_time(source_run, tmp_path):
    from curate.lock import FileLock, LockHeld

    run = _copy(source_run, tmp_path / "run", only=["parquet"])
    with FileLock(run / "compacted" / ".lock", command="another compaction"):
        with pytest.raises(LockHeld, match="in use by another curate process"):
            _compact(run, sink="parquet", target_bytes=TARGET)
    assert not (run / "compacted" / "parquet").exists()
    assert _compact(run, sink="parquet", target_bytes=TARGET)[0].samples == ROWS
    assert not (run / "compacted" / ".lock").exists()


def test_a_resume_whose_finished_files_are_gone_starts_over_to_the_same_bytes(source_run, reference, tmp_path):
    ref_run, ref_tree, _ = reference
    run = _copy(source_run, tmp_path / "run", only=["parquet"])
    proc = _popen(run, [{"point": "compact_file", "label": "parquet", "after": 3, "action": "kill"}],
                  "--sink", "parquet", "--target-bytes", str(TARGET))
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert len(_state(run, "parquet")["groups"][""]["files"]) >= 2
    sorted((run / "compacted" / "parquet").glob("part-*"))[0].unlink()  # a finished file, lost
    _compact(run, sink="parquet", target_bytes=TARGET)
    assert _tree(run / "compacted" / "parquet") == {k.removeprefix("parquet/"): v for k, v in ref_tree.items()
                                                     if k.startswith("parquet/")}


def test_a_resumed_arrow_compaction_by_samples_writes_the_same_bytes(source_run, tmp_path):
    """Arrow IPC encodes a sliced batch differently from the same rows in a batch of their own."""
    clean = _copy(source_run, tmp_path / "clean", only=["arrow"])
    _compact(clean, sink="arrow", target_bytes=TARGET, target_samples=25)
    run = _copy(source_run, tmp_path / "run", only=["arrow"])
    from curate.faults import InjectedFault

    with pytest.raises(InjectedFault):
        _compact(run, [{"point": "compact_file", "label": "arrow", "after": 1, "action": "raise"}],
                 sink="arrow", target_bytes=TARGET, target_samples=25)
    _compact(run, sink="arrow", target_bytes=TARGET, target_samples=25)
    assert _tree(run / "compacted") == _tree(clean / "compacted")


def test_arrow_units_are_fresh_batches_whatever_the_resume_point(tmp_path):
    """Arrow IPC writes a sliced batch (nulls, offsets) differently from the same rows in a batch of
    their own; a resume starts from a slice where an uninterrupted run had a whole unit. Found by review:
    files after the resume point differed."""
    from curate.compact import _ArrowCodec, _read_ahead, _skip, _write_file
    from curate.run_outputs import SinkOutput
    from curate.sinks.arrow_ipc import ArrowParams, ArrowSink

    src = tmp_path / "src"
    src.mkdir()
    batch = pa.record_batch({"text": pa.array([f"row {i} " * (i % 7) if i % 5 else None for i in range(2000)])})
    with pa.OSFile(str(src / "a.arrow"), "wb") as f:
        w = pa.ipc.new_file(f, batch.schema)
        w.write_batch(batch)
        w.close()
    output = SinkOutput("sink:arrow", "arrow", ArrowParams(), src, {})

    def run(target: int, skip: int, files: int, out: Path) -> list[tuple[int, str]]:
        codec = _ArrowCodec(output, "arrow", ArrowSink)
        stream = _skip(_read_ahead(codec.read([src / "a.arrow"])), skip)
        done, got = skip, []
        for k in range(files):
            e = _write_file(codec, stream, out / f"part-{k}.arrow", 100, target, 250, 2000 - done)
            done += e["samples"]
            got.append((e["samples"], e["sha256"]))
        return got

    checked = 0
    for target in range(3000, 12000, 250):
        whole = run(target, 0, 3, tmp_path / f"a{target}")
        if whole[0][0] == 200:  # the first file ends inside a unit: the resume starts from a slice
            assert run(target, 200, 2, tmp_path / f"b{target}") == whole[1:]
            checked += 1
            break
    assert checked

"""Protocol tests of ``curate.hub_upload`` against a loopback fake of the Hub's HTTP API (tests/fake_hub.py).

The upload runs in a subprocess (huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when it is
imported) with ``HF_HUB_DISABLE_XET=1``: huggingface_hub 2.4 picks Xet on the client side whenever
``hf_xet`` is importable, and the fake speaks the LFS and regular protocols only. What is checked is what
went over the wire: calls, headers, files and LFS objects, and the bytes the fake stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from curate.errors import ConfigError
from curate.hub_upload import check_repo_id, upload_dataset_folder
from tests.fake_hub import FakeHub

TOKEN = "hf_FAKEtoken0123456789abcdefSECRET"
REPO = "curate-test/long-corpus"
ROOT = Path(__file__).resolve().parents[1]

RUNNER = r"""
import json, sys
from pathlib import Path
import curate.hub_upload as hu
from curate.errors import ConfigError, CurateError
a = json.loads(sys.argv[1])
hu.FILES_PER_COMMIT = a.get("files_per_commit", hu.FILES_PER_COMMIT)
try:
    s = hu.upload_dataset_folder(Path(a["folder"]), a["repo"], private=a.get("private", False),
                                 revision=a.get("revision"), token=a.get("token"), log=print)
except ConfigError as e:
    print(f"configuration error: {e}", file=sys.stderr)
    sys.exit(2)
except CurateError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
print("SUMMARY " + json.dumps(s))
"""

CARD = """---
license: cc-by-4.0
configs:
- config_name: default
  data_files: data/default/*.parquet
- config_name: long
  data_files: data/long/*.jsonl
---
# long-corpus

Built by curate.
"""


def make_folder(root: Path) -> dict[str, bytes]:
    """A publish folder: a card, data of several sizes and kinds in data/<config>/, assets, a report."""
    rng = random.Random(7)
    line = json.dumps({"text": "a long document " * 20}) + "\n"
    files = {
        "README.md": CARD.encode(),
        "data/default/train-00000-of-00002.parquet": b"PAR1" + rng.randbytes(150_000),  # lfs (pattern, size)
        "data/default/train-00001-of-00002.parquet": b"PAR1" + rng.randbytes(300_000),  # lfs, multipart
        "data/long/empty.jsonl": b"",  # regular (empty)
        "data/long/part-0.jsonl": (line * 5).encode(),  # regular (small text)
        "data/long/part-1.jsonl": (line * 400).encode(),  # lfs by size (>= 100 kB), text
        "data/wds/meta.idx": b"\0\1\2" + rng.randbytes(2_000),  # lfs: binary sample, small
        "data/wds/shard-000000.tar": rng.randbytes(60_000),  # lfs by pattern
        "assets/length_hist.png": b"\x89PNG\r\n\x1a\n" + rng.randbytes(3_000),
        "report.html": b"<html><body><h1>report</h1></body></html>\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    # never uploaded: git metadata and huggingface_hub/curate bookkeeping
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "old.lock").write_text("")
    return files


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def hub_env(hub_url: str, tmp_path: Path, token: str | None = TOKEN) -> dict:
    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_XET", "HF_OIDC_RESOURCE",
            "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(tmp_path / "hf_home"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def upload_cmd(**args) -> list[str]:
    return [sys.executable, "-c", RUNNER, json.dumps({k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in args.items()})]


def run_upload(env: dict, **args) -> subprocess.CompletedProcess:
    return subprocess.run(upload_cmd(**args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def summary_of(proc) -> dict:
    assert proc.returncode == 0, f"upload failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


def assert_token_nowhere(token: str, tmp_path: Path, *outputs: str) -> None:
    for text in outputs:
        assert token not in text
    for p in tmp_path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert token.encode() not in p.read_bytes(), p


def assert_one_line_error(proc, *needles: str) -> str:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "configuration error:"))]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def assert_complete(hub: FakeHub, files: dict[str, bytes], revision: str = "main") -> None:
    got = hub.snapshot(REPO, revision)
    assert set(got) == set(files) | {".gitattributes"}
    for rel, data in files.items():
        assert sha(got[rel]) == sha(data), rel


def fake(**kw) -> FakeHub:
    return FakeHub(tokens={TOKEN}, lfs_threshold=100_000, multipart_threshold=250_000, multipart_chunk=100_000,
                   **kw)


# ------------------------------------------------------------------------------------------ the upload


def test_upload_protocol_then_rerun_sends_nothing(tmp_path):
    folder = tmp_path / "publish"
    files = make_folder(folder)
    with fake() as hub:
        hub.fail("lfs_batch", nth=1, action="drop")  # a lost connection: huggingface_hub retries after 1 s
        hub.fail("lfs_part", nth=2, action="status 503")  # a storage hiccup on a multipart part: retried
        env = hub_env(hub.url, tmp_path)
        t0 = time.monotonic()
        first = run_upload(env, folder=folder, repo=REPO, private=True, files_per_commit=3)
        s = summary_of(first)
        took = time.monotonic() - t0

        # every file arrived with identical bytes, in the mode the Hub chose
        assert_complete(hub, files)
        modes = hub.modes(REPO)
        assert {p for p, k in modes.items() if k == "lfs"} == {
            "data/default/train-00000-of-00002.parquet", "data/default/train-00001-of-00002.parquet",
            "data/long/part-1.jsonl", "data/wds/meta.idx", "data/wds/shard-000000.tar", "assets/length_hist.png"}
        assert modes["README.md"] == modes["report.html"] == modes["data/long/empty.jsonl"] == "regular"

        # the summary
        assert s["repo_id"] == REPO and s["repo_type"] == "dataset" and s["revision"] == "main"
        assert s["url"] == f"{hub.url}/datasets/{REPO}" and s["private"] is True
        assert sorted(s["files_uploaded"]) == sorted(files) and s["files_skipped"] == []
        assert s["bytes_uploaded"] == sum(len(b) for b in files.values())
        assert s["commits"] == 4 and s["commit"] == hub.commits(REPO)[-1]["oid"]

        calls = hub.calls
        # created as a private dataset repo, with the token; data first, the card in the last commit
        create = [c for c in calls if c.kind == "create_repo"]
        assert len(create) == 1 and create[0].payload == {"name": "long-corpus", "organization": "curate-test",
                                                          "visibility": "private", "type": "dataset"}
        commits = hub.commits(REPO)[1:]
        assert [len(c["added"]) for c in commits] == [3, 3, 3, 1] and commits[-1]["added"] == ["README.md"]
        assert not any(p.startswith((".git/", ".cache/")) for c in commits for p in c["added"])
        # the token went in the Authorization header of every Hub API call, and never to the storage URLs
        api = [c for c in calls if not c.kind.startswith(("lfs_put", "lfs_part", "lfs_complete"))]
        assert api and all(c.authorization == f"Bearer {TOKEN}" for c in api)
        storage = [c for c in calls if c.kind in ("lfs_put", "lfs_part", "lfs_complete")]
        assert storage and all(c.authorization is None for c in storage)
        # plain LFS: no Xet attempt, nothing the fake does not know
        assert not [c for c in calls if c.kind in ("xet", "unknown")]
        # the injected failures happened and were retried; the multipart file (300 004 B) went in 4 parts
        assert [c.injected for c in calls if c.injected] == ["drop", "status 503"]
        big = sha(files["data/default/train-00001-of-00002.parquet"])
        assert len({c.path for c in calls if c.kind == "lfs_part" and big in c.oids}) == 4

        # the same call again: nothing to send, no commit
        mark = hub.mark()
        again = run_upload(env, folder=folder, repo=REPO, private=True, files_per_commit=3)
        s2 = summary_of(again)
        assert s2["files_uploaded"] == [] and sorted(s2["files_skipped"]) == sorted(files) and s2["commits"] == 0
        assert s2["commit"] == s["commit"]
        kinds = {c.kind for c in hub.calls_since(mark)}
        assert kinds <= {"create_repo", "repo_info", "tree"}, kinds
        assert_complete(hub, files)

    # no token in the output, the folder (hash cache included) or anything else written in tmp
    assert_token_nowhere(TOKEN, tmp_path, first.stdout, first.stderr, again.stdout, again.stderr)
    assert (folder / ".cache" / "huggingface" / "curate_upload.json").is_file()
    assert took < 30


@pytest.mark.parametrize("action", ["status 500", "drop_after"])
def test_failure_midway_then_resume_resends_nothing_committed(tmp_path, action):
    """The 3rd commit fails (a 500: not applied; or a lost answer: applied but the client never knew);
    the rerun sends neither committed files nor LFS objects the Hub already holds, and completes."""
    folder = tmp_path / "publish"
    files = make_folder(folder)
    with fake() as hub:
        hub.fail("commit", nth=3, action=action)
        env = hub_env(hub.url, tmp_path)
        first = run_upload(env, folder=folder, repo=REPO, files_per_commit=3)
        assert first.returncode == 1, first.stdout + first.stderr
        assert_one_line_error(first, REPO, "run the same command again to resume")

        committed = {p for c in hub.commits(REPO)[1:] for p in c["added"]}
        assert len(committed) == (6 if action == "status 500" else 9)
        with hub._lock:
            stored = set(hub.repos[("datasets", REPO)].lfs)
        committed_oids = {sha(files[p]) for p in committed}

        mark = hub.mark()
        second = run_upload(env, folder=folder, repo=REPO, files_per_commit=3)
        s = summary_of(second)
        calls = hub.calls_since(mark)
        assert sorted(s["files_skipped"]) == sorted(committed)
        assert sorted(s["files_uploaded"]) == sorted(set(files) - committed)
        for c in calls:
            assert not set(c.files) & committed, (c.kind, c.files)  # preupload and commit
            assert not set(c.oids) & committed_oids, (c.kind, c.oids)  # lfs batch, put, parts, commit
            if c.kind in ("lfs_put", "lfs_part", "lfs_complete"):
                assert not set(c.oids) & stored, (c.kind, c.oids)  # uploaded before the failure: not again
        if action == "status 500":  # the 3rd batch's LFS objects were stored before its commit failed
            batch3 = {sha(files["data/wds/meta.idx"]), sha(files["data/wds/shard-000000.tar"])}
            assert batch3 <= stored
            asked = {o for c in calls if c.kind == "lfs_batch" for o in c.oids}
            assert batch3 <= asked and not any(c.kind == "lfs_put" for c in calls)
        assert_complete(hub, files)
    assert_token_nowhere(TOKEN, tmp_path, first.stdout, first.stderr, second.stdout, second.stderr)


def test_killed_midway_then_resume(tmp_path):
    """kill -9 while an LFS upload hangs, after two commits: the rerun resends nothing committed."""
    folder = tmp_path / "publish"
    files = make_folder(folder)
    tar = sha(files["data/wds/shard-000000.tar"])
    with fake() as hub:
        hub.fail("lfs_put", match=tar, action="hang")
        env = hub_env(hub.url, tmp_path)
        proc = subprocess.Popen(upload_cmd(folder=folder, repo=REPO, files_per_commit=3), env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert hub.wait_for(lambda calls: any(c.injected == "hang" for c in calls), timeout=60)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        hub.release()
        committed = {p for c in hub.commits(REPO)[1:] for p in c["added"]}
        assert len(committed) == 6

        mark = hub.mark()
        second = run_upload(env, folder=folder, repo=REPO, files_per_commit=3)
        s = summary_of(second)
        assert sorted(s["files_uploaded"]) == sorted(set(files) - committed)
        committed_oids = {sha(files[p]) for p in committed}
        for c in hub.calls_since(mark):
            assert not set(c.files) & committed and not set(c.oids) & committed_oids, (c.kind, c.files, c.oids)
        puts = [c for c in hub.calls_since(mark) if c.kind == "lfs_put"]
        assert tar in {o for c in puts for o in c.oids}  # the interrupted one is sent again
        assert_complete(hub, files)
    assert_token_nowhere(TOKEN, tmp_path, out, err, second.stdout, second.stderr)


def test_new_branch_and_token_argument(tmp_path):
    folder = tmp_path / "publish"
    folder.mkdir()
    (folder / "README.md").write_text(CARD)
    (folder / "data" / "default").mkdir(parents=True)
    (folder / "data" / "default" / "train.parquet").write_bytes(b"PAR1" + b"\0" * 1000)
    with fake() as hub:
        env = hub_env(hub.url, tmp_path, token=None)  # no HF_TOKEN: the argument is the token
        proc = run_upload(env, folder=folder, repo=REPO, revision="v1.0", token=TOKEN)
        s = summary_of(proc)
        assert s["revision"] == "v1.0" and s["commits"] == 1
        kinds = [c.kind for c in hub.calls]
        assert kinds.index("refs") < kinds.index("create_branch") < kinds.index("commit")
        assert set(hub.snapshot(REPO, "v1.0")) == {".gitattributes", "README.md", "data/default/train.parquet"}
        assert set(hub.snapshot(REPO, "main")) == {".gitattributes"}
        assert all(c.authorization == f"Bearer {TOKEN}" for c in hub.calls if c.kind != "lfs_put")
        assert next(c.payload for c in hub.calls if c.kind == "create_repo")["visibility"] == "public"
    assert_token_nowhere(TOKEN, tmp_path, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("repo,hint", [
    ("noslash", ""), ("a/b/c", ""), ("-org/name", ""), ("org/name-", ""), ("org/.name", ""),
    ("org/na--me", ""), ("org/na..me", ""), ("org/name.git", ""), ("org/na me", ""), ("org/näme", ""),
    ("org/" + "x" * 97, ""), ("", ""), ("datasets/org/name", "without the 'datasets/' prefix"),
    ("https://huggingface.co/datasets/org/name", "not the URL"),
])
def test_bad_repo_id(tmp_path, repo, hint):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a Hub repo id") as e:
        upload_dataset_folder(tmp_path, repo, token=TOKEN)
    assert hint in str(e.value) and "\n" not in str(e.value) and TOKEN not in str(e.value)


def test_good_repo_ids():
    for repo in ("org/name", "my-org/my_dataset.v2", "A1/b", "user_1/" + "x" * 96, "o/_private-ish_"):
        check_repo_id(repo)


def test_bad_folder_card_and_revision(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        upload_dataset_folder(tmp_path / "missing", REPO, token=TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="nothing to upload"):
        upload_dataset_folder(tmp_path / "empty", REPO, token=TOKEN)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "README.md").write_text("---\nlicense: [unclosed\n---\n# x\n")
    with pytest.raises(ConfigError, match="front matter does not parse"):
        upload_dataset_folder(bad, REPO, token=TOKEN)
    (bad / "README.md").write_text("# no front matter\n")
    for rev in ("a b", "x..y", "-x", "x.lock", "0123456789abcdef0123456789abcdef01234567"):
        with pytest.raises(ConfigError, match="revision"):
            upload_dataset_folder(bad, REPO, token=TOKEN, revision=rev)


@pytest.mark.parametrize("case", ["bad_token", "read_only_token", "no_token", "unreachable", "public_exists"])
def test_hub_errors_are_one_clear_line(tmp_path, case):
    folder = tmp_path / "publish"
    folder.mkdir()
    (folder / "README.md").write_text(CARD)
    (folder / "data.jsonl").write_text('{"text": "x"}\n')
    wrong = "hf_WRONGtoken9876543210zyxwvuSECRET"
    with FakeHub(tokens={TOKEN}, read_only_tokens={wrong} if case == "read_only_token" else ()) as hub:
        url = hub.url
        token = {"bad_token": wrong, "read_only_token": wrong, "no_token": None}.get(case, TOKEN)
        if case == "public_exists":
            hub.create_repo(REPO, private=False)
        if case == "unreachable":
            hub.stop()  # nothing listens on that port any more
        env = hub_env(url, tmp_path, token=token)
        proc = run_upload(env, folder=folder, repo=REPO, private=case == "public_exists")
        if case != "unreachable":
            assert not [c for c in hub.calls if c.kind in ("commit", "preupload", "lfs_put")]
    expect = {
        "bad_token": (1, ["401", "hf auth login", "HF_TOKEN"]),
        "read_only_token": (1, ["403", "write", "curate-test"]),
        "no_token": (1, ["no Hugging Face token", "hf auth login"]),
        "unreachable": (1, ["could not reach", url, "resume"]),
        "public_exists": (2, ["exists and is public", "nothing was uploaded"]),
    }[case]
    assert proc.returncode == expect[0], proc.stdout + proc.stderr
    assert_one_line_error(proc, *expect[1])
    assert_token_nowhere(TOKEN, tmp_path, proc.stdout, proc.stderr)
    assert_token_nowhere(wrong, tmp_path, proc.stdout, proc.stderr)

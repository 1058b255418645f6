"""Upload a built dataset folder to the Hugging Face Hub, resumably.

``curate publish`` builds the folder (``README.md`` card, ``data/<config>/*``, ``assets/``,
``report.html``) and calls :func:`upload_dataset_folder`. The contract is in that function's docstring.

How it uploads. huggingface_hub 2.x has no ``upload_large_folder`` (and so no upload progress kept in
``<folder>/.cache/huggingface/upload/``): its ``upload_folder`` streams through Xet when ``hf_xet`` is
installed and falls back to one single commit when it is not. So the resumable part is done here, with
public API calls only, and it works the same whichever transfer protocol huggingface_hub picks:

1. list the files already at the target revision (``list_repo_tree``: size, and the sha256 of LFS/Xet
   files or the git blob id of regular ones) and drop every local file that is already there with the
   same content (the local hash is computed only for a file whose remote twin has the same size);
2. upload what is left in commits of at most :data:`FILES_PER_COMMIT` files and about
   :data:`BYTES_PER_COMMIT` bytes (``create_commit``: preupload, then the large files through Xet or
   LFS, then the commit), data first and ``README.md`` in the last commit, so the dataset card appears
   when the data it describes is complete.

A run that stops (network, a Hub error, Ctrl-C, ``kill -9``) loses at most the commit in progress; the
same call again skips what was committed. Within the interrupted commit, LFS objects the Hub already
holds are not sent again (the LFS batch API answers them without an upload action) and Xet
deduplicates chunks it already stored. Computed sha256s are kept in
``<folder>/.cache/huggingface/curate_upload.json`` (keyed by path, size, mtime and inode; never a
token), so a rerun does not hash the data again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curate.errors import ConfigError, CurateError, Interrupted

#: At most this many files per commit (the Hub handles a few hundred; small commits resume finer).
FILES_PER_COMMIT = 100
#: A commit is closed once its files reach this many bytes (a rerun redoes at most one such commit).
BYTES_PER_COMMIT = 5 * 1024**3
#: Files under this size may go inline (base64) in the commit payload; they get their own budget.
SMALL_FILE = 10 * 1024 * 1024
SMALL_BYTES_PER_COMMIT = 64 * 1024 * 1024

#: Where the sha256 cache lives, inside the uploaded folder (never uploaded itself).
CACHE_FILE = Path(".cache") / "huggingface" / "curate_upload.json"

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?P<ns>{_NAME})/(?P<name>{_NAME})")
_OFFLINE = ("huggingface_hub is in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset both "
            "to publish to the Hub")
_PR_REF = re.compile(r"refs/pr/\d+")
_SHA = re.compile(r"[0-9a-f]{40}")


def upload_dataset_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                          token: str | None = None, num_workers: int | None = None,
                          log: Callable[[str], Any] | logging.Logger | None = None) -> dict:
    """Upload every file under ``folder`` to the dataset repo ``repo_id`` on the Hub; rerun to resume.

    Contract:

    - ``repo_id`` must be ``namespace/name`` by the Hub's rules (ASCII letters, digits, ``-``, ``_``,
      ``.``; no ``--`` or ``..``; not starting or ending with ``-`` or ``.``; at most 96 characters each;
      not ending in ``.git``); anything else raises :class:`~curate.errors.ConfigError` before any network
      call. So do a missing or empty ``folder``, a ``README.md`` whose YAML front matter does not parse,
      a ``revision`` that is not a usable branch name (or is a tag or a commit), and ``private=True`` for
      an existing repo that is public (nothing is uploaded then).
    - The dataset repo is created if missing (``private`` applies to a new repo only; an existing repo
      keeps its visibility). With ``revision``, that branch is created from ``main`` if missing;
      ``refs/pr/N`` is used as it is. Default: ``main``.
    - Uploaded: every regular file under ``folder`` at the same relative path (symlinks to files are
      followed, symlinked folders are not), except ``.git/`` folders and ``.cache/huggingface/``. Files
      already on the Hub at that revision with identical bytes are skipped. Remote files that are not in the folder are kept
      (they are listed under ``remote_only`` in the result and logged).
    - Resumable: commits are made batch by batch (data first, ``README.md`` last); after any failure or
      kill, the same call uploads only what is not committed yet. ``folder`` is not modified except for
      the hash cache ``.cache/huggingface/curate_upload.json``.
    - Token: ``token``, else what huggingface_hub finds (``HF_TOKEN``, then the saved ``hf auth login``).
      It is sent only in the ``Authorization`` header to the Hub, never logged, printed, written to a
      file or put in an exception message (it is registered with :mod:`curate.secrets` for redaction).
      The endpoint is huggingface_hub's (``HF_ENDPOINT``, default https://huggingface.co).
    - Errors from the Hub or the network (401, 403, 404, 409, 429, 5xx, timeouts, refused connections)
      raise :class:`~curate.errors.CurateError` with one line saying what to do (log in, check the repo
      name or token permissions, rerun to resume); Ctrl-C raises :class:`~curate.errors.Interrupted`.
      No huggingface_hub or httpx exception escapes.
    - ``num_workers``: parallel LFS uploads (huggingface_hub's default, 5, if None; Xet has its own).
    - ``log``: a callable taking one line of text, or a :class:`logging.Logger` (its ``info``); default
      the ``curate.hub_upload`` logger.

    Returns ``{"repo_id", "repo_type": "dataset", "url", "revision", "private", "commit" (the head after
    the upload, or None if unknown), "commits" (made by this call), "files_uploaded", "files_skipped",
    "bytes_uploaded", "remote_only"}`` (paths are repo-relative, sorted as uploaded).
    """
    say = _logger(log)
    folder = Path(folder)
    ns, _ = check_repo_id(repo_id)
    branch = _check_revision(revision)
    files = _list_files(folder)
    _check_card(folder, files)

    try:
        import huggingface_hub  # noqa: F401  (lazily: the rest of curate never needs it)
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import get_token
    except ImportError:
        raise ConfigError("publishing needs huggingface_hub: pip install huggingface_hub") from None

    if hf_constants.is_offline_mode():
        raise ConfigError(_OFFLINE)
    try:
        token = token or get_token()
    except Exception as e:  # noqa: BLE001 - an OIDC exchange (HF_OIDC_RESOURCE) that failed
        raise CurateError(_one_line(f"could not get a Hugging Face token ({type(e).__name__}): log in with "
                                    "`hf auth login` or set HF_TOKEN")) from None
    if not token:
        raise CurateError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN "
                          "(a token with write access)")
    from curate import secrets

    secrets.register(token)
    endpoint = hf_constants.ENDPOINT
    try:
        return _upload(folder, files, repo_id, ns, private=private, branch=branch, token=token,
                       num_workers=num_workers, say=say)
    except CurateError:
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"upload to {repo_id} interrupted; run the same command again to resume "
                          "(committed files are not sent again)") from None
    except Exception as e:  # noqa: BLE001 - every Hub/network failure becomes one clear line
        raise CurateError(secrets.redact(_explain(e, repo_id, branch, endpoint))) from None


# ----------------------------------------------------------------------------------------- checks


def _logger(log) -> Callable[[str], Any]:
    if log is None:
        return logging.getLogger("curate.hub_upload").info
    if isinstance(log, logging.Logger):
        return log.info
    return log


def check_repo_id(repo_id: str) -> tuple[str, str]:
    """``(namespace, name)`` of a Hub repo id, or ConfigError saying what the Hub accepts."""
    rules = ("expected 'namespace/name' (ASCII letters, digits, '-', '_', '.'; no '--' or '..'; not "
             "starting or ending with '-' or '.'; at most 96 characters each)")
    if not isinstance(repo_id, str) or not repo_id:
        raise ConfigError(f"repo {repo_id!r}: not a Hub repo id; {rules}")
    hint = ""
    low = repo_id.lower()
    if "://" in repo_id or low.startswith(("huggingface.co/", "hf.co/")):
        hint = " (give the id, not the URL)"
    elif low.startswith(("datasets/", "models/", "spaces/")):
        hint = " (without the 'datasets/' prefix)"
    m = _REPO_ID.fullmatch(repo_id)
    if (m is None or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git")):
        raise ConfigError(f"repo {repo_id!r}: not a Hub repo id{hint}; {rules}")
    return m["ns"], m["name"]


def _check_revision(revision: str | None) -> str | None:
    if revision is None or revision == "main":
        return None
    bad = (not isinstance(revision, str) or not revision or revision.startswith(("-", "/"))
           or revision.endswith(("/", ".", ".lock")) or ".." in revision or "//" in revision or "@{" in revision
           or revision == "@" or any(c.isspace() or c in "~^:?*[\\" or ord(c) < 32 for c in revision))
    if bad:
        raise ConfigError(f"revision {revision!r}: not a valid branch name")
    if _SHA.fullmatch(revision):
        raise ConfigError(f"revision {revision!r} is a commit id; give a branch name (it is created if missing)")
    return revision


def _list_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) for every file to upload, sorted: README.md last, the rest by path."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder to upload")
    out: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if d != ".git"
                         and not (rel_root == Path(".cache") and d == "huggingface"))
        for n in names:
            p = Path(root) / n
            if n == ".git" or not p.is_file():
                continue
            out.append(((rel_root / n).as_posix(), p))
    if not out:
        raise ConfigError(f"{folder}: nothing to upload (the folder has no files)")
    out.sort(key=lambda t: (t[0] == "README.md", t[0]))
    return out


def _check_card(folder: Path, files: list[tuple[str, Path]]) -> None:
    """A README.md whose YAML front matter does not parse would be refused by the Hub, after the data."""
    if not any(rel == "README.md" for rel, _ in files):
        return
    import yaml

    text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return
    m = re.match(r"---[ \t]*\r?\n(.*?)(?:\r?\n)---[ \t]*(?:\r?\n|$)", text, re.DOTALL)
    if m is None:
        raise ConfigError(f"{folder / 'README.md'}: the YAML front matter has no closing '---' line")
    try:
        meta = yaml.safe_load(m[1])
    except yaml.YAMLError as e:
        raise ConfigError(_one_line(f"{folder / 'README.md'}: the YAML front matter does not parse: {e}")) from None
    if meta is not None and not isinstance(meta, dict):
        raise ConfigError(f"{folder / 'README.md'}: the YAML front matter must be a mapping")


# ----------------------------------------------------------------------------------------- upload


def _upload(folder: Path, files: list[tuple[str, Path]], repo_id: str, ns: str, *, private: bool,
            branch: str | None, token: str, num_workers: int | None, say) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.hf_api import RepoFile

    from curate import __version__

    api = HfApi(token=token, library_name="curate-longctx", library_version=__version__)
    url = str(api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private))
    info = api.dataset_info(repo_id)
    if private and info.private is False:
        raise ConfigError(f"{repo_id} exists and is public, and private=True was asked: nothing was uploaded; "
                          "make the repo private on the Hub, or publish without --private")
    if branch is not None and not _PR_REF.fullmatch(branch):
        refs = api.list_repo_refs(repo_id, repo_type="dataset")
        if branch in {t.name for t in refs.tags} and branch not in {b.name for b in refs.branches}:
            raise ConfigError(f"revision {branch!r} is a tag of {repo_id}; commits go to a branch")
        if branch not in {b.name for b in refs.branches}:
            say(f"creating branch {branch} of {repo_id}")
            api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True)
    rev = branch or "main"

    remote: dict[str, Any] = {}
    for entry in api.list_repo_tree(repo_id, recursive=True, revision=branch, repo_type="dataset"):
        if isinstance(entry, RepoFile):
            remote[entry.path] = entry

    cache = _HashCache(folder)
    todo: list[tuple[str, Path, int]] = []
    skipped: list[str] = []
    for rel, path in files:
        size = path.stat().st_size
        r = remote.get(rel)
        if r is not None and r.size == size and _same(path, r, rel, cache):
            skipped.append(rel)
        else:
            todo.append((rel, path, size))
    cache.save()
    local = {rel for rel, _ in files}
    remote_only = sorted(p for p in remote if p not in local and p != ".gitattributes")
    if remote_only:
        say(f"{len(remote_only)} file(s) on the Hub at {rev} are not in {folder} and are kept: "
            + ", ".join(remote_only[:5]) + (" …" if len(remote_only) > 5 else ""))

    batches = _batches(todo)
    total = sum(size for _, _, size in todo)
    say(f"{repo_id}@{rev}: {len(todo)} file(s) to upload ({_fmt(total)}) in {len(batches)} commit(s), "
        f"{len(skipped)} already on the Hub")
    uploaded: list[str] = []
    commit_oid = None
    for k, batch in enumerate(batches, 1):
        ops = []
        for rel, path, _ in batch:
            op = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
            known = cache.get(rel, path)
            if known is not None:
                op.upload_info.sha256 = bytes.fromhex(known)
            ops.append(op)
        part = f" (part {k} of {len(batches)})" if len(batches) > 1 else ""
        try:
            kwargs = {"num_threads": num_workers} if num_workers else {}
            res = api.create_commit(repo_id, ops, commit_message=f"Upload dataset with curate{part}",
                                    repo_type="dataset", revision=branch, **kwargs)
        finally:
            for (rel, path, _), op in zip(batch, ops):
                if op.upload_info.is_hashed:
                    cache.put(rel, path, op.upload_info.sha256.hex())
            cache.save()
        commit_oid = res.oid
        uploaded.extend(rel for rel, _, _ in batch)
        say(f"commit {k}/{len(batches)}: {len(batch)} file(s), {_fmt(sum(s for _, _, s in batch))}")
    if commit_oid is None:
        commit_oid = info.sha if branch is None else None
        if branch is not None:
            with contextlib.suppress(Exception):
                commit_oid = api.dataset_info(repo_id, revision=branch).sha
    say(f"{repo_id}@{rev} is up to date: {len(uploaded)} file(s) uploaded, {len(skipped)} already there")
    return {"repo_id": repo_id, "repo_type": "dataset", "url": url, "revision": rev,
            "private": bool(info.private), "commit": commit_oid, "commits": len(batches),
            "files_uploaded": uploaded, "files_skipped": skipped,
            "bytes_uploaded": total, "remote_only": remote_only}


def _batches(todo: list[tuple[str, Path, int]]) -> list[list[tuple[str, Path, int]]]:
    out: list[list[tuple[str, Path, int]]] = []
    cur: list[tuple[str, Path, int]] = []
    nbytes = small = 0
    for item in todo:
        size = item[2]
        is_small = size < SMALL_FILE
        if cur and (len(cur) >= FILES_PER_COMMIT or nbytes + size > BYTES_PER_COMMIT
                    or (is_small and small + size > SMALL_BYTES_PER_COMMIT)):
            out.append(cur)
            cur, nbytes, small = [], 0, 0
        cur.append(item)
        nbytes += size
        small += size if is_small else 0
    if cur:
        out.append(cur)
    return out


def _same(path: Path, remote, rel: str, cache: _HashCache) -> bool:
    """Whether the local file has the remote file's bytes (sha256 for LFS/Xet files, git blob id else)."""
    if remote.lfs is not None:
        sha = cache.get(rel, path)
        if sha is None:
            sha = _digest(path, hashlib.sha256())
            cache.put(rel, path, sha)
        return sha == remote.lfs.sha256
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    return _digest(path, h) == remote.blob_id


def _digest(path: Path, h) -> str:
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class _HashCache:
    """sha256 of local files by path, valid while size, mtime and inode are unchanged (best effort)."""

    def __init__(self, folder: Path):
        self.path = folder / CACHE_FILE
        self.entries: dict[str, list] = {}
        self.dirty = False
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(self.path.read_text())
            if data.get("version") == 1 and isinstance(data.get("files"), dict):
                self.entries = data["files"]

    @staticmethod
    def _key(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def get(self, rel: str, path: Path) -> str | None:
        e = self.entries.get(rel)
        with contextlib.suppress(OSError):  # a file gone since listing: no cached hash
            if isinstance(e, list) and len(e) == 2 and e[0] == self._key(path):
                return str(e[1])
        return None

    def put(self, rel: str, path: Path, sha256: str) -> None:
        with contextlib.suppress(OSError):
            self.entries[rel] = [self._key(path), sha256]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ignore = self.path.parent / ".gitignore"
            if not ignore.exists():
                ignore.write_text("*\n")
            tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
            tmp.write_text(json.dumps({"version": 1, "files": self.entries}, sort_keys=True))
            os.replace(tmp, self.path)
            self.dirty = False


# ----------------------------------------------------------------------------------------- errors


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _causes(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _explain(e: BaseException, repo_id: str, branch: str | None, endpoint: str) -> str:
    """One line saying what failed and what to do, for any exception out of huggingface_hub."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    resume = "run the same command again to resume (committed files are not sent again)"
    ns = repo_id.split("/")[0]
    for c in _causes(e):
        if isinstance(c, OfflineModeIsEnabled):
            return _OFFLINE
        if isinstance(c, HfHubHTTPError) and getattr(c, "response", None) is not None:
            code = c.response.status_code
            server = _one_line(c.server_message or "", 200)
            detail = f": {server}" if server else ""
            if code == 401:
                return (f"the Hub refused the token (401 Unauthorized) for {repo_id}: log in again with "
                        "`hf auth login` or set HF_TOKEN to a valid token with write access; if the token is "
                        "valid, check the repo name")
            if code == 403:
                return (f"no write access to {repo_id} (403 Forbidden{detail}): use a token with write "
                        f"permission for '{ns}' (`hf auth login`), or check the repo name")
            if isinstance(c, RevisionNotFoundError):
                return f"revision {branch or 'main'!r} not found in {repo_id} (404): check the revision"
            if code == 404 or isinstance(c, RepositoryNotFoundError):
                return (f"{repo_id} not found on {endpoint} (404): check the repo name, and that your token "
                        "can see it")
            if code == 429:
                return f"the Hub is rate-limiting uploads (429{detail}): wait a few minutes, then {resume}"
            if code >= 500 or code in (408, 409):
                return f"the Hub failed ({code}{detail}) while uploading to {repo_id}: {resume}"
            return (f"the Hub refused the upload to {repo_id} ({code}{detail}): check the files and the "
                    "dataset card, then run the same command again")
    for c in _causes(e):
        mod = type(c).__module__.split(".")[0]
        if mod in ("httpx2", "httpx", "httpcore", "h11", "ssl") or isinstance(c, (ConnectionError, TimeoutError)):
            what = type(c).__name__
            if "Connect" in what or isinstance(c, ConnectionRefusedError):
                return (f"could not reach {endpoint} to upload to {repo_id} ({what}): check the network (and "
                        f"HF_ENDPOINT), then {resume}")
            return (f"lost the connection to {endpoint} while uploading to {repo_id} ({what}): {resume}")
    first = next(iter(_causes(e)))
    msg = _one_line(str(first), 200)
    if isinstance(first, ValueError) and "README.md" in msg:
        return f"the Hub refused README.md's metadata: {msg}"
    return f"upload to {repo_id} failed ({type(first).__name__}: {msg}): {resume}"

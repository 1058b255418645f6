"""A loopback fake of the Hugging Face Hub's HTTP API: just enough for uploads, for protocol tests.

::

    with FakeHub(tokens={"hf_test_write"}, lfs_threshold=100_000) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_write", "HF_HUB_DISABLE_XET": "1"}
        ...  # run the upload in a subprocess with env
        assert hub.snapshot("org/name") == {path: bytes, ...}
        assert [c.kind for c in hub.calls] == [...]

A ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a daemon thread; ``stop()`` (or leaving
the ``with``) shuts it down and releases requests held by ``hang``. HTTP/1.0: one connection per request.

Endpoints (``{t}`` is ``models``/``datasets``/``spaces``, ``{rev}`` a URL-quoted revision):

    POST /api/repos/create                         {name, organization, type, visibility|private}; 409 if it exists
    GET  /api/{t}/{ns}/{name}[/revision/{rev}]     repo info: id, sha, private, siblings, lastModified
    GET  /api/{t}/{ns}/{name}/refs                 branches (+ tags, converts, pullRequests)
    POST /api/{t}/{ns}/{name}/branch/{branch}      {startingPoint?}; 409 if it exists
    GET  /api/{t}/{ns}/{name}/tree/{rev}[/{path}]  ?recursive=: files {type, oid, size, path, lfs?}, directories
    POST /api/validate-yaml                        {content, repoType}: 400 with errors if the front matter is bad
    POST /api/{t}/{ns}/{name}/preupload/{rev}      {files: [{path, sample, size}]} -> uploadMode, shouldIgnore, oid
    POST /{t}/{ns}/{name}.git/info/lfs/objects/batch   LFS batch API (upload): actions only for missing objects
    PUT  /_lfs/{t}/{ns}/{name}/{oid}               basic transfer (checks size and sha256); no auth expected
    PUT  /_lfs/{t}/{ns}/{name}/{oid}/part/{n}      multipart transfer parts (answer an ``etag``)
    POST /_lfs/{t}/{ns}/{name}/{oid}/complete      multipart completion {oid, parts: [{partNumber, etag}]}
    POST /_lfs/{t}/{ns}/{name}/verify              LFS verify {oid, size}
    POST /api/{t}/{ns}/{name}/commit/{rev}         ndjson: header, file (base64), lfsFile, deletedFile, deletedFolder
    GET  /api/{t}/{ns}/{name}/xet-*-token/{rev}    refused (404), recorded as kind ``xet``

Upload modes (as the Hub decides them): ``lfs`` when the path matches the repo's ``.gitattributes`` LFS
patterns (a new repo gets :data:`LFS_PATTERNS`), the size is ``>= lfs_threshold`` (the Hub: 10 MB), or the
512-byte sample has a NUL byte (binary); else ``regular``. The fake never offers Xet: huggingface_hub 2.4
chooses Xet on the client side alone (``hf_xet`` importable and ``HF_HUB_DISABLE_XET`` unset; nothing
in a preupload or batch answer changes it), so a test that wants the LFS protocol sets
``HF_HUB_DISABLE_XET=1`` for the client; an attempt at Xet shows up as a call of kind ``xet``.
LFS objects of at least ``multipart_threshold`` bytes get a multipart upload in ``multipart_chunk`` parts.

Auth: every ``/api`` and LFS-batch call needs ``Authorization: Bearer <token>``; an unknown token gets 401
``Invalid credentials in Authorization header``, a ``read_only_tokens`` one gets 403 on writes; a private
repo is 404 ``RepoNotFound`` without a valid token. The storage URLs (``/_lfs``) take no auth, like S3.

Every request is recorded as a :class:`Call` in ``calls`` (``calls_since(mark)`` for one run): kind,
method, path, status, the Authorization header, the file paths it carried (preupload, commit), the LFS
oids (batch, put, commit), and bytes received. ``fail(kind, nth=, action=, times=, match=)`` injects a
failure into the nth matching request of that kind (counted from the ``fail`` call): ``"status CODE"``,
``"drop"`` (read the request, close without an answer: nothing applied), ``"drop_after"`` (apply it,
then close without an answer: a lost response), ``"hang"`` (hold the request until ``release()`` or
``stop()``, then close without an answer), ``"delay X"``. ``wait_for(predicate)`` blocks until the
recorded calls satisfy it (e.g. a request is hanging, so the test can kill the client). Kinds: create_repo, repo_info, refs, create_branch, tree, validate_yaml,
preupload, lfs_batch, lfs_put, lfs_part, lfs_complete, lfs_verify, commit, xet, unknown.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

#: LFS patterns of a new repo's .gitattributes (a subset of the Hub's default).
LFS_PATTERNS = ("*.parquet", "*.arrow", "*.tar", "*.png", "*.jpg", "*.zst", "*.gz", "*.bin")

_REPO = r"(?P<t>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+?)"


@dataclass
class Call:
    n: int
    kind: str
    method: str
    path: str
    query: dict
    authorization: str | None
    repo: str | None = None
    status: int | None = None
    files: list[str] = field(default_factory=list)
    oids: list[str] = field(default_factory=list)
    nbytes: int = 0
    injected: str | None = None
    payload: Any = None


@dataclass
class _Rule:
    kind: str
    nth: int
    action: str
    times: int
    match: str | None
    seen: int = 0
    fired: int = 0


@dataclass
class _File:
    kind: str  # "regular" or "lfs"
    size: int
    sha256: str
    git_oid: str
    data: bytes | None  # regular files only


@dataclass
class _Repo:
    type: str
    id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict] = field(default_factory=dict)  # oid -> {parent, summary, files: {path: _File}}
    lfs: dict[str, bytes] = field(default_factory=dict)
    parts: dict[str, dict[int, bytes]] = field(default_factory=dict)


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class _Abort(Exception):
    """Close the connection without an answer."""


class FakeHub:
    def __init__(self, *, tokens=("hf_fake_write_token",), read_only_tokens=(),
                 lfs_threshold: int = 10_000_000, multipart_threshold: int | None = None,
                 multipart_chunk: int = 5 * 1024 * 1024, lfs_patterns=LFS_PATTERNS, verify: bool = True):
        self.tokens = set(tokens)
        self.read_only_tokens = set(read_only_tokens)
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.lfs_patterns = tuple(lfs_patterns)
        self.verify = verify
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.calls: list[Call] = []
        self._rules: list[_Rule] = []
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._released = threading.Event()
        self._stopped = threading.Event()
        self._commit_seq = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------------------------ harness

    def fail(self, kind: str, *, nth: int = 1, action: str = "status 500", times: int = 1,
             match: str | None = None) -> None:
        """Inject ``action`` into the ``nth`` (1-based, counted from now) request of ``kind`` whose path
        contains ``match``, and the ``times - 1`` matching ones after it."""
        with self._lock:
            if action == "hang":
                self._released.clear()  # re-arm after an earlier release()
            self._rules.append(_Rule(kind, nth, action, times, match))

    def release(self) -> None:
        """Let requests held by ``hang`` go (they close without an answer)."""
        self._released.set()

    def mark(self) -> int:
        with self._lock:
            return len(self.calls)

    def calls_since(self, mark: int) -> list[Call]:
        with self._lock:
            return list(self.calls[mark:])

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        """Block until ``predicate(calls)`` is true (re-checked on each new call) or ``timeout``."""
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.calls)):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def create_repo(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> None:
        """Make a repo directly (as if it existed before the test)."""
        with self._lock:
            self._new_repo(repo_type + "s", repo_id, private)

    def snapshot(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, bytes]:
        """path -> content of every file at ``revision`` (LFS contents resolved)."""
        with self._lock:
            repo = self.repos[(repo_type + "s", repo_id)]
            files = repo.commits[repo.branches[revision]]["files"]
            return {p: (f.data if f.kind == "regular" else repo.lfs[f.sha256]) for p, f in files.items()}

    def modes(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> dict[str, str]:
        with self._lock:
            repo = self.repos[(repo_type + "s", repo_id)]
            return {p: f.kind for p, f in repo.commits[repo.branches[revision]]["files"].items()}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "dataset") -> list[dict]:
        """The commits of ``revision``, oldest first: {oid, summary, added: [paths]}."""
        with self._lock:
            repo = self.repos[(repo_type + "s", repo_id)]
            out, oid = [], repo.branches[revision]
            while oid is not None:
                c = repo.commits[oid]
                out.append({"oid": oid, "summary": c["summary"], "added": list(c["added"])})
                oid = c["parent"]
            return out[::-1]

    # ------------------------------------------------------------------------------------ state

    def _new_repo(self, t: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(type=t, id=repo_id, private=private)
        attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns).encode()
        files = {".gitattributes": _File("regular", len(attrs), hashlib.sha256(attrs).hexdigest(),
                                         _git_blob_oid(attrs), attrs)}
        oid = self._next_oid()
        repo.commits[oid] = {"parent": None, "summary": "initial commit", "files": files,
                             "added": [".gitattributes"]}
        repo.branches["main"] = oid
        self.repos[(t, repo_id)] = repo
        return repo

    def _next_oid(self) -> str:
        self._commit_seq += 1
        return hashlib.sha1(f"commit-{self._commit_seq}-{time.time_ns()}".encode()).hexdigest()

    def _lfs_patterns_of(self, files: dict[str, _File]) -> list[str]:
        attrs = files.get(".gitattributes")
        if attrs is None or attrs.data is None:
            return []
        return [line.split()[0] for line in attrs.data.decode(errors="replace").splitlines()
                if "filter=lfs" in line and line.split()]

    def _mode(self, files: dict[str, _File], path: str, size: int, sample: bytes) -> str:
        name = path.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in self._lfs_patterns_of(files)):
            return "lfs"
        if size >= self.lfs_threshold or b"\0" in sample:
            return "lfs"
        return "regular"

    def _inject(self, call: Call) -> str | None:
        for rule in self._rules:
            if rule.kind != call.kind or (rule.match is not None and rule.match not in call.path):
                continue
            rule.seen += 1
            if rule.seen >= rule.nth and rule.fired < rule.times:
                rule.fired += 1
                return rule.action
        return None


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):
        pass

    # --------------------------------------------------------------------------------- plumbing

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: Any = None, headers: dict | None = None) -> None:
        if isinstance(body, (dict, list)):
            data, ctype = json.dumps(body).encode(), "application/json"
        elif isinstance(body, bytes):
            data, ctype = body, "application/octet-stream"
        else:
            data, ctype = (body or "").encode(), "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", f"fake-{self._call.n}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self._call.status = status

    def _error(self, status: int, message: str, code: str | None = None, body: Any = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, body if body is not None else {"error": message}, headers)

    def _handle(self) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        raw = split.path
        kind, m = _route(self.command, raw)
        with fake._lock:
            call = Call(n=len(fake.calls), kind=kind, method=self.command, path=raw,
                        query={k: v[-1] for k, v in parse_qs(split.query).items()},
                        authorization=self.headers.get("Authorization"))
            if m is not None and "ns" in m.groupdict():
                call.repo = f"{unquote(m['ns'])}/{unquote(m['name'])}"
            fake.calls.append(call)
            action = fake._inject(call)
            call.injected = action
            fake._cond.notify_all()
        self._call = call
        try:
            body = self._body()
        except OSError:
            return
        call.nbytes = len(body)
        try:
            if action is not None:
                if action == "hang":
                    while not fake._released.wait(0.05):
                        pass
                    raise _Abort
                if action == "drop":
                    raise _Abort
                if action.startswith("status"):
                    code = int(action.split()[1])
                    self._error(code, f"injected failure ({code})")
                    return
                if action.startswith("delay"):
                    time.sleep(float(action.split()[1]))
            if action == "drop_after":
                self._dispatch(kind, m, body, answer=False)
                raise _Abort
            self._dispatch(kind, m, body)
        except _Abort:
            call.status = None
            self.close_connection = True
            return
        finally:
            with fake._cond:
                fake._cond.notify_all()

    # --------------------------------------------------------------------------------- auth

    def _auth(self, *, write: bool) -> str | None:
        """The token, or None after answering 401/403."""
        h = self.headers.get("Authorization") or ""
        token = h[7:] if h.startswith("Bearer ") else None
        fake = self.fake
        if token is None or (token not in fake.tokens and token not in fake.read_only_tokens):
            self._error(401, "Invalid credentials in Authorization header")
            return None
        if write and token not in fake.tokens:
            self._error(403, "You don't have the rights to write to this repository")
            return None
        return token

    def _repo(self, m, *, write: bool) -> _Repo | None:
        if self._auth(write=write) is None:
            return None
        repo = self.fake.repos.get((m["t"], f"{unquote(m['ns'])}/{unquote(m['name'])}"))
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _rev(self, repo: _Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev in repo.commits:
            return rev
        self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return None

    # --------------------------------------------------------------------------------- endpoints

    def _dispatch(self, kind: str, m, body: bytes, answer: bool = True) -> None:
        fake = self.fake
        if not answer:
            # apply, but answer into a buffer that is thrown away (the connection is then closed)
            self.wfile, real = _Null(), self.wfile
            try:
                self._dispatch(kind, m, body)
            finally:
                self.wfile = real
            return
        with fake._lock:
            handler = getattr(self, f"_ep_{kind}", None)
            if handler is None:
                self._error(404, f"fake hub: no route for {self.command} {self.path}")
                return
            handler(m, body)

    def _ep_create_repo(self, m, body):
        if self._auth(write=True) is None:
            return
        req = json.loads(body or b"{}")
        self._call.payload = req
        t = (req.get("type") or "model") + "s"
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        url = f"{self.fake.url}/{'' if t == 'models' else t + '/'}{repo_id}"
        self._call.repo = repo_id
        if (t, repo_id) in self.fake.repos:
            self._error(409, "You already created this repo", body={"error": "You already created this repo",
                                                                     "url": url})
            return
        private = req.get("visibility") == "private" if "visibility" in req else bool(req.get("private"))
        self.fake._new_repo(t, repo_id, private)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _ep_repo_info(self, m, body):
        repo = self._repo(m, write=False)
        if repo is None:
            return
        oid = self._rev(repo, m["rev"] or "main")
        if oid is None:
            return
        files = repo.commits[oid]["files"]
        self._send(200, {"_id": repo.id, "id": repo.id, "author": repo.id.split("/")[0], "sha": oid,
                         "private": repo.private, "gated": False, "disabled": False, "downloads": 0,
                         "likes": 0, "tags": [], "lastModified": "2026-01-01T00:00:00.000Z",
                         "createdAt": "2026-01-01T00:00:00.000Z",
                         "siblings": [{"rfilename": p} for p in sorted(files)]})

    def _ep_refs(self, m, body):
        repo = self._repo(m, write=False)
        if repo is None:
            return

        def refs(d, prefix):
            return [{"name": k, "ref": f"{prefix}{k}", "targetCommit": v} for k, v in sorted(d.items())]

        self._send(200, {"branches": refs(repo.branches, "refs/heads/"),
                         "tags": refs(repo.tags, "refs/tags/"), "converts": [], "pullRequests": []})

    def _ep_create_branch(self, m, body):
        repo = self._repo(m, write=True)
        if repo is None:
            return
        branch = unquote(m["branch"])
        req = json.loads(body or b"{}")
        self._call.payload = req
        if branch in repo.branches:
            self._error(409, f"Reference already exists: refs/heads/{branch}")
            return
        start = self._rev(repo, req.get("startingPoint") or "main")
        if start is None:
            return
        repo.branches[branch] = start
        self._send(200, {})

    def _ep_tree(self, m, body):
        repo = self._repo(m, write=False)
        if repo is None:
            return
        oid = self._rev(repo, m["rev"])
        if oid is None:
            return
        prefix = unquote(m["path"] or "").strip("/")
        recursive = self._call.query.get("recursive", "").lower() in ("true", "1")
        files = repo.commits[oid]["files"]
        entries, dirs = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            base = f"{prefix}/" if prefix else ""
            for i in range(1, len(parts)):
                d = base + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    tree_oid = hashlib.sha1(d.encode()).hexdigest()
                    entries.append({"type": "directory", "oid": tree_oid, "path": d})
            if not recursive and len(parts) > 1:
                continue
            f = files[path]
            e = {"type": "file", "oid": f.git_oid, "size": f.size, "path": path}
            if f.kind == "lfs":
                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(_pointer(f.sha256, f.size))}
            entries.append(e)
        self._send(200, entries)

    def _ep_validate_yaml(self, m, body):
        if self._auth(write=False) is None:
            return
        import yaml

        content = json.loads(body or b"{}").get("content", "")
        mm = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if mm is not None:
            try:
                meta = yaml.safe_load(mm[1])
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": '"value" must be of type object'})
            except yaml.YAMLError as e:
                errors.append({"message": f"YAML parse error: {e}"})
        if errors:
            self._error(400, "Invalid metadata", body={"errors": errors, "warnings": []})
        else:
            self._send(200, {"errors": [], "warnings": []})

    def _ep_preupload(self, m, body):
        repo = self._repo(m, write=True)
        if repo is None:
            return
        oid = self._rev(repo, m["rev"])
        if oid is None:
            return
        files = repo.commits[oid]["files"]
        req = json.loads(body)
        out = []
        for f in req["files"]:
            sample = base64.b64decode(f.get("sample") or "")
            mode = self._mode_for(files, f["path"], int(f["size"]), sample)
            have = files.get(f["path"])
            remote_oid = None if have is None else (have.sha256 if have.kind == "lfs" else have.git_oid)
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
            self._call.files.append(f["path"])
        self._send(200, {"files": out, "commitOid": oid})

    def _mode_for(self, files, path, size, sample):
        return self.fake._mode(files, path, size, sample)

    def _ep_lfs_batch(self, m, body):
        repo = self._repo(m, write=True)
        if repo is None:
            return
        req = json.loads(body)
        self._call.payload = {k: v for k, v in req.items() if k != "objects"}
        if req.get("operation") != "upload":
            self._error(422, "only uploads are faked")
            return
        transfers = req.get("transfers") or ["basic"]
        base = f"{self.fake.url}/_lfs/{repo.type}/{repo.id}"
        objects = []
        for o in req["objects"]:
            oid, size = o["oid"], int(o["size"])
            self._call.oids.append(oid)
            if oid in repo.lfs:
                objects.append({"oid": oid, "size": size})  # present: no actions, nothing to send
                continue
            mp = self.fake.multipart_threshold
            if "multipart" in transfers and mp is not None and size >= mp:
                chunk = self.fake.multipart_chunk
                n = -(-size // chunk)
                parts = {str(i): f"{base}/{oid}/part/{i}" for i in range(1, n + 1)}
                header = {"chunk_size": str(chunk), **parts}
                upload = {"href": f"{base}/{oid}/complete", "header": header}
            else:
                upload = {"href": f"{base}/{oid}"}
            actions = {"upload": upload}
            if self.fake.verify:
                actions["verify"] = {"href": f"{base}/verify"}
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _storage_repo(self, m) -> _Repo | None:
        repo = self.fake.repos.get((m["t"], f"{unquote(m['ns'])}/{unquote(m['name'])}"))
        if repo is None:
            self._error(404, "no such bucket")
        return repo

    def _ep_lfs_put(self, m, body):
        repo = self._storage_repo(m)
        if repo is None:
            return
        oid = m["oid"]
        self._call.oids.append(oid)
        if hashlib.sha256(body).hexdigest() != oid:
            self._error(400, "sha256 of the body does not match the oid")
            return
        repo.lfs[oid] = body
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _ep_lfs_part(self, m, body):
        repo = self._storage_repo(m)
        if repo is None:
            return
        oid, n = m["oid"], int(m["part"])
        self._call.oids.append(oid)
        repo.parts.setdefault(oid, {})[n] = body
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _ep_lfs_complete(self, m, body):
        repo = self._storage_repo(m)
        if repo is None:
            return
        oid = m["oid"]
        self._call.oids.append(oid)
        req = json.loads(body)
        parts = repo.parts.get(oid, {})
        try:
            for p in req["parts"]:
                if p["etag"].strip('"') != hashlib.md5(parts[p["partNumber"]]).hexdigest():
                    raise KeyError(p["partNumber"])
            data = b"".join(parts[p["partNumber"]] for p in sorted(req["parts"], key=lambda p: p["partNumber"]))
        except KeyError:
            self._error(400, "missing or mismatched part")
            return
        if hashlib.sha256(data).hexdigest() != oid or req.get("oid") != oid:
            self._error(400, "assembled object does not match its oid")
            return
        repo.lfs[oid] = data
        repo.parts.pop(oid, None)
        self._send(200, {})

    def _ep_lfs_verify(self, m, body):
        repo = self._storage_repo(m)
        if repo is None:
            return
        req = json.loads(body)
        self._call.oids.append(req.get("oid"))
        data = repo.lfs.get(req.get("oid"))
        if data is None or len(data) != req.get("size"):
            self._error(404, "object not found")
            return
        self._send(200, {})

    def _ep_commit(self, m, body):
        repo = self._repo(m, write=True)
        if repo is None:
            return
        branch = unquote(m["rev"])
        if branch not in repo.branches:
            self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return
        head = repo.branches[branch]
        files = dict(repo.commits[head]["files"])
        header, added = {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = _File("regular", len(data), hashlib.sha256(data).hexdigest(),
                                             _git_blob_oid(data), data)
                added.append(value["path"])
            elif key == "lfsFile":
                oid = value["oid"]
                data = repo.lfs.get(oid)
                if data is None:
                    self._error(422, "Your push was rejected because an LFS pointer pointed to a file that does "
                                     "not exist. For instance, this can happen if you used git push --no-verify "
                                     "or if you are using a non-standard git-lfs version.")
                    return
                if "size" in value and int(value["size"]) != len(data):
                    self._error(422, f"LFS file {value['path']}: size mismatch")
                    return
                files[value["path"]] = _File("lfs", len(data), oid, _git_blob_oid(_pointer(oid, len(data))), None)
                added.append(value["path"])
                self._call.oids.append(oid)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                pre = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(pre)]:
                    files.pop(p)
            else:
                self._error(400, f"unknown commit operation {key!r}")
                return
        self._call.files = list(added)
        parent = header.get("parentCommit")
        if parent is not None and parent != head:
            self._error(412, "A commit has happened since. Please refresh and try again.")
            return
        oid = self.fake._next_oid()
        repo.commits[oid] = {"parent": head, "summary": header.get("summary", ""), "files": files, "added": added}
        repo.branches[branch] = oid
        prefix = "" if repo.type == "models" else repo.type + "/"
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.fake.url}/{prefix}{repo.id}/commit/{oid}",
                         "hookOutput": "", "pullRequestUrl": None})

    def _ep_xet(self, m, body):
        self._error(404, "this fake hub has no Xet storage")


class _Null:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


_ROUTES = [
    ("POST", "create_repo", r"/api/repos/create"),
    ("GET", "repo_info", rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?"),
    ("GET", "refs", rf"/api/{_REPO}/refs"),
    ("POST", "create_branch", rf"/api/{_REPO}/branch/(?P<branch>[^/]+)"),
    ("GET", "tree", rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"),
    ("POST", "validate_yaml", r"/api/validate-yaml"),
    ("POST", "preupload", rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", rf"/api/{_REPO}/commit/(?P<rev>[^/]+)"),
    ("GET", "xet", rf"/api/{_REPO}/xet-[a-z]+-token/(?P<rev>[^/]+)"),
    ("POST", "lfs_batch", r"/(?:(?P<t>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects/batch"),
    ("PUT", "lfs_part", rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/part/(?P<part>\d+)"),
    ("POST", "lfs_complete", rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/complete"),
    ("POST", "lfs_verify", rf"/_lfs/{_REPO}/verify"),
    ("PUT", "lfs_put", rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})"),
]
_COMPILED = [(meth, kind, re.compile(rx)) for meth, kind, rx in _ROUTES]


class _Match(dict):
    """Route groups; ``t`` defaults to ``models`` for the LFS batch URL without a type prefix."""

    def groupdict(self):
        return self

    def __getitem__(self, k):
        return self.get(k)


def _route(method: str, path: str):
    for meth, kind, rx in _COMPILED:
        if meth == method and (mm := rx.fullmatch(path)) is not None:
            g = _Match(mm.groupdict())
            if "t" in rx.groupindex and g.get("t") is None:
                g["t"] = "models"
            return kind, g
    return "unknown", None


__all__ = ["LFS_PATTERNS", "Call", "FakeHub"]

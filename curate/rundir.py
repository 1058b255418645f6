"""The run directory contract (docs/run-directory.md).

::

    RUN/
      manifest.resolved.yaml   the manifest with every default filled in (secrets as ${VAR})
      fingerprint              JSON: digests of the resolved manifest, package versions, input shards
      completions/             one JSON marker per finished (phase, shard), written after its output
      failures/                bad input records, JSONL with file, line, reason
      quarantine/<stage>/      rejected rows, for filters with ``quarantine: true``
      logs/                    one log per (phase, shard), plus run.log
      stats/                   one stats JSON per (phase, shard)
      global/                  partials and combined state of global stages
      phases/                  intermediate shards between phases (removed when the run completes)
      stats.json               merged stats, written at the end
      <sink>/ …shards…, index.json   the output, index.json written last

Every file is written under a temporary name and renamed into place, so a kill at any moment
leaves only complete files or temporaries that the next run removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import orjson

from curate.errors import ConfigError

TMP_PREFIX = ".tmp-"
#: Bytes hashed at a time: under the 1 MB above which glibc maps each allocation afresh (curate.allocator).
_HASH_CHUNK = (1 << 20) - (8 << 10)


class AtomicFile:
    """A binary file written as ``.tmp-<name>`` that :meth:`commit` renames to ``name``.

    It counts bytes (``size``) and hashes what is written (``sha256``): as it goes for writes through
    :meth:`write`; for a pyarrow writer given :meth:`stream` instead, by a thread that reads the file
    back as it grows (:class:`_Follower`), so closing it leaves only the last bytes to hash.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(TMP_PREFIX + self.path.name)
        self._fh = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self._size = 0
        self._native = None
        self._follower: _Follower | None = None
        self._hashed = False  # the native stream's bytes are in _sha (or need not be: aborted)
        self.closed = False

    def stream(self):
        """A pyarrow output stream onto the temporary file, for pyarrow's writers (Parquet, Arrow IPC).

        pyarrow writes a Python file object by calling back into Python for every page, and each call
        waits for the GIL — up to the 5 ms switch interval while another thread runs Python (a reader
        parsing the next batch): a Parquet write took 2.4 s instead of 0.9 s so. This stream is written
        natively; its bytes are hashed by a thread that follows the file as it grows (:class:`_Follower`).
        Only before anything was written.
        """
        import pyarrow as pa

        if self._native is None:
            if self._size:
                raise RuntimeError(f"{self.tmp}: stream() after write()")
            self._fh.close()
            self._native = pa.OSFile(str(self.tmp), "wb")
            self._follower = _Follower.start(self.tmp, self)  # None: hashed at close instead
        return self._native

    # file protocol used by pyarrow, tarfile and plain writes
    def write(self, data) -> int:
        if self._native is not None:
            raise RuntimeError(f"{self.tmp}: write() after stream()")
        n = self._fh.write(data)
        self._sha.update(data)
        self._size += n
        return n

    @property
    def size(self) -> int:
        """Bytes written so far."""
        if self._native is not None and not self._hashed:
            return self._native.tell() if not self._native.closed else os.path.getsize(self.tmp)
        return self._size

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if self._native is None:
            self._fh.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        """Close without committing (pyarrow writers call this); :meth:`commit` renames."""
        if not self._fh.closed:
            self._fh.close()
        if self._native is not None and not self._hashed:
            if not self._native.closed:
                self._native.close()
            self._size = self._finish_hash()  # also when the writer closed the stream itself
            self._hashed = True
        self.closed = True

    def _finish_hash(self) -> int:
        """The follower's hash once it has read the closed file to its end; else the file hashed again."""
        follower, self._follower = self._follower, None
        if follower is not None and follower.finish() and follower.size == os.path.getsize(self.tmp):
            self._sha = follower.sha
            return follower.size
        self._sha = hashlib.sha256()  # the follower failed (an error it kept): start over
        return self._hash_file()

    def _hash_file(self) -> int:
        """Hash the temporary file into ``_sha``; its size."""
        with open(self.tmp, "rb", buffering=0) as fh:
            return _hash_to_end(fh, self._sha, bytearray(_HASH_CHUNK))

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def commit(self) -> Path:
        self.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._native is not None:
            if not self._native.closed:
                self._native.close()
            if self._follower is not None:
                self._follower.abandon()
                self._follower = None
            self._hashed = True  # no hashing: the file is removed
        self.close()
        self.tmp.unlink(missing_ok=True)


class _Follower:
    """Hashes a file that a native stream is appending to, reading it back in a thread as it grows.

    Page by page, what the writer has written is read from the page cache (into one reused buffer) and
    hashed while the writer encodes the next pages; the GIL is let go for both. :meth:`finish`, called
    once the writer has closed the file, reads what is left and reports whether the hash is complete.
    Files written by pyarrow only grow (its output streams cannot seek); :class:`AtomicFile` still checks
    that the bytes read equal the file's size and hashes the file again if not. The thread ends by
    itself if its :class:`AtomicFile` is dropped without being closed or aborted.

    At most :data:`MAX_LIVE` follow files at once in a process (each holds a thread, a second file
    descriptor and a buffer, and wakes every 10 ms): a partitioned sink keeps one file open per value,
    and files past the limit are hashed at close as before.
    """

    MAX_LIVE = 4
    _live = threading.BoundedSemaphore(MAX_LIVE)

    @classmethod
    def start(cls, path: Path, owner: AtomicFile) -> _Follower | None:
        """A follower for ``path``, or None when :data:`MAX_LIVE` are running or it cannot start."""
        if not cls._live.acquire(blocking=False):
            return None
        try:
            return cls(path, owner)
        except (OSError, RuntimeError):  # no descriptor or thread to spare: hash at close
            cls._live.release()
            return None

    def __init__(self, path: Path, owner: AtomicFile):
        self.sha = hashlib.sha256()
        self.size = 0
        self._fh = open(path, "rb", buffering=0)
        self._owner = weakref.ref(owner)
        self._closing = threading.Event()
        self._abandoned = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="curate-hash", daemon=True)
        try:
            self._thread.start()
        except RuntimeError:
            self._fh.close()
            raise

    def _run(self) -> None:
        buf = bytearray(_HASH_CHUNK)
        try:
            while not self._abandoned:
                final = self._closing.is_set()  # set after the writer closed: the read below reaches the end
                self.size += _hash_to_end(self._fh, self.sha, buf, lambda: self._abandoned)
                if final:
                    return
                if not self._closing.wait(0.01) and self._owner() is None:
                    return  # dropped unclosed: nobody will ask
        except BaseException as e:  # noqa: BLE001 - reported by finish(), which hashes the file again
            self._error = e
        finally:
            self._fh.close()
            type(self)._live.release()

    def finish(self) -> bool:
        """Wait for the rest of the (closed) file to be hashed; False if the thread failed."""
        self._closing.set()
        self._thread.join()
        return self._error is None and not self._abandoned

    def abandon(self) -> None:
        """Stop without hashing the rest (the file is being removed)."""
        self._abandoned = True
        self._closing.set()
        self._thread.join()


def _hash_to_end(fh, sha, buf: bytearray, stop=lambda: False) -> int:
    """Read ``fh`` into ``buf`` (reused: no fresh pages per chunk) and hash it, to its current end or
    until ``stop()``; the bytes read. hashlib and the reads let the GIL go for each chunk."""
    view = memoryview(buf)
    read = 0
    while not stop() and (n := fh.readinto(buf)):
        sha.update(view[:n])
        read += n
    return read


class RunDir:
    """Paths and helpers of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.completions = self.root / "completions"
        self.failures = self.root / "failures"
        self.quarantine = self.root / "quarantine"
        self.logs = self.root / "logs"
        self.stats = self.root / "stats"
        self.global_dir = self.root / "global"
        self.phases = self.root / "phases"
        self.fingerprint = self.root / "fingerprint"
        self.manifest = self.root / "manifest.resolved.yaml"
        self.stats_json = self.root / "stats.json"

    def create(self) -> None:
        for d in (self.completions, self.failures, self.logs, self.stats, self.global_dir):
            d.mkdir(parents=True, exist_ok=True)

    def open_temp(self, path: Path) -> AtomicFile:
        return AtomicFile(path)

    def write_atomic(self, path: Path, data: bytes) -> None:
        f = AtomicFile(path)
        f.write(data)
        f.commit()

    def write_json(self, path: Path, obj: Any) -> None:
        self.write_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")

    # ------------------------------------------------------------------ fingerprint
    def check_claimable(self, restart: bool) -> None:
        """Refuse a folder that is not a run directory (unless ``restart``); create the root.

        Raises :class:`ConfigError` when the folder cannot be created or written.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root}: exists and is not a folder; choose another output")
        if (self.root.is_dir() and not self.fingerprint.exists() and not restart
                and any(p.name not in ("lock", "logs") for p in self.root.iterdir())):
            raise ConfigError(f"{self.root}: exists, is not empty and is not a curate run directory; "
                              "choose another output (or pass --restart to write into it anyway)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{TMP_PREFIX}probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"{self.root}: cannot create or write the run directory: "
                              f"{e.strerror or e}") from None

    def check_fingerprint(self, fingerprint: dict[str, Any], restart: bool) -> bool:
        """Claim the directory for this fingerprint; True when it resumes an earlier run.

        A directory made by a different fingerprint is refused unless ``restart``, which empties it
        (only if it is a run directory: it must hold a ``fingerprint`` file).
        """
        if self.fingerprint.exists():
            try:
                old = orjson.loads(self.fingerprint.read_bytes())
            except orjson.JSONDecodeError as e:
                if not restart:
                    raise ConfigError(f"{self.fingerprint}: damaged ({e}); this run directory cannot be "
                                      "resumed: pass --restart to start over or choose another output") from None
                old = {}
            if old.get("digest") == fingerprint["digest"] and not restart:
                return True
            if not restart:
                changed = [k for k in ("manifest", "packages", "inputs") if old.get(k) != fingerprint.get(k)]
                raise ConfigError(
                    f"{self.root}: this run directory was made by a different run "
                    f"({', '.join(changed) or 'fingerprint'} changed); pass --restart to start over "
                    "or choose another output"
                )
            self.clear()
        elif (self.root.exists() and any(p.name not in ("lock", "logs") for p in self.root.iterdir())
              and not restart):
            raise ConfigError(f"{self.root}: exists, is not empty and is not a curate run directory; "
                              "choose another output (or pass --restart to write into it anyway)")
        self.create()
        self.write_json(self.fingerprint, fingerprint)
        return False

    def clear(self) -> None:
        """Remove everything in the run directory but its lock (used by --restart)."""
        for child in self.root.iterdir():
            if child.name in ("lock", "locks"):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # ------------------------------------------------------------------ completions
    def completion_path(self, shard_id: str) -> Path:
        return self.completions / f"{shard_id}.json"

    def is_complete(self, shard_id: str) -> bool:
        return self.completion_path(shard_id).exists()

    def read_completion(self, shard_id: str) -> dict[str, Any]:
        return orjson.loads(self.completion_path(shard_id).read_bytes())

    def read_global_state(self, label: str) -> dict[str, Any]:
        path = self.global_dir / label / "state.json"
        if not path.exists():
            raise RuntimeError(f"global state of stage {label!r} is missing: {path}")
        return orjson.loads(path.read_bytes())


def remove_temporaries(directory: Path, prefix: str = "") -> None:
    """Delete leftover ``.tmp-<prefix>*`` files in ``directory`` (from a killed run)."""
    if directory.is_dir():
        for p in directory.glob(f"{TMP_PREFIX}{prefix}*"):
            p.unlink(missing_ok=True)

"""One run per run directory: an exclusive lock file, sound on local and shared filesystems.

``RUN/lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+, Lustre,
GPFS and CephFS), holds who owns it (host, pid, start time, a random token, the command) and is
touched by a heartbeat thread every ``HEARTBEAT`` seconds while the holder lives. A second run is
refused with the holder's name. A lock is *stale* when

- its holder ran on this host and that pid is gone (or is another process: its start time differs), or
- its heartbeat is older than ``STALE_AFTER`` seconds (a holder on another host that died).

A stale lock is taken over with a notice. Two processes that both find the lock stale cannot both take
it: the takeover itself is serialized by a second exclusive file (``lock.takeover``), and the lock is
re-read under it before it is replaced.

``curate run-shard`` (what launchers and cluster array tasks call) takes a per-shard lock
``locks/<phase>-<shard>.lock`` instead, and is refused while a ``curate run`` with the local executor
holds the run lock (which owns every shard).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from curate.errors import CurateError

HEARTBEAT = 15.0
STALE_AFTER = 120.0


class LockHeld(CurateError):
    """Another live process holds the lock."""


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` as the kernel reports it (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (containers on one host with one hostname can differ here)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """``host pid N since <time> (<command>)`` for messages."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    cmd = f" ({holder['command']})" if holder.get("command") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')} since {since}{cmd}"


class FileLock:
    """An exclusive lock file with a heartbeat. Use as a context manager or ``acquire``/``release``."""

    def __init__(self, path: Path, command: str = "", mode: str = "exclusive", notice=None):
        self.path = Path(path)
        self.command = command
        self.mode = mode
        self.notice = notice or (lambda msg: None)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            holder = self.read()
            if holder is None:  # removed between our attempt and the read: try again
                continue
            reason = stale_reason(holder, self.path)
            if reason is None:
                raise LockHeld(f"{self.path.parent}: in use by another curate process: {describe(holder)}; "
                               f"wait for it to finish or stop it (kill {holder.get('pid')})")
            if self._take_over(holder):
                self.notice(f"took over a stale lock of {describe(holder)} ({reason})")
                self._start_heartbeat()
                return self
        raise LockHeld(f"{self.path}: could not take the lock (another process keeps taking it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self.read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def read(self) -> dict[str, Any] | None:
        """The holder's record, None when there is no lock (an unreadable one counts as a dead holder)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            holder = orjson.loads(data)
            if not isinstance(holder, dict):
                raise ValueError
        except ValueError:  # a holder killed while writing its record
            holder = {"host": "?", "pid": None, "started": 0, "broken": True}
        with contextlib.suppress(OSError):
            holder["heartbeat"] = self.path.stat().st_mtime
        return holder

    # ------------------------------------------------------------------ internals
    def _record(self) -> bytes:
        pid = os.getpid()
        return orjson.dumps({"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": pid,
                             "proc_start": _proc_start(pid),
                             "started": time.time(), "token": self.token, "command": self.command,
                             "mode": self.mode}, option=orjson.OPT_INDENT_2)

    def _create(self) -> bool:
        """Write the full record to a private file, then ``link`` it to the lock name: the link is
        atomic and fails if the name exists (also on NFS), so nobody ever reads a half-written lock."""
        tmp = self.path.with_name(f".tmp-{self.path.name}-{self.token}")
        with open(tmp, "wb") as fh:
            fh.write(self._record())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: fall back to an exclusive create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._record())
                fh.flush()
                os.fsync(fh.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: dict[str, Any]) -> bool:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            # someone else is taking over; a guard left by a killed taker expires
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > STALE_AFTER:
                    guard.unlink()
            return False
        os.close(fd)
        try:
            now = self.read()
            if now is None:
                return self._create()
            if now.get("token") != stale.get("token") or stale_reason(now, self.path) is None:
                return False  # it changed hands meanwhile
            tmp = self.path.with_name(f".tmp-{self.path.name}-{self.token}")
            tmp.write_bytes(self._record())
            os.replace(tmp, self.path)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="curate-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def stale_reason(holder: dict[str, Any], path: Path | None = None) -> str | None:
    """Why a lock record is stale, or None when its holder may still be running."""
    if holder.get("broken"):
        # records are written whole (link), so only a lock from elsewhere can be unreadable; give a
        # writer on a slow filesystem time before calling it stale
        if time.time() - holder.get("heartbeat", 0) > 10:
            return "its record is unreadable"
        return None
    pid = holder.get("pid")
    same_ns = holder.get("pidns") in (None, _pid_namespace())
    if holder.get("host") == socket.gethostname() and same_ns and isinstance(pid, int):
        if not _alive(pid):
            return f"pid {pid} is gone"
        start = holder.get("proc_start")
        if start is not None and _proc_start(pid) not in (None, start):
            return f"pid {pid} is now another process"
        return None
    beat = holder.get("heartbeat", holder.get("started", 0))
    if time.time() - beat > STALE_AFTER:
        return f"no heartbeat for {time.time() - beat:.0f}s"
    return None


def run_lock(root: Path, command: str, notice=None, mode: str = "exclusive") -> FileLock:
    """The lock of a whole run. ``exclusive``: a local run that owns every shard; ``launcher``: a
    cluster launcher whose jobs take their own step locks (``run-shard`` is allowed)."""
    return FileLock(Path(root) / "lock", command=command, mode=mode, notice=notice)


def shard_lock(root: Path, shard_id: str, command: str, notice=None) -> FileLock:
    """The lock of one (phase, shard), for ``curate run-shard``; refused while a local run owns all shards."""
    holder = FileLock(Path(root) / "lock").read()
    if holder is not None and holder.get("mode") == "exclusive" and stale_reason(holder) is None:
        raise LockHeld(f"{root}: a curate run owns every shard of this directory: {describe(holder)}")
    return FileLock(Path(root) / "locks" / f"{shard_id}.lock", command=command, mode="shard", notice=notice)


def refuse_if_steps_running(root: Path) -> None:
    """Raise :class:`LockHeld` when a ``run-shard``/``combine``/``finalize`` holds a live lock in ``root``."""
    for path in sorted((Path(root) / "locks").glob("*.lock")):
        holder = FileLock(path).read()
        if holder is not None and stale_reason(holder) is None:
            raise LockHeld(f"{root}: {path.stem} is being run by another curate process: {describe(holder)}; "
                           "wait for the launcher's jobs to finish (or stop them)")

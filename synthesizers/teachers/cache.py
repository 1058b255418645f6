"""The teacher cache: one SQLite file per (stage, shard) under ``RUN/cache/<stage>/``.

Every answer is written (and committed) the moment it arrives, keyed by the sha256 of (backend, model,
prompt-template hash, rendered messages, JSON schema, sampling parameters, sample index). A shard that
crashes, is killed or fails on other requests keeps every answer it got; its rerun reads them back and
sends only what is missing. ``context_length`` refusals are stored too (the same prompt would be refused
again); transient and fatal errors are not (a rerun asks again).

One shard is run by one process at a time (the run lock and step locks see to that), so one writer per
file: the write-ahead log makes each commit cheap, and a file left by a killed process is recovered by
SQLite when it is next opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import orjson

from synthesizers.teachers.base import Reply

CACHE_DIR = "cache"


class ReplyCache:
    """``get_many(keys)`` → {key: Reply}; ``put(key, reply)`` commits at once."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get_many(self, keys: Iterable[str]) -> dict[str, Reply]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, Reply] = {}
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            rows = self._db.execute(f"SELECT key, reply FROM replies WHERE key IN ({','.join('?' * len(part))})",
                                    part).fetchall()
            for key, blob in rows:
                found[key] = Reply.from_record(orjson.loads(blob))
        return found

    def put(self, key: str, reply: Reply) -> None:
        self._db.execute("INSERT OR REPLACE INTO replies (key, reply) VALUES (?, ?)",
                         (key, orjson.dumps(reply.to_record())))

    def get_note(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM notes WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put_note(self, key: str, value: str | None) -> None:
        """Set (or, with None, remove) a note: e.g. the batch a shard is waiting for."""
        if value is None:
            self._db.execute("DELETE FROM notes WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO notes (key, value) VALUES (?, ?)", (key, value))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cache_path(run_root: Path, label: str, shard_id: str) -> Path:
    """``RUN/cache/<label>/<shard_id>.sqlite`` (the label and shard id are file-safe names)."""
    from curate.sinks.paths import encode_component

    return run_root / CACHE_DIR / encode_component(label) / f"{shard_id}.sqlite"

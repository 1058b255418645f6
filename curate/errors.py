"""The four kinds of error, each with its own path (DESIGN.md, "Errors").

- ``ConfigError``: stops before any work; the message names the manifest, line and field.
- ``BadRecord``: one input record is unusable; it goes to ``failures/`` with file, line and reason
  and is counted, the shard goes on.
- ``RetryableError``: transient (timeouts, HTTP 5xx); retried with backoff, and if it persists the
  shard is left incomplete for the next run.
- anything else fails the shard loudly.
"""

from __future__ import annotations


class CurateError(Exception):
    """Base class of the errors curate raises on purpose."""


class ConfigError(CurateError):
    """A manifest or parameter problem, found before any work starts."""


class BadRecord(CurateError):
    """One record cannot be used. ``reason`` is a stable snake_case key counted in stats."""

    def __init__(self, reason: str, detail: str = "", *, file: str | None = None, line: int | None = None):
        self.reason = reason
        self.detail = detail
        self.file = file
        self.line = line
        where = f"{file}:{line}: " if file is not None else ""
        super().__init__(f"{where}{reason}{': ' + detail if detail else ''}")


class RetryableError(CurateError):
    """A transient failure worth retrying (the shard stays incomplete if it persists)."""


class MissingDependency(ConfigError):
    """An optional dependency a stage needs is not installed; the message has the pip line."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"this needs the optional dependency {module!r}: pip install 'curate-longctx[{extra}]'"
        )

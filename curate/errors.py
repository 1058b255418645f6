"""The four kinds of error, each with its own path.

- ``ConfigError``: stops before any work; the message names the manifest, line and field (exit 2).
- ``BadRecord``: one input record is unusable. Readers call ``ctx.failure`` directly; a filter's
  ``score``/``decide`` may raise it, and the batch is then filtered row by row: the rows that raise it
  are dropped under its ``reason`` and written to ``failures/``, the others go on. Raised anywhere else
  (a synthesizer's ``run``, a global ``combine``) it fails the shard (or the step) with its message.
- ``RetryableError``: transient (timeouts, HTTP 429/5xx). The executor reruns the shard up to
  ``executor.retries`` times with exponential backoff and jitter; if it persists, the shard is left
  incomplete (the run reports it as possibly transient) and the next run retries it.
- anything else fails the shard loudly; the message names the shard's input file and the stage.
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


class Interrupted(CurateError):
    """The run was stopped (Ctrl-C or SIGTERM); finished shards are kept and a rerun resumes."""


class MissingDependency(ConfigError):
    """An optional dependency a stage needs is not installed; the message has the pip line."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"this needs the optional dependency {module!r}: pip install 'curate-longctx[{extra}]'"
        )

"""The embedded default source: real English text built at run time from what the machine has.

Each module of the running Python's standard library becomes one document: its module docstring
followed by the signature and docstring of every documented class, function and method, read with
``ast`` (nothing is imported or executed). Nothing is copied into the repository; the corpus is
whatever this interpreter ships, so the content key includes the Python version.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from collections.abc import Iterator

import orjson
import pyarrow as pa
from pydantic import Field

from curate.plugins import register_source
from curate.readers.base import BatchParams, DocumentBuilder, Reader, Shard
from curate.seeds import digest

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
              "turtledemo", "ensurepip", "venv", "config-3"}


@register_source("stdlib_docs")
class StdlibDocsReader(Reader):
    """Documents from the docstrings of the running Python's standard library."""

    class Params(BatchParams):
        shards: int = Field(8, gt=0, description="how many shards to cut the module list into")
        min_chars: int = Field(200, ge=0, description="skip modules with less documentation than this")

    def shards(self) -> list[Shard]:
        files = stdlib_files()
        n = min(self.params.shards, max(1, len(files)))
        version = ".".join(map(str, sys.version_info[:3]))
        out = []
        for i in range(n):
            part = files[i::n]
            key = digest(version, *(f"{f}:{os.path.getsize(os.path.join(_root(), f))}" for f in part),
                         size=12).hex()
            out.append(Shard(f"{i:05d}", key, f"python-stdlib-{version}", f"python-{version}", i, n,
                             {"files": part}))
        return out

    def read(self, shard: Shard, ctx) -> Iterator[pa.RecordBatch]:
        builder = DocumentBuilder(self.params.batch_rows, int(self.params.batch_bytes))
        for rel in shard.extra["files"]:
            text = module_text(os.path.join(_root(), rel))
            if len(text) < self.params.min_chars:
                ctx.stats["read"].drop("too_little_documentation")
                continue
            meta = orjson.dumps({"module": rel[:-3].replace(os.sep, ".")}).decode()
            batch = builder.add(f"stdlib:{rel}", text, shard.rel, meta)
            if batch is not None:
                yield batch
        last = builder.flush()
        if last is not None:
            yield last


def _root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Relative paths of the standard library's ``.py`` files, sorted."""
    root = _root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def module_text(path: str) -> str:
    """The module docstring, then ``name(args)`` and docstring of each documented definition."""
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc.strip())
    for node, qualname in _definitions(tree, ""):
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"{qualname}{_signature(node)}\n\n{doc.strip()}")
    return "\n\n".join(parts)


def _definitions(tree: ast.AST, prefix: str):
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name.startswith("_") and node.name != "__init__":
                continue
            qualname = f"{prefix}{node.name}"
            yield node, qualname
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node, qualname + ".")


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return ""
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # noqa: BLE001 - a signature is decoration only
        return "()"

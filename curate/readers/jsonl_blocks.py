"""JSON Lines in bulk: whole blocks of lines parsed at once, batches cut as the per-line path cuts them.

The JSONL reader cuts a file into blocks of whole lines. :func:`parse_block` decodes every line of a
block with orjson and keeps the lines that are plainly good — a JSON object whose text field is a
non-blank string and, when ``id_field`` is set, whose id is not null — as UTF-8 columns. Every other
line (blank, invalid UTF-8 or JSON, not an object, a missing or bad text or id) is listed by its
position in :attr:`ParsedBlock.rest`; the reader sends exactly those through its per-line path, which
skips blanks and names each failure with its line and reason. The two kinds of rows are merged back in
file order, so the output does not depend on which path a row took.

:class:`BatchCutter` cuts rows into batches at exactly the rows where
:class:`curate.readers.base.DocumentBuilder` cuts (``batch_rows`` rows, or ``batch_bytes`` text
*characters*, whichever comes first), with arrays built by :func:`curate.arrays.utf8` (what
:func:`curate.schema.string_array` builds them with), so batch sizes, ``nbytes`` and thus the sinks'
row groups and file boundaries stay those of the per-line reader.

:func:`read_ahead` runs the reading, parsing and batching in a thread a few items ahead of the
consumer: the sinks' encoders (Parquet, zstd) release the GIL, so the two overlap on two cores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
import pyarrow as pa

from curate.arrays import utf8
from curate.schema import DOCUMENTS

T = TypeVar("T")


@dataclass(frozen=True)
class Fields:
    """Where a document's parts are in a record, and what its rows are called."""

    text: str
    id: str | None
    keep: list[str] | None  # meta fields kept (None: every field but text and id)
    rel: str  # the file's relative name: each row's source, and the prefix of default ids

    @property
    def exclude(self) -> tuple[str, ...]:
        return (self.text,) + ((self.id,) if self.id else ())


@dataclass
class ParsedBlock:
    """One block of lines: the good rows as UTF-8 columns, and the lines left to the per-line path.

    Line ``lines[i]`` is line number ``first_line + i`` of the file. ``rest`` holds, ascending, the
    positions of the lines that are not among the good rows; the good rows are all the other lines, in
    order (so the good row for position ``p`` is row ``p - k`` where ``k`` rest positions come before ``p``).
    """

    first_line: int
    lines: list[bytes]
    ids: list[bytes] = field(default_factory=list)
    texts: list[bytes] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)  # len() of each text as a str: what batch_bytes counts
    metas: list[bytes | None] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)


_SORTED = orjson.OPT_SORT_KEYS


def parse_block(first_line: int, lines: list[bytes], fields: Fields) -> ParsedBlock:
    """Parse ``lines`` (line ``first_line`` onward) in bulk; see :class:`ParsedBlock`.

    A good row gets the values the per-line path gives it: id ``str(record[id_field])`` (or
    ``rel:line``), meta the other (or the kept) fields as JSON with sorted keys, None when there are none.
    """
    out = ParsedBlock(first_line, lines)
    loads = orjson.loads
    try:
        records = [loads(line) for line in lines]
    except orjson.JSONDecodeError:
        records = [_loads_or_none(line) for line in lines]
    text_field, id_field, keep = fields.text, fields.id, fields.keep
    exclude = fields.exclude
    prefix = f"{fields.rel}:"
    ids, texts, chars, metas, rest = out.ids, out.texts, out.chars, out.metas, out.rest
    for pos, record in enumerate(records):
        if type(record) is not dict:
            rest.append(pos)
            continue
        text = record.get(text_field)
        if type(text) is not str or not text or text.isspace():  # isspace() is what strip() strips
            rest.append(pos)
            continue
        if id_field:
            doc_id = record.get(id_field)
            if doc_id is None:
                rest.append(pos)
                continue
            ids.append((doc_id if type(doc_id) is str else id_text(doc_id, lines[pos], id_field)).encode())
        else:
            ids.append(f"{prefix}{first_line + pos}".encode())
        texts.append(text.encode())
        chars.append(len(text))
        if keep is not None:
            meta = {k: record[k] for k in keep if k in record}
        else:
            meta = record  # ours alone: drop the text and id fields in place
            for name in exclude:
                meta.pop(name, None)
        metas.append(orjson.dumps(meta, option=_SORTED) if meta else None)
    return out


def id_text(value, line: bytes, id_field: str) -> str:
    """The id ``value`` of the JSON ``line`` as text. orjson reads an integer beyond 64 bits as a float
    (``123456789012345678901234567890`` → ``1.2345678901234568e+29``), which would make distinct ids
    equal: a float id is read again with the standard library, which keeps such integers exact."""
    if type(value) is float:
        import json

        value = json.loads(line)[id_field]
    return str(value)


def _loads_or_none(line: bytes):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None  # not an object: the per-line path says why


class BatchCutter:
    """Rows in, documents batches out, cut exactly where :class:`DocumentBuilder` would cut them.

    :meth:`add` takes one row as the per-line path makes it; :meth:`extend` takes a run of good rows
    of a :class:`ParsedBlock`. Both return the batches completed (a batch ends at the row that brings it
    to ``batch_rows`` rows or ``batch_bytes`` text characters).
    """

    def __init__(self, batch_rows: int, batch_bytes: int):
        self.batch_rows, self.batch_bytes = batch_rows, batch_bytes
        self.ids: list[bytes] = []
        self.texts: list[bytes] = []
        self.sources: list[bytes | None] = []
        self.metas: list[bytes | None] = []
        self.chars = 0

    def add(self, doc_id: str, text: str, source: str | None, meta: str | None) -> pa.RecordBatch | None:
        self.ids.append(doc_id.encode())
        self.texts.append(text.encode())
        self.sources.append(None if source is None else source.encode())
        self.metas.append(None if meta is None else meta.encode())
        self.chars += len(text)
        if len(self.ids) >= self.batch_rows or self.chars >= self.batch_bytes:
            return self.flush()
        return None

    def extend(self, block: ParsedBlock, start: int, stop: int, source: str | None) -> list[pa.RecordBatch]:
        """Add good rows ``start:stop`` of ``block``, all from ``source``."""
        out: list[pa.RecordBatch] = []
        encoded = None if source is None else source.encode()
        rows, total = len(self.ids), self.chars
        rows_limit, chars_limit = self.batch_rows, self.batch_bytes
        taken = start
        for i in range(start, stop):
            rows += 1
            total += block.chars[i]
            if rows >= rows_limit or total >= chars_limit:
                self._take(block, taken, i + 1, encoded)
                out.append(self.flush())
                rows, total, taken = 0, 0, i + 1
        if taken < stop:
            self._take(block, taken, stop, encoded)
            self.chars = total
        return out

    def _take(self, block: ParsedBlock, start: int, stop: int, source: bytes | None) -> None:
        self.ids += block.ids[start:stop]
        self.texts += block.texts[start:stop]
        self.metas += block.metas[start:stop]
        self.sources += [source] * (stop - start)

    def flush(self) -> pa.RecordBatch | None:
        if not self.ids:
            return None
        batch = pa.RecordBatch.from_arrays([utf8(self.ids), utf8(self.texts), utf8(self.sources),
                                            utf8(self.metas)], schema=DOCUMENTS)
        self.ids, self.texts, self.sources, self.metas, self.chars = [], [], [], [], 0
        return batch


def read_ahead(make: Callable[[], Iterator[T]], depth: int = 2) -> Iterator[T]:
    """The items of ``make()``, produced by a background thread at most ``depth`` items ahead.

    An exception from the iterator is raised here after the items before it, with its traceback.
    Closing this generator (or an exception in the consumer) stops the thread before returning; it
    finishes at most the item it is producing.
    """
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = make()
        try:
            for item in source:
                if not put((True, item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, e))
            return
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator's files are closed in this thread, now
        put((False, None))

    worker = threading.Thread(target=produce, name="curate-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = items.get()
            if ok:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        stop.set()
        worker.join()

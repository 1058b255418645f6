"""``mm_needle``: multimodal needle-in-a-haystack samples from image–caption pairs (MMNeedle style).

A sample shows ``M`` *stitched* images, each an ``N × N`` grid of sub-images (every sub-image resized
to ``cell_size × cell_size`` pixels, so a stitched image is an ``N·cell_size`` pixel square), and asks
which sub-image of which stitched image matches a caption — the *needle*. The answer is
``image, row, column`` (1-based, ``answer_format``), or ``absent_answer`` when no sub-image matches.
``N`` comes from ``grid_sizes`` and ``M`` from ``images_per_sample``; every combination is used about
equally often.

Input: interleaved rows that are image–caption pairs (exactly one image position and one text position,
in either order; the WebDataset reader's ``schema: interleaved`` gives these). A row of any other shape
(``not_a_pair``), with ``texts``/``images`` not aligned (``misaligned_row``), an image that does not
decode (``undecodable_image``; ``image_too_large`` beyond ``max_image_pixels``, see
:func:`curate.images.decode_rgb`), an empty caption (``empty_caption``), a caption longer than
``max_caption_chars`` (``caption_too_long``) or an image already in the pool (``duplicate_image``: the
same bytes, or the same pixels once resized; near-duplicates are for ``image_dedup`` to remove first)
is dropped under that reason and listed in ``failures/``; nothing is skipped silently.

**Pools.** The usable pairs of a shard are taken, in input order, into pools of at most ``pool_size``
pairs; the last pool of a shard holds what is left. Each pool keeps its sub-images already resized, so
a worker holds at most ``pool_size × cell_size² × 3`` bytes of pixels (1024 × 256² × 3 ≈ 200 MB with
the defaults) however large the shard. A pool of ``P`` pairs gives ``samples_per_pair × P`` samples
(rounded up or down at random, so the expected count is exact), all drawn from that pool.

**One sample.** Each sample's haystack uses distinct pool images. A needle image is drawn uniformly
from the pool; the other haystack cells are drawn from the pool images whose caption differs from the
needle's (captions are compared with case and whitespace folded), so

- a *positive* sample puts the needle image at a uniformly drawn (image, row, column) and no other cell
  carries the same caption: the answer is unambiguous;
- a *negative* sample (share ``negative_fraction``) leaves the needle image out: the caption names
  no image of the haystack and equals no haystack caption.

A sample whose setting needs more images than the pool has (``N²·M``, one more for a negative) is
skipped and counted as the stage metric ``pool_too_small``; one whose needle caption is shared by so
many pool images that too few others remain is counted as ``too_few_distinct_captions``.

**Output rows** (interleaved schema, plus columns): ``id`` (``mmneedle-<shard>-<k>``), ``texts`` and
``images`` (the ``M`` stitched images, then one text position holding the prompt), ``source`` (the
input file), ``meta`` (JSON: ``grid``, ``images``, ``cell_size``, ``positive``, ``layout`` — per
stitched image, its cells in row-major order, each ``{id, sha256}`` of the source row and its image
bytes —, ``needle`` (the same for the needle's source image), ``pool``, ``pool_pairs``,
``text_tokens``, ``image_tokens``), ``question`` (the prompt), ``answer``, ``target``
(``{image, row, col}``, 1-based like the answer; null for negatives), ``needle`` (the caption) and
``n_tokens``: the prompt's and the answer's run-tokenizer tokens plus each stitched image's tokens under
``image_tokens`` (:class:`curate.image_tokens.ImageTokenCounter`, marker tokens included). The stage
therefore needs the manifest's ``tokenizer:``.

Stitched images are PNG by default: lossless, so a cell cut back out of a stitched image equals the
source image resized with Pillow's bicubic filter to ``cell_size × cell_size`` pixel for pixel.
``compress_level`` trades PNG encoding time for size (never pixels); ``image_format: jpeg`` (with
``quality``) writes smaller files whose cells are no longer exact.

Randomness comes from ``(seed, stage label, shard content key, pool number)``: the same input and seed
give the same bytes with any batching and any number of workers.
"""

from __future__ import annotations

import hashlib
import io
import math
import string
from collections.abc import Iterator
from typing import ClassVar, Literal

import numpy as np
import orjson
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate import seeds
from curate.image_tokens import ImageTokenParams
from curate.images import MAX_PIXELS, ImageProblem, decode_rgb
from curate.registry import register_stage
from curate.schema import IMAGE
from curate.stage import StageParams, Synthesizer

#: The columns of an output row.
TARGET = pa.struct([("image", pa.int32()), ("row", pa.int32()), ("col", pa.int32())])
OUTPUT = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("texts", pa.list_(pa.string()), nullable=False),
    pa.field("images", pa.list_(IMAGE), nullable=False),
    pa.field("source", pa.string()),
    pa.field("meta", pa.string()),
    pa.field("question", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("target", TARGET),
    pa.field("needle", pa.string()),
    pa.field("n_tokens", pa.int32()),
])
#: An output batch is cut at this many samples or this many bytes of stitched images.
_BATCH_SAMPLES, _BATCH_BYTES = 8, 32 << 20
#: The largest stitched image side, in pixels.
_MAX_SIDE = 8192
_MIME = {"png": "image/png", "jpeg": "image/jpeg"}


@register_stage("mm_needle")
class MMNeedle(Synthesizer):
    """Which cell of which stitched image grid a caption describes, or none (MMNeedle-style samples)."""

    class Params(StageParams):
        grid_sizes: list[int] = Field([1, 2, 4], description="N: each stitched image is an N×N grid of "
                                      "sub-images (the method uses 1, 2, 4, 8)")
        images_per_sample: list[int] = Field([1, 10], description="M: stitched images per sample (the method "
                                             "uses 1 and 10)")
        cell_size: int = Field(256, ge=8, le=2048, description="side of one sub-image in pixels; a stitched "
                               "image is N·cell_size pixels square")
        pool_size: int = Field(1024, ge=2, description="most pairs a pool holds (a shard is read in pools of "
                               "this many usable pairs; memory ≈ pool_size × cell_size² × 3 bytes); must be "
                               "above N²·M for every setting")
        samples_per_pair: float = Field(0.1, gt=0, le=1000, description="samples written per usable pair "
                                        "of a pool (rounded at random, the expectation exact)")
        negative_fraction: float = Field(0.5, ge=0, le=1, description="share of samples whose caption "
                                         "matches no sub-image (answer: absent_answer)")
        image_format: Literal["png", "jpeg"] = Field("png", description="encoding of the stitched images "
                                                     "(png: lossless, cells equal the resized sources)")
        quality: int = Field(90, ge=1, le=95, description="JPEG quality (image_format: jpeg)")
        compress_level: int = Field(1, ge=0, le=9, description="PNG zlib level (image_format: png): higher is "
                                    "smaller and slower (6: ~20% smaller, ~5× slower), the pixels are the same")
        image_tokens: ImageTokenParams = Field(default_factory=ImageTokenParams, description="how many "
                                               "tokens a stitched image costs the target model (in n_tokens)")
        answer_format: str = Field("{image}, {row}, {column}", description="the answer of a positive sample: "
                                   "{image}, {row} and {column} are replaced by 1-based numbers")
        absent_answer: str = Field("-1", min_length=1, description="the answer of a negative sample (the "
                                   "method's -1)")
        max_image_pixels: int = Field(MAX_PIXELS, gt=0, description="source images with more pixels are "
                                      "refused (image_too_large)")
        max_caption_chars: int = Field(2000, gt=0, description="pairs whose caption is longer are dropped "
                                       "(caption_too_long): a needle is one caption, not a document")

        @field_validator("grid_sizes", "images_per_sample")
        @classmethod
        def _positive_distinct(cls, value: list[int]) -> list[int]:
            if not value:
                raise ValueError("needs at least one value")
            if min(value) < 1:
                raise ValueError("values must be positive")
            if len(set(value)) != len(value):
                raise ValueError("values must be distinct")
            return value

        @field_validator("answer_format")
        @classmethod
        def _three_fields(cls, value: str) -> str:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
                value.format(image=1, row=1, column=1)
            except (ValueError, KeyError, IndexError) as e:
                raise ValueError(f"not a format string with {{image}}, {{row}} and {{column}}: {e}") from None
            if sorted(names) != ["column", "image", "row"]:
                raise ValueError("must name each of {image}, {row} and {column} exactly once")
            return value

        @model_validator(mode="after")
        def _check(self):
            n, m = max(self.grid_sizes), max(self.images_per_sample)
            if n * self.cell_size > _MAX_SIDE:
                raise ValueError(f"grid_sizes/cell_size: a {n}×{n} grid of {self.cell_size} px cells is "
                                 f"{n * self.cell_size} px wide, above {_MAX_SIDE}")
            if self.pool_size < n * n * m + 1:
                raise ValueError(f"pool_size: {self.pool_size} pairs can never fill a sample of {m} images of "
                                 f"{n}×{n} cells ({n * n * m} distinct images, and one more for a negative); "
                                 f"use pool_size >= {n * n * m + 1}")
            if self.absent_answer.strip() == self.answer_format.format(image=1, row=1, column=1).strip():
                raise ValueError("absent_answer must differ from every positive answer")
            return self

    requires = ("id", "texts", "images")
    provides = tuple(OUTPUT.names)
    needs: ClassVar[dict[str, str]] = {"PIL": "img"}
    needs_tokenizer = True

    def columns_out(self, columns_in: list[str]) -> list[str]:
        return list(OUTPUT.names)

    def score_names(self) -> list[str]:
        return []

    # ------------------------------------------------------------------ stream → pools → samples
    def run(self, batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
        p = self.params
        tok = ctx.tokenizer
        counter = p.image_tokens.counter()
        pool = _Pool()
        pool_index = 0
        emitted = [0]  # samples written in this shard (the k of their ids)
        out: list[dict] = []
        for batch in batches:
            ids = batch.column("id")
            texts, images = batch.column("texts"), batch.column("images")
            for i in range(batch.num_rows):
                self._take(ids[i].as_py(), texts[i].as_py(), images[i].as_py(), pool, ctx)
                if len(pool) >= p.pool_size:
                    yield from self._samples(pool, pool_index, ctx, tok, counter, emitted, out)
                    pool, pool_index = _Pool(), pool_index + 1
        if len(pool):
            yield from self._samples(pool, pool_index, ctx, tok, counter, emitted, out)
        if out:
            yield _batch(out)

    def _take(self, row_id: str, texts: list | None, images: list | None, pool: _Pool, ctx) -> None:
        """Add one input row to the pool, or drop it under its reason (counted, in ``failures/``)."""

        def drop(reason: str, detail: str) -> None:
            ctx.failure(reason, f"stage {self.label}, row {row_id!r}: {detail}", record=row_id, stage=self.label,
                        dropped=True)

        if texts is None or images is None or len(texts) != len(images) or \
                any((t is None) == (im is None) for t, im in zip(texts, images)):
            drop("misaligned_row", "texts and images are not aligned (each position needs exactly one)")
            return
        pictures = [im for im in images if im is not None]
        captions = [t for t in texts if t is not None]
        if len(pictures) != 1 or len(captions) != 1:
            drop("not_a_pair", f"{len(pictures)} image(s) and {len(captions)} text(s); a pair has one of each")
            return
        caption, image = captions[0].strip(), pictures[0]
        key = " ".join(caption.split()).casefold()
        if not key:
            drop("empty_caption", "the caption is empty or only whitespace")
            return
        if len(caption) > self.params.max_caption_chars:
            drop("caption_too_long", f"{len(caption):,} characters > max_caption_chars {self.params.max_caption_chars:,}")
            return
        data = image.get("bytes")
        if not data:
            drop("undecodable_image", "the image has no bytes")
            return
        sha = hashlib.sha256(data).hexdigest()
        if sha in pool.shas:
            drop("duplicate_image", f"the same image bytes as pool row {pool.ids[pool.shas[sha]]!r}")
            return
        try:
            cell = self.cell(data)
        except ImageProblem as e:
            drop(e.reason, e.detail)
            return
        pixels = hashlib.sha256(cell.tobytes()).digest()
        if pixels in pool.pixels:
            drop("duplicate_image", f"the same pixels, once resized, as pool row {pool.ids[pool.pixels[pixels]]!r}")
            return
        pool.add(row_id, caption, key, sha, pixels, cell)

    def cell(self, data: bytes) -> np.ndarray:
        """The source image as one grid cell: decoded to RGB, resized (bicubic) to ``cell_size`` square."""
        from PIL import Image

        im = decode_rgb(data, self.params.max_image_pixels)
        size = self.params.cell_size
        return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)

    def _samples(self, pool: _Pool, pool_index: int, ctx, tok, counter, emitted: list[int], out: list[dict]):
        """Draw this pool's samples; yield full output batches (``out`` keeps the remainder)."""
        p = self.params
        stats = ctx.stats[self.label]
        size = len(pool)
        stats.count("pool_pairs", size)
        rng = seeds.rng(ctx.seed, self.label, ctx.shard.key, "pool", pool_index)
        n_samples = math.floor(p.samples_per_pair * size + rng.random())
        n_negative = min(n_samples, math.floor(n_samples * p.negative_fraction + rng.random()))
        negative = np.zeros(n_samples, bool)
        negative[rng.permutation(n_samples)[:n_negative]] = True
        combos = [(n, m) for n in p.grid_sizes for m in p.images_per_sample]
        setting = np.empty(n_samples, np.int64)
        setting[rng.permutation(n_samples)] = np.arange(n_samples) % len(combos)  # each combination equally
        groups = np.asarray(pool.groups, np.int64)
        out_bytes = sum(len(im["bytes"]) for r in out for im in r["images"] if im is not None)
        for j in range(n_samples):
            n, m = combos[setting[j]]
            row = self._sample(pool, pool_index, groups, n, m, bool(negative[j]), rng, stats)
            if row is None:
                continue
            row["id"] = f"mmneedle-{ctx.shard.name}-{emitted[0]}"
            row["source"] = ctx.shard.rel or ctx.shard.uri
            self._finish(row, tok, counter)
            emitted[0] += 1
            stats.count("negative" if row["target"] is None else "positive")
            stats.count(f"grid_{n}_images_{m}")
            out.append(row)
            out_bytes += sum(len(im["bytes"]) for im in row["images"] if im is not None)
            if len(out) >= _BATCH_SAMPLES or out_bytes >= _BATCH_BYTES:
                yield _batch(out)
                out.clear()
                out_bytes = 0

    def _sample(self, pool: _Pool, pool_index: int, groups: np.ndarray, n: int, m: int, negative: bool,
                rng: np.random.Generator, stats) -> dict | None:
        p = self.params
        cells = n * n * m
        size = len(pool)
        if size < cells + (1 if negative else 0):
            stats.count("pool_too_small", cells + (1 if negative else 0))
            return None
        needle = int(rng.integers(size))
        eligible = np.flatnonzero(groups != groups[needle])  # never the needle, nor its caption
        need = cells if negative else cells - 1
        if len(eligible) < need:
            stats.count("too_few_distinct_captions", need)
            return None
        chosen = [int(x) for x in rng.choice(eligible, need, replace=False)]
        target = None
        if not negative:
            at = int(rng.integers(cells))
            chosen.insert(at, needle)
            per_image = n * n
            target = {"image": at // per_image + 1, "row": at % per_image // n + 1, "col": at % n + 1}
        stitched, layout = [], []
        for k in range(m):
            members = chosen[k * n * n:(k + 1) * n * n]
            stitched.append(self._stitch([pool.cells[c] for c in members], n))
            layout.append([{"id": pool.ids[c], "sha256": pool.sha_list[c]} for c in members])
        caption = pool.captions[needle]
        answer = self.params.absent_answer if target is None else \
            p.answer_format.format(image=target["image"], row=target["row"], column=target["col"])
        prompt = self.prompt(n, m, caption)
        meta = {"grid": n, "images": m, "cell_size": p.cell_size, "positive": target is not None,
                "layout": layout, "needle": {"id": pool.ids[needle], "sha256": pool.sha_list[needle]},
                "pool": pool_index, "pool_pairs": size}
        return {"images": stitched, "prompt": prompt, "answer": answer, "target": target, "needle": caption,
                "meta": meta}

    def _stitch(self, cells: list[np.ndarray], n: int) -> dict:
        """One stitched image as an IMAGE struct: the cells in row-major order on an N×N grid."""
        from PIL import Image

        p = self.params
        size = p.cell_size
        canvas = np.empty((n * size, n * size, 3), np.uint8)
        for k, cell in enumerate(cells):
            r, c = divmod(k, n)
            canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] = cell
        buf = io.BytesIO()
        im = Image.fromarray(canvas, "RGB")
        if p.image_format == "png":
            im.save(buf, format="PNG", optimize=False, compress_level=p.compress_level)
        else:
            im.save(buf, format="JPEG", quality=p.quality, optimize=False)
        data = buf.getvalue()
        return {"bytes": data, "mime": _MIME[p.image_format], "sha256": hashlib.sha256(data).hexdigest(),
                "width": n * size, "height": n * size}

    def _finish(self, row: dict, tok, counter) -> None:
        """Lay the row out as interleaved positions and count its tokens."""
        prompt, answer = row.pop("prompt"), row["answer"]
        text_tokens = [len(ids) for ids in tok.encode_batch([prompt, answer])]
        image_tokens = [counter.count(im["width"], im["height"]) for im in row["images"]]
        meta = row.pop("meta")
        meta.update(text_tokens={"prompt": text_tokens[0], "answer": text_tokens[1]}, image_tokens=image_tokens)
        row["meta"] = orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode()
        row["texts"] = [None] * len(row["images"]) + [prompt]
        row["images"] = row["images"] + [None]
        row["question"] = prompt
        row["n_tokens"] = sum(text_tokens) + sum(image_tokens)

    def prompt(self, n: int, m: int, caption: str) -> str:
        """The question of a sample with ``m`` stitched images of ``n × n`` cells about ``caption``."""
        p = self.params
        if m == 1:
            lines = ["Above is one image."]
            whole = "It"
        else:
            lines = [f"Above are {m} images, numbered 1 to {m} in the order they are shown."]
            whole = "Each of them"
        if n == 1:
            lines.append(f"{whole} holds a single picture, in row 1, column 1.")
        else:
            lines.append(f"{whole} is a grid of {n} rows and {n} columns of smaller pictures. Rows are numbered "
                         f"1 to {n} from the top, columns 1 to {n} from the left.")
        lines.append("Which picture does this caption describe?")
        lines.append(caption)
        form = p.answer_format.format(image="image", row="row", column="column")
        lines.append(f"Reply in the form \"{form}\", using the numbers above. If no picture matches the caption, "
                     f"reply \"{p.absent_answer}\".")
        return "\n".join(lines)


class _Pool:
    """The usable pairs of one pool: ids, captions, caption groups, source digests and resized cells."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.captions: list[str] = []
        self.groups: list[int] = []
        self.sha_list: list[str] = []
        self.cells: list[np.ndarray] = []
        self.shas: dict[str, int] = {}
        self.pixels: dict[bytes, int] = {}
        self._group_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, row_id: str, caption: str, key: str, sha: str, pixels: bytes, cell: np.ndarray) -> None:
        k = len(self.ids)
        self.ids.append(row_id)
        self.captions.append(caption)
        self.groups.append(self._group_of.setdefault(key, len(self._group_of)))
        self.sha_list.append(sha)
        self.cells.append(cell)
        self.shas[sha] = k
        self.pixels[pixels] = k


def _batch(rows: list[dict]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({name: [r[name] for r in rows] for name in OUTPUT.names}, schema=OUTPUT)

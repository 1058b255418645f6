"""The open_clip model every CLIP stage shares: loading, image and text embeddings, long-text chunks.

:class:`ClipModelParams` are the parameters (``model``, ``pretrained``, ``batch_size``, ``device``,
``max_image_pixels``); :class:`ClipModel` loads the model once per worker process for those parameters
(:func:`curate.models.shared`), embeds images — decoded by :func:`curate.images.decode_rgb` and
preprocessed a batch ahead of the model by :mod:`filters.clip_decode` (threads, or processes on CUDA;
the to-tensor and normalize steps batched on the model's device), undecodable (``undecodable_image``)
and oversized (``image_too_large``) images recorded in ``failures/`` and left out — and embeds texts,
splitting a text longer than the encoder's context into sentence chunks that fit. Embeddings are
L2-normalized float32 numpy arrays, so a dot product is the cosine similarity. ``timings`` adds up the
seconds spent decoding images, in the model, and waiting for decoded images, for throughput reports.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import ClassVar

import numpy as np
from pydantic import Field

from curate.errors import ConfigError, MissingDependency
from curate.images import MAX_PIXELS
from curate.models import file_key, shared
from curate.stage import StageParams
from filters import clip_decode

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def import_open_clip():
    """``import open_clip`` without its side effect on the process: importing it sets
    ``TOKENIZERS_PARALLELISM=false`` for the whole process and every process it starts, which would
    leave a run's ``tokenize`` stage (and the workers of a CLIP run) encoding on one core. The
    variable is put back as it was: it guards against forking after the encoder's threads started,
    and curate starts its workers with ``spawn``."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        import open_clip
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    return open_clip


class ClipModelParams(StageParams):
    """Which open_clip model, where it runs, and how images are guarded."""

    model: str = Field("ViT-B-32", description="open_clip model name, hf-hub:/local-dir: id, or a local folder")
    pretrained: str | None = Field(None, description="pretrained tag or checkpoint file (with a model name)")
    batch_size: int = Field(64, gt=0, description="images (and text chunks) per forward pass")
    device: str = Field("auto", description="auto (CUDA in float16 when present), cpu, cuda …")
    max_image_pixels: int = Field(MAX_PIXELS, gt=0,
                                  description="images with more pixels are not decoded (image_too_large)")
    decode_workers: int | None = Field(None, gt=0, description="threads or processes decoding and preprocessing "
                                       "images ahead of the model (default: usable cores, at most 32; on the CPU 8)")
    decode_processes: bool | None = Field(None, description="decode in worker processes instead of threads "
                                          "(default: on CUDA, where threads starve the model on the GIL)")


class ClipModel:
    """An open_clip model for one stage's parameters; :meth:`load` before embedding."""

    needs: ClassVar[dict[str, str]] = {"open_clip": "clip", "torch": "clip", "PIL": "clip"}

    def __init__(self, params: ClipModelParams):
        self.params = params
        self.timings = {"decode_s": 0.0, "model_s": 0.0, "wait_s": 0.0}

    def model_refs(self) -> dict[str, str]:
        """What ``setup`` loads: an ``hf-hub:`` repository, a ``local-dir:`` or local folder, a checkpoint
        file given as ``pretrained``, or the Hub repository open_clip fetches a ``pretrained`` tag from
        (looked up in open_clip's table, which imports it: only when a tag is given). A bare
        architecture name without ``pretrained`` loads nothing (random weights). A ``pretrained`` that is
        neither a file nor a tag of the model is a :class:`ConfigError`."""
        from curate.checks import LOCAL, looks_like_path

        p = self.params
        if p.model.startswith("hf-hub:"):
            return {"model": p.model[len("hf-hub:"):]}
        if p.model.startswith("local-dir:"):
            return {"model": LOCAL + p.model[len("local-dir:"):]}
        if os.path.isdir(os.path.expanduser(p.model)) or "/" in p.model or p.model.startswith(("~", ".")):
            return {"model": LOCAL + p.model}
        if p.pretrained is None:
            return {}
        if os.path.exists(os.path.expanduser(p.pretrained)) or looks_like_path(p.pretrained):
            return {"pretrained": LOCAL + p.pretrained}
        try:
            open_clip = import_open_clip()
        except ImportError:  # reported by the planner's module check
            return {}
        cfg = open_clip.get_pretrained_cfg(p.model, p.pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(p.model)
            raise ConfigError(f"pretrained: {p.pretrained!r} is neither a checkpoint file nor a pretrained tag "
                              f"of {p.model!r} (its tags: {', '.join(tags) or 'none; is the model name right?'})")
        hub = "/".join(str(cfg.get("hf_hub") or "").strip("/").split("/")[:2])
        return {"pretrained": hub} if hub else {}

    def load(self) -> None:
        """Load (or reuse) the model, its preprocessing and its tokenizer."""
        try:
            import torch

            open_clip = import_open_clip()
        except ImportError as e:
            raise MissingDependency(e.name or "open_clip", "clip") from None
        p = self.params
        name = p.model
        if os.path.isdir(os.path.expanduser(name)):
            name = "local-dir:" + os.path.expanduser(name)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        precision = _precision(self.device)

        def load():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=p.pretrained, device=self.device, precision=precision)
            model.eval()
            return model, preprocess, open_clip.get_tokenizer(name)

        # once per worker process for these parameters, however many shards it scores
        files = tuple(file_key(f) for f in (p.model, p.pretrained) if f and os.path.exists(os.path.expanduser(f)))
        self.model, self.preprocess, self.tokenizer = shared(
            "open_clip", (name, p.pretrained, self.device, precision, files), load)
        self.context = int(getattr(self.tokenizer, "context_length", 77))
        self.torch = torch
        # open_clip's "fp16" is mixed precision (OpenAI's recipe): convolutions, linear layers and
        # projections in float16, layer norms and embeddings such as the class token kept in float32,
        # so the model's first parameter says nothing about what the image tower takes: it takes float16.
        self.input_dtype = torch.float16 if precision == "fp16" else torch.float32

    def chunks(self, text: str) -> list[str]:
        """The text as is when it fits the text encoder, else sentence chunks that each fit.

        A sentence too long for the context is cut between words, and a word too long for it (a run
        of characters without spaces: a URL, CJK, emoji) between characters, so every chunk fits and
        no part of the text is truncated away by the tokenizer. Each word is encoded once (the text
        encoders' tokenizers split at whitespace first), so a long text costs linear time."""
        budget = self.context - 2  # start and end tokens
        encode = self.tokenizer.encode
        if len(encode(text)) <= budget:
            return [text]
        out, current, used = [], [], 0
        for sentence in _SENTENCE.split(text.strip()):
            n = len(encode(sentence))
            pieces = [(sentence, n)] if n <= budget else self._word_pieces(sentence, budget)
            for piece, n in pieces:
                if current and used + n > budget:
                    out.append(" ".join(current))
                    current, used = [], 0
                current.append(piece)
                used += n
        if current:
            out.append(" ".join(current))
        return out

    def _word_pieces(self, sentence: str, budget: int) -> list[tuple[str, int]]:
        """``(piece, tokens)`` covering a sentence longer than ``budget`` tokens, each within it:
        whole words joined while they fit, a word longer than the budget cut by characters."""
        encode = self.tokenizer.encode
        out, piece, used = [], [], 0
        for word in sentence.split():
            n = len(encode(word))
            parts = [(word, n)] if n <= budget else _cut_word(word, budget, encode)
            for part, k in parts:
                if piece and used + k > budget:
                    out.append((" ".join(piece), used))
                    piece, used = [], 0
                piece.append(part)
                used += k
        if piece:
            out.append((" ".join(piece), used))
        return out

    def embed_images(self, blobs: list[bytes], owners: list[str], ctx, stage: str,
                     records: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings, ok)``, one row per blob (NaN where ``ok`` is False). A bad image is recorded in
        ``failures/`` as ``stage``'s, named by its ``owners`` entry (and ``record``: its ``records``
        entry, the row's id, when given), and counted by its reason."""
        torch = self.torch
        out, ok = [], np.zeros(len(blobs), bool)
        p = self.params
        processes = p.decode_processes if p.decode_processes is not None else self.device.startswith("cuda")
        batches = clip_decode.batches(blobs, self.preprocess, p.batch_size, torch=torch, device=self.device,
                                      dtype=self.input_dtype, max_pixels=p.max_image_pixels,
                                      workers=p.decode_workers or _default_workers(self.device),
                                      processes=processes, timings=self.timings)
        with contextlib.closing(batches):  # an error in the model stops the decoders now, not at GC
            for start, tensors, problems in batches:
                for k, problem in enumerate(problems):
                    if problem is not None:
                        ctx.failure(problem.reason, f"{owners[start + k]}: {problem.detail}", stage=stage,
                                    record=records[start + k] if records is not None else None)
                good = [problem is None for problem in problems]
                ok[start:start + len(good)] = good
                if tensors is None:
                    continue
                t0 = time.perf_counter()
                with torch.no_grad():
                    emb = _normalized(self.model.encode_image(tensors))
                self.timings["model_s"] += time.perf_counter() - t0
                out.append((np.flatnonzero(good) + start, emb))
        emb = np.full((len(blobs), out[0][1].shape[1] if out else 1), np.nan, np.float32)
        for where, e in out:
            emb[where] = e
        return emb, ok

    def embed_texts(self, chunks: list[str]) -> np.ndarray:
        """L2-normalized embeddings of texts that fit the encoder's context (see :meth:`chunks`)."""
        torch = self.torch
        parts = []
        t0 = time.perf_counter()
        for start in range(0, len(chunks), self.params.batch_size):
            tokens = self.tokenizer(chunks[start:start + self.params.batch_size]).to(self.device)
            with torch.no_grad():
                parts.append(_normalized(self.model.encode_text(tokens)))
        self.timings["model_s"] += time.perf_counter() - t0
        return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def _cut_word(word: str, budget: int, encode) -> list[tuple[str, int]]:
    """A word longer than ``budget`` tokens as consecutive character pieces of at most ``budget`` tokens
    each, each the longest that fits. The previous piece's length is the first guess (galloping from
    it, then bisection), so a uniform run costs a few encodes per piece: linear in the word."""
    out, start, width, n = [], 0, max(budget, 1), len(word)

    def fits(end: int) -> bool:
        return len(encode(word[start:end])) <= budget

    while start < n:
        lo, hi = start + 1, min(n, start + width)  # a single character always fits (at most 4 byte tokens)
        if fits(hi):
            lo, step = hi, 1
            while lo < n and fits(min(n, lo + step)):
                lo, step = min(n, lo + step), step * 2
            hi = lo if lo == n else min(n, lo + step) - 1  # lo + step does not fit
        else:
            hi -= 1
        while lo < hi:  # the longest end in [lo, hi]; lo fits
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        out.append((word[start:lo], len(encode(word[start:lo]))))
        width, start = lo - start, lo
    return out


def _default_workers(device: str) -> int:
    """Decoders: on CUDA every core this process may use, at most 32 (the CPUs only decode there;
    measured on an H200 with 16 cores and ViT-B-32, the model did 6,400–7,700 images/s and waited on
    decoding with any number of threads or processes — see benchmarks/gpu_paths.py); on the CPU one per
    core, at most 8 (measured with benchmarks/interleave_throughput.py on 2 cores: a tiny CLIP, where
    decoding dominates, ran 1.38× faster with 2 threads than with 1; ViT-B-32, where the model takes 99%
    of the time, 1.04×)."""
    from curate.executors.local import cpu_share

    cores = cpu_share()
    return max(1, min(32, cores) if device.startswith("cuda") else min(8, cores))


def _precision(device: str) -> str:
    """open_clip's precision for a device: its mixed ``fp16`` on CUDA, ``fp32`` elsewhere."""
    return "fp16" if device.startswith("cuda") else "fp32"


def _normalized(emb) -> np.ndarray:
    emb = emb.float()
    return (emb / emb.norm(dim=-1, keepdim=True)).cpu().numpy()



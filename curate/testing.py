"""Helpers for tests and benchmarks: synthetic JSONL corpora of a given size, process-tree memory.

The text is drawn at run time from what the machine has (its Python's docstrings: the standard library's
for the generated corpora, installed packages' for held-out text), never committed.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import orjson


def _paragraphs() -> list[str]:
    """Real paragraphs from the running Python's standard-library docstrings (see stdlib_docs)."""
    import os

    from curate.readers.stdlib_docs import _root, module_text, stdlib_files

    out: list[str] = []
    for rel in stdlib_files():
        out += [p.strip() for p in module_text(os.path.join(_root(), rel)).split("\n\n") if len(p.strip()) > 40]
    return out


def write_jsonl_corpus(path: str | Path, target_bytes: int, paragraphs_per_doc: tuple[int, int] = (4, 60),
                       seed: int = 0, books: float = 0.0, giants: int = 0) -> int:
    """Write about ``target_bytes`` of JSONL documents to ``path``; returns the document count.

    Each document is a random draw of real paragraphs (from the machine's own standard-library
    docstrings), so the text compresses like prose rather than like a repeated block. ``books`` is the
    share of book-length documents (1,000–5,000 paragraphs, ~0.3–1.5 MB) and ``giants`` the number of
    ~8 MB documents spread through the file — the long tail real corpora have.
    """
    import numpy as np

    pool = _paragraphs()
    rng = np.random.default_rng(seed)
    lo, hi = paragraphs_per_doc
    written, n = 0, 0
    giant_at = [target_bytes * (k + 1) // (giants + 1) for k in range(giants)]
    with open(path, "wb") as fh:
        while written < target_bytes:
            lines = []
            for _ in range(256):
                count = rng.integers(lo, hi)
                if books and rng.random() < books:
                    count = rng.integers(1000, 5000)
                if giant_at and written >= giant_at[0]:
                    giant_at.pop(0)
                    count = 60_000
                picks = rng.integers(0, len(pool), count)
                text = "\n\n".join(pool[i] for i in picks)
                lines.append(orjson.dumps({"id": f"doc-{n}", "text": text, "domain": f"d{n % 5}"}))
                n += 1
            chunk = b"\n".join(lines) + b"\n"
            fh.write(chunk)
            written += len(chunk)
    return n


def site_paragraphs(target_bytes: int | None = None) -> list[str]:
    """Distinct paragraphs (over 40 characters) of the docstrings of the third-party packages installed
    beside this Python (its ``site-packages``), in a stable order: real text that the generated corpora
    (drawn from the standard library) never contain, code-heavy like much of what people train on.

    Stops once about twice ``target_bytes`` is collected (all of them when None).
    """
    import ast
    import hashlib
    import site
    import warnings

    roots = sorted({p for p in site.getsitepackages() if os.path.isdir(p)})
    out: list[str] = []
    seen: set[bytes] = set()
    size = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as fh, warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        tree = ast.parse(fh.read())
                except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                    continue
                for node in ast.walk(tree):
                    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    for para in (ast.get_docstring(node) or "").split("\n\n"):
                        para = para.strip()
                        key = hashlib.blake2b(para.encode(), digest_size=16).digest()
                        if len(para) > 40 and key not in seen:
                            seen.add(key)
                            out.append(para)
                            size += len(para)
                if target_bytes is not None and size >= 2 * target_bytes:
                    return out
    return out


def write_heldout_corpus(path: str | Path, target_bytes: int, paragraphs_per_doc: tuple[int, int] = (4, 60),
                         seed: int = 0, books: float = 0.0) -> int:
    """Write about ``target_bytes`` of JSONL documents of held-out text (:func:`site_paragraphs`, each
    paragraph used once, shuffled); returns the document count. ``books`` is the share of book-length
    documents (1,000–5,000 paragraphs). Writes less when the machine has less text than asked for.
    """
    import numpy as np

    pool = site_paragraphs(target_bytes)
    rng = np.random.default_rng(seed)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    lo, hi = paragraphs_per_doc
    written, n, at = 0, 0, 0
    with open(path, "wb") as fh:
        while written < target_bytes and at < len(pool):
            count = int(rng.integers(lo, hi))
            if books and rng.random() < books:
                count = int(rng.integers(1000, 5000))
            line = orjson.dumps({"id": f"doc-{n}", "text": "\n\n".join(pool[at:at + count])}) + b"\n"
            at += count
            fh.write(line)
            written += len(line)
            n += 1
    return n


def byte_compile(root: str | Path | None = None) -> None:
    """Byte-compile curate's own packages, as ``pip install`` does, before a benchmark times anything.

    A source checkout run with ``PYTHONDONTWRITEBYTECODE=1`` (set on some CI machines and containers)
    otherwise compiles ~50 of curate's modules again in every process — ~0.25 s of CPU per driver
    and per worker that an installed curate never pays, while the peers' packages are compiled.
    ``root``: another checkout (the folder holding its ``curate/``), e.g. a benchmark's ``--compare-tree``.
    """
    import compileall

    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    for package in ("curate", "filters", "synthesizers"):
        if (root / package / "__init__.py").exists():
            compileall.compile_dir(str(root / package), quiet=2)


def tree_env(tree: str | Path, cwd: str | Path, env: dict | None = None) -> dict:
    """The environment that makes ``python`` started in ``cwd`` import curate from the checkout ``tree``.

    ``tree`` goes first on ``PYTHONPATH``. The process must not start in a folder holding another
    ``curate/`` (``python -m`` and ``python -c`` put their working folder before ``PYTHONPATH``: started
    in this repository, the "before" of a benchmark would silently be this version). Checked here by
    importing curate the same way; RuntimeError when the tree does not win.
    """
    import os
    import subprocess
    import sys

    tree = Path(tree).resolve()
    env = {**(env if env is not None else os.environ),
           "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    found = subprocess.run([sys.executable, "-c", "import curate; print(curate.__file__)"], cwd=str(cwd),
                           env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree):
        raise RuntimeError(f"started in {cwd}, python imports curate from {found}, not from {tree}")
    return env


def write_report(report: dict, path: str | None) -> dict:
    """Print a benchmark report as JSON, and save it to ``path`` when given."""
    import json

    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return report


class TreeMemory:
    """Samples the memory of a process and all its descendants (bytes).

    ``peak`` is the peak of the summed PSS (proportional set size: a page shared by three processes —
    the pyarrow and numpy libraries every worker maps — counts a third in each), the honest total for a
    process tree. ``peak_rss`` is the peak of the summed RSS, which counts shared pages once per process
    and so overstates the total; both are reported.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process(pid or os.getpid())
        self.interval, self.peak, self.peak_rss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        import psutil

        pss = rss = 0
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0, 0
        for p in procs:
            try:
                info = p.memory_full_info()
                pss += getattr(info, "pss", info.rss)
                rss += info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # the process ended between listing and reading it
        return pss, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            pss, rss = self._sample()
            self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)
            # Reading PSS walks every page table (~25 ms for a 1 GB process): sampling back to back would
            # take most of a core from the job being measured. Spend at most a fifth of one core on it.
            time.sleep(max(self.interval, 4 * (time.perf_counter() - start)))

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


#: Photographs and scans that scikit-image ships in its wheel (nothing downloaded), with a caption each.
SKIMAGE_PHOTOS = {
    "astronaut": "An astronaut in a white spacesuit in front of a flag.",
    "coffee": "A cup of coffee on a saucer seen from above.",
    "chelsea": "A ginger tabby cat looking to the side.",
    "rocket": "A rocket standing on its launch pad.",
    "camera": "A man with a camera on a tripod in a field.",
    "coins": "Many old coins laid out on a dark surface.",
    "hubble_deep_field": "Distant galaxies scattered across black space.",
    "immunohistochemistry": "A stained tissue sample under a microscope.",
    "colorwheel": "A circular wheel of rainbow colours.",
    "moon": "The surface of the moon with craters.",
    "clock": "A clock face photographed at an angle.",
    "brick": "A wall of bricks.",
}


def real_images(fmt: str = "JPEG", size: int | None = 256) -> list[tuple[str, bytes, str]]:
    """(name, encoded bytes, caption) for scikit-image's bundled photos plus a few generated images."""
    import io

    import numpy as np
    import skimage.data
    from PIL import Image, ImageDraw

    out = []
    for name, caption in SKIMAGE_PHOTOS.items():
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        if size:
            im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, fmt)
        out.append((name, buf.getvalue(), caption))
    for k, (colour, caption) in enumerate([((200, 30, 30), "A red square on white."),
                                           ((30, 30, 200), "A blue circle on white.")]):
        im = Image.new("RGB", (size or 256, size or 256), "white")
        draw = ImageDraw.Draw(im)
        (draw.rectangle if k == 0 else draw.ellipse)([40, 40, (size or 256) - 40, (size or 256) - 40], fill=colour)
        buf = io.BytesIO()
        im.save(buf, fmt)
        out.append((f"generated-{k}", buf.getvalue(), caption))
    gradient = np.tile(np.linspace(0, 255, size or 256, dtype=np.uint8), (size or 256, 1))
    buf = io.BytesIO()
    Image.fromarray(gradient).convert("RGB").save(buf, fmt)
    out.append(("generated-gradient", buf.getvalue(), "A grey gradient from dark to light."))
    return out


def save_tiny_clip(folder: str | Path, context_length: int = 77, seed: int = 0) -> Path:
    """A tiny open_clip model (2-layer towers, 64-px images) saved as a local-dir checkpoint folder."""
    import json

    import torch
    from safetensors.torch import save_file

    from filters.clip_model import import_open_clip

    cfg = {"embed_dim": 64,
           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = import_open_clip().CLIP(**cfg)
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


def save_open_clip_folder(model, name: str, folder: str | Path) -> Path:
    """Save an open_clip model (e.g. ``create_model("ViT-B-32")``) as a ``local-dir:`` checkpoint folder."""
    import json

    from safetensors.torch import save_file

    from filters.clip_model import import_open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    open_clip = import_open_clip()
    cfg = open_clip.get_model_config(name)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder

"""Shared fixtures: small real inputs made in the test, manifests written to tmp, the real CLI."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    """Byte-compile curate once: the suite starts hundreds of `curate` processes, and a machine with
    ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile ~50 modules again in each of them."""
    from curate.testing import byte_compile

    byte_compile()

WORDS = ("long context models read whole books and code bases so the corpus must hold documents whose "
         "parts depend on each other across many thousands of tokens while staying clean and deduplicated").split()


def make_text(i: int, n_words: int = 80) -> str:
    """A deterministic pseudo-sentence text (no copied prose): words cycle with a per-doc stride."""
    stride = 1 + (i % 7)
    words = [WORDS[(i + k * stride) % len(WORDS)] for k in range(n_words)]
    return " ".join(words).capitalize() + "."


def write_jsonl(path: Path, rows: list, compress: str | None = None) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    if compress == "gz":
        data = gzip.compress(data, mtime=0)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Four JSONL files of 50 documents each, with an id and a domain field."""
    folder = tmp_path / "corpus"
    for f in range(4):
        rows = [{"id": f"d{f}-{i}", "text": make_text(f * 50 + i, 40 + (i * 13) % 120), "domain": f"dom{f % 2}"}
                for i in range(50)]
        write_jsonl(folder / f"part-{f}.jsonl", rows)
    return folder


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None):
    """Run the real ``curate`` command in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "curate", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def curate_run(manifest: Path, out: Path, faults: list | None = None, background: bool = False, timeout: int = 300):
    """``curate run MANIFEST -o OUT --no-progress`` in its own process, with ``CURATE_FAULTS`` set to
    ``faults`` (and only then). ``background``: the ``Popen`` (its own session, pipes for both
    streams); otherwise the finished ``CompletedProcess``."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CURATE_FAULTS", None)
    if faults:
        env["CURATE_FAULTS"] = json.dumps(faults)
    args = [sys.executable, "-m", "curate", "run", str(manifest), "-o", str(out), "--no-progress"]
    if background:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def write_pair_shards(folder: Path, photos: list, shards: int = 2) -> Path:
    """WebDataset tars of (image, caption) pairs: photo ``k`` goes to shard ``k % shards``."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k, (name, data, caption) in enumerate(photos[s::shards]):
                for ext, payload in (("jpg", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s}-{k:03d}-{name}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return folder


def save_tiny_lm(folder: Path, seed: int = 0, n_positions: int = 64) -> Path:
    """A tiny GPT-2 with a BPE trained here, saved like a user's checkpoint (config, weights, tokenizer)."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    transformers = pytest.importorskip("transformers", reason="the `text` extra is not installed")
    from curate.tokenizer import TrainSpec, train_bpe

    bpe = train_bpe(TrainSpec(vocab_size=400, min_frequency=1), [make_text(i, 50) for i in range(200)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny GPT-2 (64-token context) saved to a folder."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"))


def make_stage(name: str, run_dir: Path | str = "/tmp/unused", **params):
    """A registered stage built from ``params``, set up with a one-shard context, as a worker does it."""
    from curate.context import RunContext
    from curate.readers.base import Shard
    from curate.registry import get_stage
    from curate.rundir import RunDir

    cls = get_stage(name)
    stage = cls(cls.Params(**params))
    ctx = RunContext(0, Shard("00000", "k", "mem"), RunDir(run_dir))
    stage.setup(ctx)
    return stage, ctx


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A real Llama/Mistral SentencePiece tokenizer (shipped by mistral_common) as a HF folder."""
    pytest.importorskip("transformers", reason="the `text` extra is not installed")
    pytest.importorskip("sentencepiece", reason="the `text` extra is not installed")
    mistral_common = pytest.importorskip("mistral_common", reason="the `text` extra is not installed")
    folder = tmp_path_factory.mktemp("llama")
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "legacy": False}))
    return folder

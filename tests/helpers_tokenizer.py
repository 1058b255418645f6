"""A real run tokenizer for tests: a byte-level BPE trained in the fixture, prepared like a run's."""

from __future__ import annotations

from pathlib import Path

from curate.tokenizer import TokenizerSpec, prepare
from tests.conftest import make_text


def prepare_tokenizer(root: Path, specials: list[str], vocab_size: int = 400) -> Path:
    """Write ``root/tokenizer/`` as the driver would, with ``specials`` assigned ids."""
    spec = TokenizerSpec(train={"vocab_size": vocab_size, "min_frequency": 1})
    texts = [make_text(i, 60) for i in range(300)] + ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"]
    prepare(spec, Path(root) / "tokenizer", specials, lambda: iter(texts))
    return Path(root) / "tokenizer"

"""Variable visual position encoding (V2PE, Ge et al. 2024): the positions a multimodal sequence spans.

With V2PE a vision-language model gives its image tokens smaller position steps than its text tokens,
so a long interleaved sequence spans far fewer positions than it has tokens. The rule, as the method's
own code applies it:

- every text token (image marker tokens such as ``<img>``/``</img>`` included) advances the position
  by 1, starting from 0;
- the ``N`` visual tokens of an image advance it by ``δ = stride / unit`` each (``unit`` is the visual
  tokens of one image tile, 256 for InternVL; ``stride`` is one of 1, 2, 4, …, 256, sampled per image
  while training and fixed, e.g. 64, when evaluating), starting after the token before the image;
- after an image the position is rounded up to a whole number.

So an image spans ``ceil(stride × N / unit)`` positions, and a sequence of ``T`` text tokens and images
of ``N_i`` visual tokens spans ``T + Σ ceil(stride × N_i / unit)`` positions (:func:`n_positions`), the
figure to hold against a model's position window when a sequence is longer than the window in tokens.
``count_tokens`` writes it as ``n_positions`` when given ``v2pe_stride``. Computed in integers: exact
where the model's own floating-point arithmetic may round.
"""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction

import numpy as np

#: Visual tokens per image tile in InternVL (448 px tiles, 1,024 patches after a 0.5 pixel shuffle).
UNIT = 256
#: The strides V2PE samples from while training.
STRIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def image_positions(visual_tokens: int, stride: int, unit: int = UNIT) -> int:
    """Positions an image of ``visual_tokens`` visual tokens spans: ``ceil(stride × visual_tokens / unit)``."""
    if stride <= 0 or unit <= 0 or visual_tokens < 0:
        raise ValueError("stride and unit must be positive and visual_tokens not negative")
    return -(-stride * visual_tokens // unit)


def n_positions(segments: Iterable[tuple[str, int]], stride: int, unit: int = UNIT) -> int:
    """Positions a sequence spans: ``segments`` are ``("text", tokens)`` and ``("image", visual_tokens)``
    in order (markers around an image are text tokens)."""
    total = 0
    for kind, n in segments:
        total += n if kind == "text" else image_positions(n, stride, unit)
    return total


def position_ids(segments: Iterable[tuple[str, int]], stride: int, unit: int = UNIT) -> np.ndarray:
    """Every token's position id (float64), the same ``segments`` as :func:`n_positions`.

    Visual token ``k`` (from 1) of an image after a token at position ``p`` sits at ``p + k × δ``; the
    next token after the image at ``ceil(p + N × δ) + 1``. Exact rationals, returned as floats.
    """
    delta = Fraction(stride, unit)
    out: list[float] = []
    last = Fraction(-1)
    for kind, n in segments:
        if kind == "text":
            out += [float(last + k) for k in range(1, n + 1)]
            last += n
        else:
            out += [float(last + k * delta) for k in range(1, n + 1)]
            last = Fraction(-(-(last + n * delta).numerator // (last + n * delta).denominator))
    return np.asarray(out, dtype=np.float64)

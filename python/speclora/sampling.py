"""How a token distribution is derived from logits, shared by draft and target.

Lossless speculative sampling needs both models' distributions processed the same
way the target alone would process its own: ``softmax(filter(log_softmax(logits)) / T)``
with mlx-lm's ``make_sampler`` semantics (filters act on log-probabilities at T=1,
then the temperature scales what survives). The acceptance op applies the
temperature; this module applies the filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

LogitsFilter = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    """Options that shape the sampling distribution.

    Args:
        temperature (float): ``0`` decodes greedily. Default: ``0.0``.
        top_p (float): Nucleus mass kept, in ``(0, 1]``; ``1`` disables it.
          Default: ``1.0``.
        top_k (int): Keep the k most likely tokens; ``0`` disables it. Default: ``0``.
        min_p (float): Drop tokens below ``min_p`` times the top probability, in
          ``[0, 1)``; ``0`` disables it. Default: ``0.0``.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_p, bool) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.min_p, bool) or not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_logits_filter(params: SamplingParams, vocab_size: int) -> LogitsFilter | None:
    """Build the filter chain of ``params`` (``None`` when nothing filters).

    Greedy decoding needs no filter: every filter keeps the argmax.

    Args:
        params (SamplingParams): The sampling options.
        vocab_size (int): The models' vocabulary size (a ``top_k`` at or above it
          filters nothing).

    Returns:
        Callable or None: maps logits ``[..., V]`` to filtered log-probabilities
        ``[..., V]`` (``-inf`` where a token is excluded).
    """
    if params.greedy:
        return None
    steps: list[LogitsFilter] = []
    if params.top_p < 1.0:
        steps.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0.0:
        steps.append(lambda x: apply_min_p(x, params.min_p))
    if 0 < params.top_k < vocab_size:
        steps.append(lambda x: apply_top_k(x, params.top_k))
    if not steps:
        return None

    def apply(logits: mx.array) -> mx.array:
        x = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for step in steps:
            x = step(x)
        return x

    return apply


def sample(logits: mx.array, temperature: float) -> mx.array:
    """Draw one token per row from ``softmax(logits / temperature)``.

    Args:
        logits (mx.array): ``[..., V]`` processed logits.
        temperature (float): ``0`` takes the argmax.

    Returns:
        mx.array: ``[...]`` uint32 token ids.
    """
    if temperature == 0.0:
        return mx.argmax(logits, axis=-1).astype(mx.uint32)
    return mx.random.categorical(logits * (1.0 / temperature)).astype(mx.uint32)

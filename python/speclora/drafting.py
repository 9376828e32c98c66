"""Choosing how many tokens to draft each round.

With per-token acceptance probability ``a``, drafting ``K`` tokens yields
``(1 - a**(K+1)) / (1 - a)`` tokens per round (Leviathan et al. 2023, eq. 1). A round
costs ``K`` draft steps plus one target pass over ``K + 1`` tokens. The adaptive
policy picks the ``K`` that maximises tokens per unit of cost, re-estimating ``a``
from the rounds it has seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx


def expected_tokens(acceptance: float, k: int) -> float:
    """Expected tokens emitted by a round that drafts ``k`` tokens.

    Args:
        acceptance (float): Per-token acceptance probability ``a`` in ``[0, 1]``.
        k (int): Number of drafted tokens.

    Returns:
        float: ``1 + a + ... + a**k``.
    """
    return sum(acceptance**i for i in range(k + 1))


@dataclass(frozen=True)
class RoundCost:
    """Cost of one round, in units of one target decode step.

    Args:
        draft_step (float): One draft decode step (the ``c`` of Leviathan et al.).
        verify_extra (float): What each verified token beyond the first adds to the
          target pass. ``0`` on hardware where ``K + 1`` tokens cost as much as one.
    """

    draft_step: float
    verify_extra: float = 0.0
    target_step_s: float = 0.0  # absolute seconds of the unit, when measured

    def of(self, k: int) -> float:
        return 1.0 + k * (self.draft_step + self.verify_extra)

    def speedup_bound(self, acceptance: float, k: int) -> float:
        """Leviathan's expected speedup over the target alone for this ``k``."""
        return expected_tokens(acceptance, k) / self.of(k)


class DraftLengthPolicy(Protocol):
    """Decides ``K`` for the next round and learns from each round's outcome."""

    def next_k(self) -> int: ...

    def update(self, drafted: int, accepted: int) -> None: ...


@dataclass
class FixedDraftLength:
    """Always draft ``k`` tokens."""

    k: int

    def next_k(self) -> int:
        return self.k

    def update(self, drafted: int, accepted: int) -> None:
        return None


class AdaptiveDraftLength:
    """Pick ``K`` maximising expected tokens per unit cost under the measured costs.

    Acceptance is estimated as accepted / (accepted + rejections) over recent rounds
    (the maximum-likelihood estimate for a geometric run length censored at ``K``),
    with exponential forgetting so it follows a drift in the text or an adapter swap.

    Args:
        cost (RoundCost): Measured draft and verification costs.
        max_k (int): Largest ``K`` considered. Default: ``8``.
        initial_acceptance (float): Prior estimate before any round. Default: ``0.5``.
        prior_weight (float): How many pseudo-tokens the prior counts for.
          Default: ``4.0``.
        decay (float): Per-round forgetting factor in ``(0, 1]``. Default: ``0.95``.
    """

    def __init__(
        self,
        cost: RoundCost,
        *,
        max_k: int = 8,
        initial_acceptance: float = 0.5,
        prior_weight: float = 4.0,
        decay: float = 0.95,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.cost = cost
        self.max_k = max_k
        self.decay = decay
        self._accepted = initial_acceptance * prior_weight
        self._rejected = (1.0 - initial_acceptance) * prior_weight
        self._k = self._best_k()

    @property
    def acceptance(self) -> float:
        """The current per-token acceptance estimate."""
        return self._accepted / max(self._accepted + self._rejected, 1e-9)

    def _best_k(self) -> int:
        a = min(self.acceptance, 0.999)
        return max(range(1, self.max_k + 1), key=lambda k: self.cost.speedup_bound(a, k))

    def next_k(self) -> int:
        return self._k

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self._accepted = self.decay * self._accepted + accepted
        self._rejected = self.decay * self._rejected + (1.0 if accepted < drafted else 0.0)
        self._k = self._best_k()


def measure_round_cost(
    target: Any, draft: Any, *, max_k: int = 8, context: int = 32, repeats: int = 8
) -> RoundCost:
    """Time the two models on this machine to fill in a :class:`RoundCost`.

    Runs decode steps of each model and one target pass over ``max_k + 1`` tokens on a
    short random context (about ``3 * repeats`` forward passes in all, after warm-up).

    Args:
        target (nn.Module): The target model.
        draft (nn.Module): The draft model.
        max_k (int): Largest ``K`` the policy will consider. Default: ``8``.
        context (int): Tokens of context before the timed steps. Default: ``32``.
        repeats (int): Timed repetitions of each measurement. Default: ``8``.

    Returns:
        RoundCost: costs relative to one target decode step.
    """
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from speclora.decoding import vocab_size

    vocab = vocab_size(target)
    prompt = mx.random.randint(0, vocab, (1, context), key=mx.random.key(0)).astype(mx.uint32)
    one = prompt[:, -1:]
    many = mx.repeat(one, max_k + 1, axis=1)

    def seconds(model: Any, tokens: mx.array) -> float:
        cache = make_prompt_cache(model)
        mx.eval(model(prompt, cache=cache))
        best = float("inf")
        for _ in range(repeats + 2):  # the first two warm up
            start = time.perf_counter()
            mx.eval(model(tokens, cache=cache))
            best = min(best, time.perf_counter() - start)
            trim_prompt_cache(cache, tokens.shape[1])
        return best

    step = seconds(target, one)
    return RoundCost(
        draft_step=seconds(draft, one) / step,
        verify_extra=max(0.0, seconds(target, many) / step - 1.0) / max_k,
        target_step_s=step,
    )

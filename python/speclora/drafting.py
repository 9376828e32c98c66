"""Choosing what to propose each round: which proposer, and how many tokens.

A round proposes ``K`` tokens, the target scores them in one pass over ``K + 1``
tokens and emits the accepted ones plus one of its own. If draft position ``i`` is
accepted with probability ``a_i`` once every earlier one was, the round emits
``1 + a_0 + a_0 a_1 + ... + a_0 ... a_{K-1}`` tokens on average (Leviathan et al.
2023, eq. 1, with per-position rates). It costs the target's pass over ``K + 1``
tokens plus, for the draft model, ``K`` draft steps; prompt lookup
(:mod:`speclora.ngram`) costs no model call. ``K = 0`` is a plain target step.

:class:`AdaptiveDraftLength` picks, each round, the proposer and ``K`` with the most
expected tokens per unit of cost, from measured costs (:func:`measure_round_cost`)
and acceptance rates it learns per proposer and position. Because the plain target
step is always a candidate, a draft that does not pay stops being used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx

from speclora.ngram import NO_PROPOSAL, NgramProposal

DRAFT = "draft"
"""The draft model proposes (``K`` decode steps)."""
NGRAM = "ngram"
"""Prompt lookup proposes (no model call)."""
NONE = "none"
"""Nothing is proposed: a plain target step."""
PROPOSERS = (DRAFT, NGRAM)


def expected_tokens(acceptance: float | Sequence[float], k: int) -> float:
    """Expected tokens emitted by a round that drafts ``k`` tokens.

    Args:
        acceptance (float or Sequence[float]): Per-token acceptance probability
          ``a``, or per-position conditional rates ``a_0, a_1, ...`` (at least
          ``k`` of them).
        k (int): Number of drafted tokens.

    Returns:
        float: ``1 + a + ... + a**k``, or ``1 + a_0 + a_0 a_1 + ...`` for rates.
    """
    if isinstance(acceptance, (int, float)):
        return sum(acceptance**i for i in range(k + 1))
    total = reach = 1.0
    for i in range(k):
        reach *= acceptance[i]
        total += reach
    return total


@dataclass(frozen=True)
class RoundCost:
    """Cost of one round, in units of one target decode step.

    Args:
        draft_step (float): One draft decode step (the ``c`` of Leviathan et al.).
        verify_extra (float): What each verified token beyond the first adds to the
          target pass, where ``verify`` has no entry. ``0`` on hardware where
          ``K + 1`` tokens cost as much as one. Default: ``0.0``.
        target_step_s (float): Seconds of one target decode step, when measured.
        verify (tuple[float, ...]): ``verify[k]``: the target pass over ``k + 1``
          tokens (``verify[0] == 1``), when measured. Default: ``()``.
        plain_step (float): A plain target step in a run of them, each started
          before the one before it is read (as mlx-lm's ``generate_step`` and the
          decode loop run them), which hides the host's work between steps.
          Default: ``1.0``.
    """

    draft_step: float
    verify_extra: float = 0.0
    target_step_s: float = 0.0
    verify: tuple[float, ...] = ()
    plain_step: float = 1.0

    def verify_cost(self, k: int) -> float:
        """The target pass over ``k + 1`` tokens."""
        if k < len(self.verify):
            return self.verify[k]
        if self.verify:
            return self.verify[-1] + (k - len(self.verify) + 1) * self.verify_extra
        return 1.0 + k * self.verify_extra

    def of(self, k: int, proposer: str = DRAFT) -> float:
        """A round proposing ``k`` tokens with ``proposer``."""
        return self.verify_cost(k) + (k * self.draft_step if proposer == DRAFT else 0.0)

    def speedup_bound(
        self, acceptance: float | Sequence[float], k: int, proposer: str = DRAFT
    ) -> float:
        """Leviathan's expected speedup over the target alone for this ``k``."""
        return expected_tokens(acceptance, k) / self.of(k, proposer)


@dataclass(frozen=True)
class Plan:
    """What a round proposes: ``k`` tokens from ``proposer`` (``NONE`` when 0)."""

    proposer: str
    k: int


class DraftLengthPolicy(Protocol):
    """Decides what the next round proposes and learns from each outcome.

    ``uses_ngram`` tells the decode loop whether to keep a prompt-lookup index and
    pass its proposal to :meth:`plan`.

    A policy may also have ``expects_plain_step(matches) -> bool``: whether the next
    :meth:`plan`, told ``started=True``, will be a plain target step whatever prompt
    lookup proposes then, its matched suffix being one of the lengths ``matches``
    (asked before :meth:`update` of the current round). The decode loop then starts
    that step before it reads the token the step follows, and tells :meth:`plan`
    so (any other plan throws the running step away); a wrong forecast costs the
    step, never the output.
    """

    uses_ngram: bool

    def plan(self, ngram: NgramProposal, *, started: bool = False) -> Plan: ...

    def update(
        self, plan: Plan, accepted: int, seconds: float | None = None
    ) -> None: ...


@dataclass
class FixedDraftLength:
    """Always draft ``k`` tokens with the draft model (``k = 0``: never speculate)."""

    k: int
    uses_ngram: bool = field(default=False, init=False)

    def plan(
        self, ngram: NgramProposal = NO_PROPOSAL, *, started: bool = False
    ) -> Plan:
        return Plan(DRAFT, self.k) if self.k else Plan(NONE, 0)

    def expects_plain_step(self, matches: Sequence[int] = ()) -> bool:
        return self.k == 0

    def update(self, plan: Plan, accepted: int, seconds: float | None = None) -> None:
        return None


class PositionAcceptance:
    """Per-position acceptance rates learnt from rounds, with forgetting.

    Rate ``i`` is the probability that draft ``i`` is accepted given that every
    earlier one was. Each is shrunk toward the rate of the position before it
    (toward ``prior`` for position 0) by ``prior_weight`` pseudo-observations, so
    positions seldom reached borrow from their neighbours.

    Args:
        prior (float): Rate assumed before any observation.
        prior_weight (float): Pseudo-observations the prior counts for.
        decay (float): Forgetting factor per update, in ``(0, 1]``.
    """

    def __init__(self, prior: float, prior_weight: float, decay: float) -> None:
        self.prior = prior
        self.prior_weight = prior_weight
        self.decay = decay
        self._accepted: list[float] = []
        self._seen: list[float] = []

    def rates(self, k: int, prior: float | None = None) -> list[float]:
        """Rates of positions ``0 .. k - 1`` (position 0 shrunk toward ``prior``
        when given, else toward the constructor's)."""
        out: list[float] = []
        previous = self.prior if prior is None else prior
        for i in range(k):
            acc, seen = (
                (self._accepted[i], self._seen[i])
                if i < len(self._seen)
                else (0.0, 0.0)
            )
            previous = (acc + self.prior_weight * previous) / (seen + self.prior_weight)
            out.append(previous)
        return out

    def update(self, drafted: int, accepted: int) -> None:
        """Record a round: positions ``0 .. accepted`` were judged, the first
        ``accepted`` of them accepted."""
        if drafted == 0:
            return
        judged = min(accepted + 1, drafted)
        if judged > len(self._seen):
            missing = judged - len(self._seen)
            self._seen.extend([0.0] * missing)
            self._accepted.extend([0.0] * missing)
        for i in range(len(self._seen)):
            self._seen[i] *= self.decay
            self._accepted[i] *= self.decay
        for i in range(judged):
            self._seen[i] += 1.0
            self._accepted[i] += float(i < accepted)


class RoundTimeModel:
    """Seconds a round takes, as a function of what it proposes, learnt from rounds.

    ``t(k, proposer) = a [k = 0] + b [k >= 1] + v k + d k [proposer is the draft
    model]``: a plain target step, a round that proposes (its target pass, the
    acceptance op, the host's work between rounds, which a proposing round cannot
    hide), each further verified token, each draft step. A plain step has its own
    term because runs of them overlap (see ``RoundCost.plain_step``): rounds that
    propose say nothing about it. The parameters are a weighted least-squares fit with forgetting,
    pulled toward the isolated measurement (``RoundCost``) with the weight of
    ``prior_rounds`` rounds, so that terms the rounds seen so far cannot tell apart
    stay at their measured values. Measured in the loop, costs include what the
    isolated measurement misses (caches shared by two models, a busy machine,
    Python between passes).

    The arithmetic is plain Python on 4 numbers: it runs every round, between
    model calls, where a NumPy call costs more than the whole fit.

    Args:
        cost (RoundCost): The isolated measurement (its ``target_step_s`` sets the
          unit; ``1`` when it has none).
        max_k (int): The largest ``K`` the policy considers.
        forgetting (float): Weight of the past per observed round. Default: ``0.99``.
        prior_rounds (float): Weight of the isolated measurement. Default: ``1.0``.
        refit_every (int): Rounds between two solutions of the fit. Default: ``4``.
    """

    TYPICAL_K = 3.0

    def __init__(
        self,
        cost: RoundCost,
        *,
        max_k: int,
        forgetting: float = 0.99,
        prior_rounds: float = 1.0,
        refit_every: int = 4,
    ) -> None:
        unit = cost.target_step_s or 1.0
        v1 = cost.verify_cost(1)
        slope = (
            (cost.verify_cost(max_k) - v1) / (max_k - 1)
            if max_k > 1
            else cost.verify_extra
        )
        self.prior = [
            cost.plain_step * unit,
            (v1 - slope) * unit,
            slope * unit,
            cost.draft_step * unit,
        ]
        k2 = self.TYPICAL_K**2
        self._pull = [prior_rounds * w for w in (1.0, 1.0, k2, k2)]  # a diagonal
        self._gram = [[0.0] * 4 for _ in range(4)]
        self._moment = [0.0] * 4
        self.forgetting = forgetting
        self.refit_every = refit_every
        self._pending = 0
        self.theta = list(self.prior)
        self._floor = 0.1 * unit

    @staticmethod
    def features(k: int, proposer: str) -> list[float]:
        return [
            float(k == 0),
            float(k >= 1),
            float(k),
            float(k) if proposer == DRAFT else 0.0,
        ]

    def seconds(self, k: int, proposer: str) -> float:
        """Expected seconds of a round proposing ``k`` tokens with ``proposer``."""
        a, b, v, d = self.theta
        t = (b if k >= 1 else a) + k * (v + (d if proposer == DRAFT else 0.0))
        # A fit cannot make rounds free.
        return max(t, self._floor)

    def observe(self, k: int, proposer: str, seconds: float) -> None:
        """Fit in a round that took ``seconds``."""
        x = self.features(k, proposer)
        # A stray slow round (a pause of the machine) must not move the fit far.
        y = min(seconds, 3.0 * self.seconds(k, proposer))
        f = self.forgetting
        for i in range(4):
            row = self._gram[i]
            for j in range(4):
                row[j] = f * row[j] + x[i] * x[j]
            self._moment[i] = f * self._moment[i] + x[i] * y
        self._pending += 1
        if self._pending >= self.refit_every:
            self._pending = 0
            self.theta = _solve(
                [
                    [g + (self._pull[i] if i == j else 0.0) for j, g in enumerate(row)]
                    for i, row in enumerate(self._gram)
                ],
                [m + self._pull[i] * self.prior[i] for i, m in enumerate(self._moment)],
            )


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """``a x = b`` for a small symmetric positive definite ``a`` (Gaussian elimination)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        pivot = m[c][c]
        for r in range(c + 1, n):
            factor = m[r][c] / pivot
            if factor:
                for j in range(c, n + 1):
                    m[r][j] -= factor * m[c][j]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][j] * x[j] for j in range(r + 1, n))) / m[r][r]
    return x


class AdaptiveDraftLength:
    """Each round, the proposer and ``K`` with the most expected tokens per second.

    Candidates: a plain target step (``K = 0``, unless ``min_k >= 1``); the draft
    model with ``K`` in ``[max(1, min_k), max_k]``; and, when ``ngram`` is on and
    prompt lookup found a match, the first ``K`` of its proposal. Acceptance is
    learnt per proposer and position (for prompt lookup, per matched suffix
    length too, shrunk toward prompt lookup's overall rate); the seconds a round
    takes, by a :class:`RoundTimeModel` fitted to the rounds' own timings,
    starting from ``cost``. A proposer left unused for a while is tried again
    with one token (a probe), at intervals that double with each probe (up to
    ``MAX_PROBE_INTERVAL`` rounds) and start again once the proposer is chosen:
    a draft that improves (an adapter swap, easier text), or whose rounds prove
    cheaper than measured in isolation, is noticed, at a bounded cost when it
    does not.

    Args:
        cost (RoundCost): Draft and verification costs measured in isolation.
        max_k (int): Largest ``K`` considered. Default: ``8``.
        min_k (int): Smallest ``K`` of the draft model; ``1`` or more keeps the
          draft model drafting every round (no plain steps, no prompt lookup).
          Default: ``0``.
        ngram (bool): Consider prompt-lookup proposals. Default: ``False``.
        initial_acceptance (float): Prior rate before any round. Default: ``0.5``.
        prior_weight (float): How many pseudo-rounds the prior counts for.
          Default: ``4.0``.
        decay (float): Per-round forgetting factor in ``(0, 1]``. Default: ``0.95``.
        probe_interval (int): Rounds a proposer may go unused before a probe.
          Default: ``8``.
    """

    MAX_PROBE_INTERVAL = 64

    def __init__(
        self,
        cost: RoundCost,
        *,
        max_k: int = 8,
        min_k: int = 0,
        ngram: bool = False,
        initial_acceptance: float = 0.5,
        prior_weight: float = 4.0,
        decay: float = 0.95,
        probe_interval: int = 8,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        if not 0 <= min_k <= max_k:
            raise ValueError(f"min_k must be in [0, max_k={max_k}], got {min_k}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if probe_interval < 1:
            raise ValueError(f"probe_interval must be >= 1, got {probe_interval}")
        self.cost = cost
        self.time = RoundTimeModel(cost, max_k=max_k)
        self.max_k = max_k
        self.min_k = min_k
        self.uses_ngram = ngram and min_k == 0
        self.probe_interval = probe_interval
        self._acceptance: dict[Any, PositionAcceptance] = {}
        self._prior = (initial_acceptance, prior_weight, decay)
        self._idle = {DRAFT: 0, NGRAM: 0}
        self._interval = {DRAFT: probe_interval, NGRAM: probe_interval}
        self._match = 0  # the matched suffix length of the last plan

    def _rates(self, proposer: str, match: int = 0) -> PositionAcceptance:
        key = (proposer, match)
        if key not in self._acceptance:
            self._acceptance[key] = PositionAcceptance(*self._prior)
        return self._acceptance[key]

    @property
    def acceptance(self) -> float:
        """The draft model's current estimate for its first position."""
        return self._rates(DRAFT).rates(1)[0]

    def _best(
        self, proposer: str, rates: list[float], low: int, waste: float = 0.0
    ) -> tuple[float, int]:
        """Best (tokens per cost, K) for ``proposer`` among ``K`` in ``[low, len(rates)]``,
        each round costing ``waste`` seconds more."""
        best = (-1.0, low)
        tokens = reach = 1.0
        for k in range(1, len(rates) + 1):
            reach *= rates[k - 1]
            tokens += reach  # expected_tokens(rates, k)
            if k >= low:
                value = tokens / (self.time.seconds(k, proposer) + waste)
                if value > best[0]:
                    best = (value, k)
        return best

    def plan(
        self, ngram: NgramProposal = NO_PROPOSAL, *, started: bool = False
    ) -> Plan:
        # A plain step already running is thrown away by any other choice.
        waste = self.time.seconds(0, NONE) if started else 0.0
        draft_value, draft_k = self._best(
            DRAFT, self._rates(DRAFT).rates(self.max_k), max(1, self.min_k), waste
        )
        choices = [(draft_value, Plan(DRAFT, draft_k))]
        if self.min_k == 0:
            choices.append((1.0 / self.time.seconds(0, NONE), Plan(NONE, 0)))
        available = {DRAFT: True, NGRAM: self.uses_ngram and len(ngram.tokens) > 0}
        if available[NGRAM]:
            # A matched length seldom seen borrows from prompt lookup as a whole.
            overall = self._rates(NGRAM).rates(1)[0]
            rates = self._rates(NGRAM, ngram.match).rates(
                min(len(ngram.tokens), self.max_k), overall
            )
            value, k = self._best(NGRAM, rates, 1, waste)
            choices.append((value, Plan(NGRAM, k)))
        chosen = max(choices, key=lambda c: c[0])[1]
        for proposer in PROPOSERS:
            if chosen.proposer == proposer:
                self._idle[proposer] = 0
                self._interval[proposer] = self.probe_interval
            elif available[proposer]:
                self._idle[proposer] += 1
        for proposer in PROPOSERS:
            if available[proposer] and self._idle[proposer] >= self._interval[proposer]:
                # A probe; the next one comes later unless what it taught (its
                # acceptance, its cost) gets the proposer chosen.
                self._idle[proposer] = 0
                self._interval[proposer] = min(
                    2 * self._interval[proposer], self.MAX_PROBE_INTERVAL
                )
                chosen = Plan(proposer, 1)
                break
        self._match = ngram.match
        return chosen

    def expects_plain_step(self, matches: Sequence[int] = ()) -> bool:
        """Whether the next :meth:`plan`, with a plain step ``started``, is a plain
        step whatever prompt lookup proposes: no probe is due, and neither the draft
        model nor prompt lookup, with the rates of any matched length in
        ``matches``, beats a plain step once the started one it throws away counts.

        Args:
            matches (Sequence[int]): The suffix lengths prompt lookup may match.
              Default: ``()`` (no lookup).
        """
        if self.min_k > 0:
            return False
        lookup = self.uses_ngram and len(matches) > 0
        for proposer in PROPOSERS:
            if self._idle[proposer] + 1 >= self._interval[proposer] and (
                proposer == DRAFT or lookup
            ):
                return False
        waste = self.time.seconds(0, NONE)
        plain = 1.0 / waste
        if (
            self._best(DRAFT, self._rates(DRAFT).rates(self.max_k), 1, waste)[0]
            >= plain
        ):
            return False
        if not lookup:
            return True
        overall = self._rates(NGRAM).rates(1)[0]
        for match in matches:
            seen = self._acceptance.get((NGRAM, match))
            # A matched length not seen yet has prompt lookup's overall rate everywhere.
            rates = (
                seen.rates(self.max_k, overall)
                if seen is not None
                else [overall] * self.max_k
            )
            if self._best(NGRAM, rates, 1, waste)[0] >= plain:
                return False
        return True

    def update(self, plan: Plan, accepted: int, seconds: float | None = None) -> None:
        if seconds is not None:
            self.time.observe(plan.k, plan.proposer, seconds)
        if plan.proposer == DRAFT:
            self._rates(DRAFT).update(plan.k, accepted)
        elif plan.proposer == NGRAM:
            self._rates(NGRAM).update(plan.k, accepted)
            self._rates(NGRAM, self._match).update(plan.k, accepted)


def measure_round_cost(
    target: Any, draft: Any, *, max_k: int = 8, context: int = 32, repeats: int = 8
) -> RoundCost:
    """Time the two models on this machine to fill in a :class:`RoundCost`.

    Times decode steps of each model, the target's pass over ``k + 1`` tokens
    for every ``k`` up to ``max_k`` and a run of ``PLAIN_RUN`` overlapped target
    steps, on a short random context, taking the fastest of ``repeats`` runs of
    each (interleaved, so a slow spell of a shared machine lands on all of them),
    about ``(max_k + 2 + PLAIN_RUN) * repeats`` forward passes after warm-up.

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
    prompt = mx.random.randint(0, vocab, (1, context), key=mx.random.key(0)).astype(
        mx.uint32
    )
    runs = [(draft, 1)] + [(target, k + 1) for k in range(max_k + 1)]
    caches = {id(m): make_prompt_cache(m) for m in (target, draft)}
    for m in (target, draft):
        mx.eval(m(prompt, cache=caches[id(m)]))
    best = [float("inf")] * len(runs)
    plain = float("inf")
    for r in range(repeats + 2):  # the first two warm up
        for i, (model, n) in enumerate(runs):
            cache = caches[id(model)]
            tokens = mx.repeat(prompt[:, -1:], n, axis=1)
            start = time.perf_counter()
            mx.eval(model(tokens, cache=cache))
            elapsed = time.perf_counter() - start
            trim_prompt_cache(cache, n)
            if r >= 2:
                best[i] = min(best[i], elapsed)
        cache = caches[id(target)]
        elapsed = _overlapped_steps(target, cache, prompt[:, -1:], PLAIN_RUN)
        trim_prompt_cache(cache, PLAIN_RUN)
        if r >= 2:
            plain = min(plain, elapsed / PLAIN_RUN)
    step = best[1]
    verify = [1.0]
    for s in best[2:]:
        # A longer pass never costs less than a shorter one.
        verify.append(max(verify[-1], s / step))
    return RoundCost(
        draft_step=best[0] / step,
        verify_extra=(verify[-1] - 1.0) / max_k,
        target_step_s=step,
        verify=tuple(verify),
        plain_step=plain / step,
    )


PLAIN_RUN = 8
"""Overlapped target steps timed together by :func:`measure_round_cost`."""


def _overlapped_steps(model: Any, cache: list[Any], first: mx.array, n: int) -> float:
    """Seconds of ``n`` greedy decode steps from ``first [1, 1]``, each built and
    started before the one before it is read, as mlx-lm's ``generate_step`` runs."""
    start = time.perf_counter()
    y = mx.argmax(model(first, cache=cache)[:, -1], axis=-1)
    mx.async_eval(y)
    for _ in range(n - 1):
        following = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(following)
        y.item()
        y = following
    y.item()
    return time.perf_counter() - start

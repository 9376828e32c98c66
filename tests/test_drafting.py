"""Draft policies: Leviathan's expected tokens, cost-aware choice of proposer and K,
per-position acceptance, probes, cost measurement."""

from __future__ import annotations

import random

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import pytest
from helpers import make_tiny_llama

from speclora.drafting import (
    DRAFT,
    NGRAM,
    NONE,
    AdaptiveDraftLength,
    FixedDraftLength,
    Plan,
    PositionAcceptance,
    RoundCost,
    RoundTimeModel,
    expected_tokens,
    measure_round_cost,
)
from speclora.ngram import NO_PROPOSAL, NgramProposal


def test_expected_tokens_matches_the_geometric_series():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_expected_tokens_with_per_position_rates():
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(expected_tokens(0.5, 3))
    assert expected_tokens([0.8, 0.5, 0.0, 1.0], 4) == pytest.approx(1 + 0.8 + 0.4)


def test_speedup_bound_is_leviathans_formula():
    cost = RoundCost(draft_step=0.1)
    a, k = 0.7, 4
    assert cost.speedup_bound(a, k) == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (k * 0.1 + 1)))


def test_round_cost_uses_the_measured_verify_table_and_prices_lookup_at_zero():
    cost = RoundCost(draft_step=0.1, verify_extra=0.05, verify=(1.0, 1.3, 1.4))
    assert cost.of(0) == 1.0
    assert cost.of(2) == pytest.approx(1.4 + 0.2)
    assert cost.of(2, NGRAM) == pytest.approx(1.4)
    assert cost.of(4, NGRAM) == pytest.approx(1.4 + 2 * 0.05)  # linear past the table


def test_fixed_policy_never_changes():
    policy = FixedDraftLength(3)
    policy.update(Plan(DRAFT, 3), 0)
    assert policy.plan(NgramProposal([1, 2, 3, 4], 2)) == Plan(DRAFT, 3)
    assert FixedDraftLength(0).plan() == Plan(NONE, 0)


def test_position_rates_shrink_toward_the_previous_position():
    rates = PositionAcceptance(prior=0.5, prior_weight=1.0, decay=1.0)
    for _ in range(99):
        rates.update(4, 1)  # position 0 always accepted, position 1 always rejected
    r = rates.rates(4)
    assert r[0] == pytest.approx(99.5 / 100)
    assert r[1] == pytest.approx(r[0] / 100)
    # Never judged: the rate of the position before.
    assert r[2] == r[1] and r[3] == r[2]


def _run(policy: AdaptiveDraftLength, accept: dict[str, float], rounds: int, ngram=NO_PROPOSAL) -> list[Plan]:
    """Feed ``policy`` rounds in which each proposer's drafts are accepted at the
    given rate per position (deterministically: a run of round(rate * k))."""
    plans = []
    for _ in range(rounds):
        plan = policy.plan(ngram)
        if plan.proposer != NONE:
            accepted = 0
            # Position i accepted while the running product stays above 1/2.
            reach = 1.0
            for _ in range(plan.k):
                reach *= accept[plan.proposer]
                if reach < 0.5:
                    break
                accepted += 1
            policy.update(plan, accepted)
        plans.append(plan)
    return plans


def test_a_useless_draft_is_dropped_for_plain_target_steps():
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.1, verify_extra=0.05), max_k=8)
    plans = _run(policy, {DRAFT: 0.0}, 200)
    tail = plans[100:]
    plain = sum(p.proposer == NONE for p in tail)
    # Only probes of one token remain, at intervals that have grown.
    assert plain >= 95
    assert all(p == Plan(DRAFT, 1) for p in tail if p.proposer != NONE)


def test_a_good_draft_drafts_long():
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.05, verify_extra=0.02), max_k=8)
    plans = _run(policy, {DRAFT: 1.0}, 60)
    assert plans[-1] == Plan(DRAFT, 8)


def test_detailed_mode_policy_always_drafts():
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.5, verify_extra=0.2), max_k=8, min_k=1, ngram=True)
    assert not policy.uses_ngram
    plans = _run(policy, {DRAFT: 0.0}, 50, NgramProposal([1, 2, 3], 2))
    assert all(p.proposer == DRAFT and p.k >= 1 for p in plans)


def test_accurate_lookup_wins_over_the_draft_model():
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.15, verify_extra=0.05), max_k=8, ngram=True)
    proposal = NgramProposal([5] * 8, 3)
    plans = _run(policy, {DRAFT: 0.5, NGRAM: 1.0}, 60, proposal)
    assert plans[-1] == Plan(NGRAM, 8)
    # Without a proposal the draft model is back.
    assert policy.plan(NO_PROPOSAL).proposer == DRAFT


def test_the_expected_rate_picks_the_best_k():
    a = 0.6
    cost = RoundCost(draft_step=0.4)
    policy = AdaptiveDraftLength(cost, initial_acceptance=a, prior_weight=1e9)
    bounds = {k: cost.speedup_bound(a, k) for k in range(1, 9)}
    best = max(bounds, key=bounds.__getitem__)
    assert bounds[best] > 1.0
    assert policy.plan() == Plan(DRAFT, best)
    # Dearer drafting: fewer tokens, or none at all.
    dear = AdaptiveDraftLength(RoundCost(draft_step=0.9), initial_acceptance=a, prior_weight=1e9)
    assert dear.plan() == Plan(NONE, 0)


def test_probes_notice_a_draft_that_became_good():
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.1, verify_extra=0.05), max_k=8)
    _run(policy, {DRAFT: 0.0}, 300)
    plans = _run(policy, {DRAFT: 1.0}, 600)
    assert plans[-1].proposer == DRAFT and plans[-1].k >= 4


def test_round_time_model_starts_from_the_isolated_measurement():
    cost = RoundCost(draft_step=0.2, verify_extra=0.05, target_step_s=0.004, verify=(1.0, 1.3, 1.35, 1.4, 1.45))
    model = RoundTimeModel(cost, max_k=4)
    for k in (0, 1, 4):
        assert model.seconds(k, NGRAM) == pytest.approx(cost.of(k, NGRAM) * 0.004)
        assert model.seconds(k, DRAFT) == pytest.approx(cost.of(k, DRAFT) * 0.004)


def test_round_time_model_learns_the_rounds_own_costs():
    # Isolated: a multi-token pass looks 40% dearer than one token; in the loop it is 10%.
    model = RoundTimeModel(RoundCost(draft_step=0.2, verify_extra=0.1, target_step_s=1.0), max_k=8)

    def truth(k: int, proposer: str) -> float:
        return 2.0 + 0.15 * (k >= 1) + 0.02 * k + (0.3 * k if proposer == DRAFT else 0.0)

    for i in range(400):
        k, proposer = i % 5, (DRAFT, NGRAM)[i % 2]
        model.observe(k, proposer, truth(k, proposer))
    for k in range(6):
        for proposer in (DRAFT, NGRAM):
            # Within what the pull toward the isolated measurement leaves.
            assert model.seconds(k, proposer) == pytest.approx(truth(k, proposer), rel=0.05)


def test_round_time_model_keeps_a_stray_round_from_moving_it_far():
    model = RoundTimeModel(RoundCost(draft_step=0.2, target_step_s=1.0), max_k=8)
    before = model.seconds(0, NONE)
    model.observe(0, NONE, 1000.0)
    assert model.seconds(0, NONE) < 3 * before


def test_rounds_that_show_verification_is_cheap_bring_speculation_back():
    # Isolated, verifying looked so dear that speculation would never pay.
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.1, verify_extra=0.6, target_step_s=1.0), max_k=8)
    assert policy.plan() == Plan(NONE, 0)
    rng = random.Random(0)
    for _ in range(600):
        plan = policy.plan()
        accepted = 0  # each draft survives with probability 1/2
        while accepted < plan.k and rng.random() < 0.5:
            accepted += 1
        # In the loop a round costs 1 + 0.05 per verified token + 0.1 per draft step.
        policy.update(plan, accepted, seconds=1.0 + 0.15 * plan.k)
    assert policy.plan().proposer == DRAFT


def test_adaptive_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_k"):
        AdaptiveDraftLength(RoundCost(0.1), max_k=0)
    with pytest.raises(ValueError, match="min_k"):
        AdaptiveDraftLength(RoundCost(0.1), max_k=4, min_k=5)
    with pytest.raises(ValueError, match="decay"):
        AdaptiveDraftLength(RoundCost(0.1), decay=1.5)
    with pytest.raises(ValueError, match="probe_interval"):
        AdaptiveDraftLength(RoundCost(0.1), probe_interval=0)


def test_measured_cost_ranks_a_small_draft_below_the_target():
    target = make_tiny_llama(128, 4, seed=1)
    draft = make_tiny_llama(16, 1, seed=2)
    cost = measure_round_cost(target, draft, max_k=4, repeats=4)
    assert 0.0 < cost.draft_step < 1.0
    assert cost.verify_extra >= 0.0 and cost.target_step_s > 0.0
    assert len(cost.verify) == 5 and cost.verify[0] == 1.0
    assert all(a <= b for a, b in zip(cost.verify, cost.verify[1:]))

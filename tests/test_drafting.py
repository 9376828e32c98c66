"""Draft-length policies: Leviathan's expected tokens, adaptive K, cost measurement."""

from __future__ import annotations

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import pytest
from helpers import make_tiny_llama

from speclora.drafting import AdaptiveDraftLength, FixedDraftLength, RoundCost, expected_tokens, measure_round_cost


def test_expected_tokens_matches_the_geometric_series():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_speedup_bound_is_leviathans_formula():
    cost = RoundCost(draft_step=0.1)
    a, k = 0.7, 4
    assert cost.speedup_bound(a, k) == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (k * 0.1 + 1)))


def test_fixed_policy_never_changes():
    policy = FixedDraftLength(3)
    policy.update(3, 0)
    assert policy.next_k() == 3


def test_adaptive_policy_follows_acceptance():
    cheap = RoundCost(draft_step=0.05)
    high = AdaptiveDraftLength(cheap, max_k=8, initial_acceptance=0.5)
    low = AdaptiveDraftLength(cheap, max_k=8, initial_acceptance=0.5)
    for _ in range(60):
        high.update(high.next_k(), high.next_k())  # everything accepted
        low.update(low.next_k(), 0)  # first draft rejected every round
    assert high.acceptance > 0.9 and low.acceptance < 0.1
    assert high.next_k() == 8
    assert low.next_k() == 1


def test_adaptive_policy_drafts_less_when_drafting_is_expensive():
    a = 0.6
    cheap = AdaptiveDraftLength(RoundCost(draft_step=0.02), initial_acceptance=a, prior_weight=1e6)
    dear = AdaptiveDraftLength(RoundCost(draft_step=0.4), initial_acceptance=a, prior_weight=1e6)
    assert dear.next_k() < cheap.next_k()
    # The choice is the argmax of the bound.
    bounds = {k: RoundCost(draft_step=0.4).speedup_bound(a, k) for k in range(1, 9)}
    assert dear.next_k() == max(bounds, key=bounds.__getitem__)


def test_adaptive_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_k"):
        AdaptiveDraftLength(RoundCost(0.1), max_k=0)
    with pytest.raises(ValueError, match="decay"):
        AdaptiveDraftLength(RoundCost(0.1), decay=1.5)


def test_measured_cost_ranks_a_small_draft_below_the_target():
    target = make_tiny_llama(128, 4, seed=1)
    draft = make_tiny_llama(16, 1, seed=2)
    cost = measure_round_cost(target, draft, max_k=4, repeats=4)
    assert 0.0 < cost.draft_step < 1.0
    assert cost.verify_extra >= 0.0 and cost.target_step_s > 0.0

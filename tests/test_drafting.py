"""Draft policies: Leviathan's expected tokens, cost-aware choice of proposer and K,
per-position acceptance, probes, cost measurement; plain target steps started ahead
by the decode loop on the policy's forecast."""

from __future__ import annotations

import random
import time

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
from helpers import make_tiny_llama
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from speclora.cache import make_speculative_cache
from speclora.decoding import LoopOptions, speculative_rounds
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
from speclora.sampling import SamplingParams, make_logits_filter


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
    assert cost.speedup_bound(a, k) == pytest.approx(
        (1 - a ** (k + 1)) / ((1 - a) * (k * 0.1 + 1))
    )


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


def _run(
    policy: AdaptiveDraftLength,
    accept: dict[str, float],
    rounds: int,
    ngram=NO_PROPOSAL,
) -> list[Plan]:
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
    policy = AdaptiveDraftLength(
        RoundCost(draft_step=0.5, verify_extra=0.2), max_k=8, min_k=1, ngram=True
    )
    assert not policy.uses_ngram
    plans = _run(policy, {DRAFT: 0.0}, 50, NgramProposal([1, 2, 3], 2))
    assert all(p.proposer == DRAFT and p.k >= 1 for p in plans)


def test_accurate_lookup_wins_over_the_draft_model():
    policy = AdaptiveDraftLength(
        RoundCost(draft_step=0.15, verify_extra=0.05), max_k=8, ngram=True
    )
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
    dear = AdaptiveDraftLength(
        RoundCost(draft_step=0.9), initial_acceptance=a, prior_weight=1e9
    )
    assert dear.plan() == Plan(NONE, 0)


def test_probes_notice_a_draft_that_became_good():
    policy = AdaptiveDraftLength(RoundCost(draft_step=0.1, verify_extra=0.05), max_k=8)
    _run(policy, {DRAFT: 0.0}, 300)
    plans = _run(policy, {DRAFT: 1.0}, 600)
    assert plans[-1].proposer == DRAFT and plans[-1].k >= 4


def test_round_time_model_starts_from_the_isolated_measurement():
    cost = RoundCost(
        draft_step=0.2,
        verify_extra=0.05,
        target_step_s=0.004,
        verify=(1.0, 1.3, 1.35, 1.4, 1.45),
    )
    model = RoundTimeModel(cost, max_k=4)
    for k in (0, 1, 4):
        assert model.seconds(k, NGRAM) == pytest.approx(cost.of(k, NGRAM) * 0.004)
        assert model.seconds(k, DRAFT) == pytest.approx(cost.of(k, DRAFT) * 0.004)


def test_round_time_model_learns_the_rounds_own_costs():
    # Isolated: a multi-token pass looks 40% dearer than one token; in the loop it is 10%.
    model = RoundTimeModel(
        RoundCost(draft_step=0.2, verify_extra=0.1, target_step_s=1.0), max_k=8
    )

    def truth(k: int, proposer: str) -> float:
        return (
            2.0 + 0.15 * (k >= 1) + 0.02 * k + (0.3 * k if proposer == DRAFT else 0.0)
        )

    for i in range(400):
        k, proposer = i % 5, (DRAFT, NGRAM)[i % 2]
        model.observe(k, proposer, truth(k, proposer))
    for k in range(6):
        for proposer in (DRAFT, NGRAM):
            # Within what the pull toward the isolated measurement leaves.
            assert model.seconds(k, proposer) == pytest.approx(
                truth(k, proposer), rel=0.05
            )


def test_round_time_model_keeps_a_stray_round_from_moving_it_far():
    model = RoundTimeModel(RoundCost(draft_step=0.2, target_step_s=1.0), max_k=8)
    before = model.seconds(0, NONE)
    model.observe(0, NONE, 1000.0)
    assert model.seconds(0, NONE) < 3 * before


def test_rounds_that_show_verification_is_cheap_bring_speculation_back():
    # Isolated, verifying looked so dear that speculation would never pay.
    policy = AdaptiveDraftLength(
        RoundCost(draft_step=0.1, verify_extra=0.6, target_step_s=1.0), max_k=8
    )
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


def test_the_forecast_of_a_plain_step_is_never_wrong_about_the_next_plan():
    """Asked before each plan, with prompt lookup's proposals of every matched length
    and a draft model whose value comes and goes: whenever the policy forecasts a
    plain step, the plan is one, and it does forecast most plain steps of a run."""
    rng = random.Random(0)
    policy = AdaptiveDraftLength(
        RoundCost(draft_step=0.2, verify_extra=0.1, target_step_s=1.0), ngram=True
    )
    forecast_plain = actual_plain = 0
    for i in range(2000):
        draft_rate, lookup_rate = (0.05, 0.05) if (i // 300) % 2 == 0 else (0.9, 0.05)
        proposal = (
            NgramProposal([1] * rng.randint(1, 8), rng.randint(1, 4))
            if rng.random() < 0.8
            else NO_PROPOSAL
        )
        forecast = policy.expects_plain_step(range(1, 5))
        plan = policy.plan(proposal, started=forecast)
        assert not forecast or plan == Plan(NONE, 0)
        forecast_plain += forecast
        actual_plain += plan.proposer == NONE
        rate = draft_rate if plan.proposer == DRAFT else lookup_rate
        accepted = 0
        while accepted < plan.k and rng.random() < rate:
            accepted += 1
        policy.update(
            plan,
            accepted,
            seconds=1.0
            + 0.1 * plan.k
            + (0.2 * plan.k if plan.proposer == DRAFT else 0.0),
        )
    assert actual_plain > 500 and forecast_plain > 0.8 * actual_plain


def test_no_plain_step_is_forecast_for_a_policy_that_always_drafts():
    assert not AdaptiveDraftLength(
        RoundCost(draft_step=5.0), min_k=1
    ).expects_plain_step()
    assert not FixedDraftLength(2).expects_plain_step()
    assert FixedDraftLength(0).expects_plain_step()


# -- plain steps started ahead by the decode loop ---------------------------------------

VOCAB = 97


# Untied embeddings: tied ones make tiny random models echo their input.
@pytest.fixture(scope="module")
def target():
    return make_tiny_llama(64, 2, vocab_size=VOCAB, seed=1, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def draft():
    return make_tiny_llama(32, 1, vocab_size=VOCAB, seed=2, tie_word_embeddings=False)


class Scripted:
    """Plans from a script, then plain steps; always forecasts a plain step, so the
    loop starts steps ahead that a proposing round must throw away."""

    uses_ngram = False

    def __init__(self, script: list[Plan]) -> None:
        self.script = list(script)
        self.forecasts = 0

    def plan(self, ngram: NgramProposal, *, started: bool = False) -> Plan:
        return self.script.pop(0) if self.script else Plan(NONE, 0)

    def expects_plain_step(self, matches) -> bool:
        self.forecasts += 1
        return True

    def update(self, plan: Plan, accepted: int, seconds: float | None = None) -> None:
        return None


def decode(
    target, draft, prompt, max_tokens, policy, *, overlap=True, cache=None, **options
):
    """Tokens, rounds and the target's caches of one run of the decode loop."""
    cache = make_speculative_cache(target) if cache is None else cache
    rounds = list(
        speculative_rounds(
            target,
            draft,
            prompt,
            max_tokens=max_tokens,
            policy=policy,
            options=LoopOptions(overlap_plain_steps=overlap, **options),
            target_cache=cache,
        )
    )
    return [t for r in rounds for t in r.tokens], rounds, cache


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    return [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt, mx.uint32), model, max_tokens=max_tokens
        )
    ]


def offsets(cache) -> list[int]:
    return [c.offset for c in cache]


PROMPTS = [[5, 17, 3], [40, 2, 2, 9, 61, 7], [88]]


def test_plain_runs_with_wrong_forecasts_stay_the_targets_greedy_output(target, draft):
    """Plain runs broken by draft and lookup-free rounds the forecast did not see
    coming: every step started ahead in vain is dropped from the cache."""
    script = (
        [Plan(NONE, 0)] * 3
        + [Plan(DRAFT, 2), Plan(NONE, 0), Plan(DRAFT, 3)]
        + [Plan(NONE, 0)] * 4
        + [Plan(DRAFT, 1)]
    )
    for prompt in PROMPTS:
        policy = Scripted(script)
        tokens, _, cache = decode(target, draft, prompt, 24, policy)
        assert tokens == greedy_reference(target, prompt, 24)
        assert policy.forecasts > 0
        _, _, alone = decode(target, draft, prompt, 24, Scripted(script), overlap=False)
        assert offsets(cache) == offsets(alone)


def test_a_step_started_past_a_stop_token_leaves_no_trace(target, draft):
    """The step after a stop token was started before the stop was read: it is not
    emitted, the caches end where they would without it, and generation resumed
    from them continues as without it."""
    prompt = PROMPTS[1]
    reference = greedy_reference(target, prompt, 30)
    stop_at = next(i for i in range(3, 30) if reference[i] not in reference[:i])
    stop = frozenset({reference[stop_at]})
    tokens, rounds, cache = decode(
        target, draft, prompt, 30, FixedDraftLength(0), stop_tokens=stop
    )
    assert tokens == reference[:stop_at] and rounds[-1].stopped
    assert offsets(cache) == [len(prompt) + stop_at] * len(cache)
    # Resumed from the stop token on the same caches: the target's own continuation.
    more, _, _ = decode(
        target, draft, [reference[stop_at]], 6, FixedDraftLength(0), cache=cache
    )
    assert more == reference[stop_at + 1 : stop_at + 7]


def test_no_step_is_started_past_max_tokens(target, draft):
    """Nothing is computed past the last token: the caches end where they would
    without overlap, and no random number is drawn for a step nobody reads."""
    for prompt in PROMPTS:
        tokens, _, cache = decode(target, draft, prompt, 9, FixedDraftLength(0))
        assert tokens == greedy_reference(target, prompt, 9)
        assert offsets(cache) == [len(prompt) - 1 + 9] * len(cache)
    states = []
    for overlap in (True, False):
        mx.random.seed(5)
        decode(
            target,
            draft,
            PROMPTS[0],
            9,
            FixedDraftLength(0),
            overlap=overlap,
            sampling=SamplingParams(1.0),
        )
        states.append(mx.random.state[0].tolist())
    assert states[0] == states[1]


def test_closing_the_loop_early_drops_the_step_started_ahead(target, draft):
    prompt = PROMPTS[0]
    cache = make_speculative_cache(target)
    rounds = speculative_rounds(
        target,
        draft,
        prompt,
        max_tokens=20,
        policy=FixedDraftLength(0),
        options=LoopOptions(),
        target_cache=cache,
    )
    taken = [next(rounds).tokens[0] for _ in range(4)]
    rounds.close()
    assert offsets(cache) == [len(prompt) - 1 + 4] * len(cache)
    more, _, _ = decode(target, draft, taken[-1:], 5, FixedDraftLength(0), cache=cache)
    assert taken + more == greedy_reference(target, prompt, 9)


@pytest.mark.parametrize(
    "options",
    [
        {"sampling": SamplingParams(temperature=1.0)},
        {
            "sampling": SamplingParams(temperature=0.8, top_p=0.9),
            "logits_filter": "top_p",
        },
        {"sampler": "mlx-lm", "logits_processors": "repetition"},
    ],
    ids=["T=1", "T=0.8,top_p=0.9", "mlx-lm sampler+repetition penalty"],
)
def test_plain_steps_started_ahead_draw_what_steps_one_by_one_draw(
    target, draft, options
):
    """Same seed, same tokens: a step started ahead draws its random numbers in the
    order the loop without overlap draws them, and processors see the unread token."""
    options = dict(options)
    if options.get("logits_filter") == "top_p":
        options["logits_filter"] = make_logits_filter(options["sampling"], VOCAB)
    if options.get("sampler") == "mlx-lm":
        options["sampler"] = make_sampler(temp=0.8)
        options["logits_processors"] = make_logits_processors(repetition_penalty=1.5)
    for seed, prompt in enumerate(PROMPTS):
        runs = []
        for overlap in (True, False):
            mx.random.seed(seed)
            runs.append(
                decode(
                    target,
                    draft,
                    prompt,
                    24,
                    FixedDraftLength(0),
                    overlap=overlap,
                    **options,
                )[0]
            )
        assert runs[0] == runs[1]


def test_plain_steps_started_ahead_through_a_sliding_window(target, draft):
    from mlx_lm.models.cache import RotatingKVCache

    window = 16
    for prompt in PROMPTS:
        caches = [RotatingKVCache(max_size=window, keep=4) for _ in target.layers]
        steps = generate_step(
            mx.array(prompt, mx.uint32),
            target,
            max_tokens=3 * window,
            prompt_cache=caches,
        )
        script = ([Plan(NONE, 0)] * 5 + [Plan(DRAFT, 2)]) * 6
        cache = make_speculative_cache(target, max_kv_size=window)
        tokens, _, _ = decode(
            target,
            draft,
            prompt,
            3 * window,
            Scripted(script),
            cache=cache,
            max_kv_size=window,
        )
        assert tokens == [int(t) for t, _ in steps]


@pytest.mark.parametrize("name", ["mamba", "recurrent_gemma"])
def test_plain_steps_started_ahead_with_recurrent_layers(name):
    """A step started in vain on a recurrent model: its state is restored, not trimmed."""
    from test_architectures import MAX_TOKENS, pair, prompt_tokens, reference

    target, draft = pair(name)
    script = ([Plan(NONE, 0)] * 3 + [Plan(DRAFT, 2)]) * MAX_TOKENS
    tokens, _, _ = decode(target, draft, prompt_tokens(), MAX_TOKENS, Scripted(script))
    assert tokens == reference(name, None)


def test_the_policy_is_told_the_whole_cycle_of_each_round(target, draft):
    """Round times given to the policy run from one round's outcome to the next, so
    they include what the host does in between (here a slow consumer), which a plain
    step started ahead hides and a proposing round does not."""
    told: list[float | None] = []

    class Timed(Scripted):
        def update(
            self, plan: Plan, accepted: int, seconds: float | None = None
        ) -> None:
            told.append(seconds)

    pause = 0.02
    policy = Timed([Plan(NONE, 0), Plan(DRAFT, 2), Plan(NONE, 0)])
    for _ in speculative_rounds(
        target, draft, PROMPTS[1], max_tokens=8, policy=policy, options=LoopOptions()
    ):
        time.sleep(pause)
    assert len(told) >= 5 and all(s is not None and s >= pause for s in told[1:])


def test_proposing_rounds_say_nothing_about_a_plain_step():
    """Runs of plain steps overlap and proposing rounds do not: dear proposing rounds
    leave the plain step at what runs of plain steps showed (here, the measurement)."""
    model = RoundTimeModel(
        RoundCost(draft_step=0.2, target_step_s=1.0, plain_step=0.8), max_k=8
    )
    assert model.seconds(0, NONE) == pytest.approx(0.8)
    for i in range(200):
        k = 1 + i % 4
        model.observe(k, (DRAFT, NGRAM)[i % 2], 2.0 + 0.1 * k)
    assert model.seconds(0, NONE) == pytest.approx(0.8)
    assert model.seconds(2, NGRAM) == pytest.approx(2.2, rel=0.05)
    for _ in range(200):
        model.observe(0, NONE, 0.6)
    assert model.seconds(0, NONE) == pytest.approx(0.6, rel=0.05)


def test_measured_cost_includes_overlapped_plain_steps():
    cost = measure_round_cost(
        make_tiny_llama(64, 2, seed=1),
        make_tiny_llama(16, 1, seed=2),
        max_k=2,
        repeats=2,
    )
    assert cost.plain_step > 0.0

"""Prompt lookup: the proposer itself, and decoding with it -- the target's greedy
tokens exactly (against mlx-lm's generate_step), the target's distribution at T > 0,
statistics per proposer, and the per-phase profile."""

from __future__ import annotations

import random
from collections import Counter

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

import mlx.core as mx
import pytest
from helpers import make_tiny_llama
from mlx_lm.generate import generate_step
from stats_helpers import chi_square_pvalue

from speclora.decoding import PHASES, LoopOptions, speculative_rounds
from speclora.drafting import DRAFT, NGRAM, NONE, Plan, RoundCost
from speclora.ngram import NO_PROPOSAL, NgramProposal, NgramProposer
from speclora.sampling import SamplingParams
from speclora.speculative import SpeculativeDecoder
from speclora.speculative_manual import ManualSpeculativeDecoder

VOCAB = 97


# -- the proposer -------------------------------------------------------------------


def test_the_longest_suffix_matches_its_latest_occurrence():
    lookup = NgramProposer([1, 2, 3, 9, 2, 3, 7, 5, 2, 3], min_n=1, max_n=3)
    # "2 3" occurred twice before; the latest one was followed by 7 5.
    assert lookup.propose(2) == NgramProposal([7, 5], 2)
    lookup.extend([7])
    # "3 7" and "2 3 7" occurred once, followed by 5 2 3 7 ...
    assert lookup.propose(3) == NgramProposal([5, 2, 3], 3)


def test_no_match_no_proposal():
    assert NgramProposer([1, 2, 3, 4]).propose(4) == NO_PROPOSAL
    assert NgramProposer([1, 2, 1], min_n=2).propose(4) == NO_PROPOSAL
    assert NgramProposer([5, 5]).propose(0) == NO_PROPOSAL
    assert NgramProposer([]).propose(3) == NO_PROPOSAL


def test_a_loop_is_continued_with_its_period():
    # "a b c a b": the suffix "a b" last began 3 tokens back, so the copy runs
    # c a b c a ... into tokens not yet generated.
    lookup = NgramProposer([1, 2, 3, 1, 2], max_n=2)
    assert lookup.propose(7) == NgramProposal([3, 1, 2, 3, 1, 2, 3], 2)
    assert NgramProposer([4, 4, 4]).propose(3) == NgramProposal([4, 4, 4], 2)


def test_growing_the_history_equals_building_it_at_once():
    rng = random.Random(0)
    tokens = [rng.randrange(5) for _ in range(300)]
    grown = NgramProposer(tokens[:7], min_n=1, max_n=4)
    for i in range(7, len(tokens)):
        whole = NgramProposer(tokens[:i], min_n=1, max_n=4)
        assert grown.propose(5) == whole.propose(5)
        grown.extend([tokens[i]])


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer([], min_n=0)
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer([], min_n=3, max_n=2)


# -- decoding with it ------------------------------------------------------------------


PLAIN = Plan(NONE, 0)


class ListTokenizer:
    """Just enough of mlx-lm's TokenizerWrapper for decoders given token ids."""

    eos_token_ids: set[int] = set()
    bos_token = None
    has_chat_template = False

    def decode(self, tokens: list[int]) -> str:
        return " ".join(map(str, tokens))


class LookupFirst:
    """Prompt lookup whenever it has a proposal (all of it), else ``fallback``."""

    uses_ngram = True

    def __init__(self, fallback: Plan = PLAIN) -> None:
        self.fallback = fallback

    def plan(self, ngram: NgramProposal) -> Plan:
        return Plan(NGRAM, len(ngram.tokens)) if ngram.tokens else self.fallback

    def update(self, plan: Plan, accepted: int, seconds: float | None = None) -> None:
        return None


@pytest.fixture(scope="module")
def target():
    return make_tiny_llama(64, 2, vocab_size=VOCAB, seed=1)


@pytest.fixture(scope="module")
def draft():
    return make_tiny_llama(32, 1, vocab_size=VOCAB, seed=2)


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(prompt, mx.uint32), model, max_tokens=max_tokens)]


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a short phrase, so that lookup finds matches at once."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 5))]
        out.append(phrase * rng.randint(2, 4) + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))])
    return out


def run(target, draft, prompt, max_tokens, policy, **options):
    rounds = list(
        speculative_rounds(
            target, draft, prompt, max_tokens=max_tokens, policy=policy, options=LoopOptions(**options)
        )
    )
    return [t for r in rounds for t in r.tokens], rounds


@pytest.mark.parametrize("fallback", [PLAIN, Plan(DRAFT, 2)], ids=["alone", "then-draft"])
def test_greedy_with_lookup_matches_target_alone(target, draft, fallback):
    outcomes = Counter()
    for prompt in repetitive_prompts(12, seed=3):
        tokens, rounds = run(target, draft, prompt, 32, LookupFirst(fallback))
        assert tokens == greedy_reference(target, prompt, 32), prompt
        for r in rounds:
            if r.proposer == NGRAM:
                outcomes["all" if r.accepted == r.drafted else "rejected"] += 1
    assert outcomes["all"] > 0 and outcomes["rejected"] > 0, outcomes


def test_greedy_adaptive_with_lookup_matches_target_alone(target, draft):
    decoder = SpeculativeDecoder(
        target, draft, ListTokenizer(), temperature=0.0, adaptive_draft=True, max_draft_tokens=6,
        round_cost=RoundCost(draft_step=0.2, verify_extra=0.05),
    )
    used = Counter()
    for prompt in repetitive_prompts(10, seed=5):
        result = decoder.generate(prompt, 32)
        assert result.tokens == greedy_reference(target, prompt, 32), prompt
        used.update({name: s.rounds for name, s in result.stats.proposers.items()})
    assert used[NGRAM] > 0, used


def test_stop_token_inside_a_lookup_run(target, draft):
    prompt = [4, 5, 6, 4, 5, 6, 4]
    ref = greedy_reference(target, prompt, 16)
    for stop in set(ref[1:6]):
        expected = ref[: ref.index(stop)]
        tokens, rounds = run(target, draft, prompt, 16, LookupFirst(), stop_tokens=frozenset({stop}))
        assert tokens == expected
        assert rounds[-1].stopped


SMALL_VOCAB = 6


def sequence_distribution(model, prompt: list[int], temperature: float, length: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every continuation of ``length`` tokens under ``model``."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, p in probs.items():
            logits = model(mx.array([prompt + list(seq)], mx.uint32))[0, -1]
            dist = mx.softmax(logits.astype(mx.float32) / temperature).tolist()
            for tok, q in enumerate(dist):
                if q > 0:
                    grown[seq + (tok,)] = p * q
        probs = grown
    return probs


def test_sampling_with_lookup_follows_target_distribution():
    """Chi-square test over three tokens, 20k seeded samples, lookup proposing
    wherever it can (a one-hot draft distribution).

    The significance level 1e-3 is this test's false-failure rate were it unseeded;
    seeded, the outcome is fixed, and a real bias (treating the proposal as if
    drawn from the target, or a residual that keeps the proposal) gives p-values
    many orders of magnitude below it.
    """
    target = make_tiny_llama(16, 1, vocab_size=SMALL_VOCAB, seed=3, tie_word_embeddings=False)
    target.lm_head.weight = target.lm_head.weight * 2.0
    prompt = [1, 2, 1]  # "1" recurs: the first round proposes "2 1 2" by lookup
    expected = sequence_distribution(target, prompt, 1.0, 3)
    mx.random.seed(2024)
    counts: Counter[tuple[int, ...]] = Counter()
    outcomes = Counter()
    for _ in range(20_000):
        tokens, rounds = run(target, target, prompt, 3, LookupFirst(), sampling=SamplingParams(temperature=1.0))
        counts[tuple(tokens)] += 1
        first = rounds[0]
        assert first.proposer == NGRAM
        outcomes["accepted" if first.accepted else "rejected"] += 1
    assert min(outcomes.values()) > 1000, outcomes
    assert chi_square_pvalue(counts, expected) > 1e-3


# -- statistics, detailed mode, profile -------------------------------------------------


def test_stats_split_by_proposer_add_up(target, draft):
    decoder = SpeculativeDecoder(
        target, draft, ListTokenizer(), temperature=0.0, adaptive_draft=True,
        round_cost=RoundCost(draft_step=0.2, verify_extra=0.05),
    )
    result = decoder.generate(repetitive_prompts(1, seed=9)[0], 40)
    s = result.stats
    assert sum(p.rounds for p in s.proposers.values()) == s.num_rounds
    assert sum(p.drafted for p in s.proposers.values()) == s.num_draft_tokens
    assert sum(p.accepted for p in s.proposers.values()) == s.num_accepted_tokens
    assert s.proposers.get(NONE) is None or s.proposers[NONE].drafted == 0


def test_detailed_mode_drafts_with_the_draft_model_only(target, draft):
    decoder = ManualSpeculativeDecoder(
        target, draft, ListTokenizer(), temperature=0.0, adaptive_draft=True,
        round_cost=RoundCost(draft_step=0.9, verify_extra=0.5),  # speculation never pays
    )
    rounds = []
    stream = decoder.stream(repetitive_prompts(1, seed=11)[0], 24)
    while True:
        try:
            rounds.append(next(stream))
        except StopIteration as done:
            result = done.value
            break
    # Every round drafts, but the last, which has room for one token only.
    assert {r.proposer for r in rounds[:-1]} == {DRAFT}
    assert rounds[-1].position == 23
    assert len(result.disagreements) == sum(r.accepted < r.drafted for r in rounds) > 0


def test_recorder_ignores_rounds_of_other_proposers(target, draft):
    from speclora.speculative_manual import DisagreementRecorder

    recorder = DisagreementRecorder(top_k=3, temperature=0.0)
    for r in speculative_rounds(
        target, draft, [7, 8, 7, 8, 7], max_tokens=20, policy=LookupFirst(), options=LoopOptions()
    ):
        recorder(r)
    assert recorder.disagreements == []


def test_profiled_rounds_time_every_phase(target, draft):
    _, rounds = run(target, draft, [3, 4, 3, 4], 12, LookupFirst(Plan(DRAFT, 2)), profile=True)
    for r in rounds:
        assert set(r.timings) == set(PHASES)
        assert all(t >= 0 for t in r.timings.values())
        assert sum(r.timings.values()) == pytest.approx(r.seconds, rel=0.05, abs=1e-4)
    _, quiet = run(target, draft, [3, 4, 3, 4], 12, LookupFirst(Plan(DRAFT, 2)))
    assert all(r.timings == {} for r in quiet)


def test_policy_sees_no_lookup_it_did_not_ask_for(target, draft):
    seen = []

    class Spy:
        uses_ngram = False

        def plan(self, ngram: NgramProposal) -> Plan:
            seen.append(ngram)
            return Plan(DRAFT, 2)

        def update(self, plan: Plan, accepted: int, seconds: float | None = None) -> None:
            return None

    run(target, draft, [1, 1, 1, 1], 8, Spy())
    assert seen and all(p == NO_PROPOSAL for p in seen)

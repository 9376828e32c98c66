"""T > 0 with sampling filters, mlx-lm samplers and logits processors: the output
follows the distribution mlx-lm's own generation samples from.

Expected distributions come from mlx-lm alone, never from this package: mlx-lm's
``generate_step`` computes the target's log-probabilities (its logits processors
applied to the prompt plus the tokens so far), an mlx-lm sampler from
``make_sampler`` applies its filters, and its final categorical draw is intercepted
to read the distribution it would sample from.

Each statistical test draws a seeded sample and runs Pearson's chi-square test at
significance ``ALPHA = 1e-3``: were the seeds random, each test would fail falsely
with probability 1e-3 (about 1% over this module's tests together). Seeded, the
outcomes are fixed. ``test_sample_sizes_reject_the_wrong_distributions`` shows the
sample sizes reject the plausible wrong answers (a filter ignored, filters applied
after the temperature or in another order, processors blind to the draft tokens).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import patch

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from helpers import make_tiny_llama
from mlx_lm import sample_utils
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from stats_helpers import chi_square_pvalue

from speclora import (
    ManualSpeculativeDecoder,
    SpeculativeDecoder,
    speculative_generate_step,
)

ALPHA = 1e-3
SMALL_VOCAB = 6
PROMPT = [1]
Distribution = dict[tuple[int, ...], float]
Processor = Callable[[mx.array, mx.array], mx.array]


class NoTokenizer:
    """Just enough of mlx-lm's TokenizerWrapper for decoders fed token ids."""

    eos_token_ids: set[int] = set()
    bos_token = None
    has_chat_template = False

    def decode(self, tokens: list[int]) -> str:
        return " ".join(map(str, tokens))


def make_pair() -> tuple[Any, Any]:
    """A target and a draft whose next-token distributions differ a lot (total
    variation about 0.4 after ``PROMPT``), so rejections and residual sampling carry
    weight. Untied embeddings: tied ones make tiny random models echo their input."""
    models = []
    for seed in (3, 4):
        model = make_tiny_llama(
            16, 1, vocab_size=SMALL_VOCAB, seed=seed, tie_word_embeddings=False
        )
        model.lm_head.weight = model.lm_head.weight * 2.0
        mx.eval(model.parameters())
        models.append(model)
    return models[0], models[1]


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    return make_pair()


# -- the reference: mlx-lm's generate_step and sampler ----------------------------------


def mlx_lm_next_token(
    model: Any,
    context: Sequence[int],
    sampler: Callable[[mx.array], mx.array],
    processors: Sequence[Processor] = (),
) -> list[float]:
    """The distribution mlx-lm's ``generate_step`` samples the token after ``context`` from.

    ``sampler`` must come from ``make_sampler`` with a temperature > 0: its last step,
    ``categorical_sampling``, is replaced by one that records ``softmax(logits / T)``.
    """
    seen: list[mx.array] = []
    draw = sample_utils.categorical_sampling

    def read(logits: mx.array, temp: float) -> mx.array:
        seen.append(mx.softmax(logits.astype(mx.float32) * (1.0 / temp), axis=-1))
        return draw(logits, temp)

    with patch.object(sample_utils, "categorical_sampling", read):
        steps = generate_step(
            mx.array(list(context), mx.uint32),
            model,
            max_tokens=1,
            sampler=sampler,
            logits_processors=list(processors),
        )
        next(steps)
        steps.close()
    # generate_step prepares the following step before yielding: the first draw is ours.
    assert seen, "the sampler did not come from mlx_lm.sample_utils.make_sampler"
    return [float(p) for p in seen[0].reshape(-1).tolist()]


def mlx_lm_sequences(
    model: Any,
    prompt: Sequence[int],
    sampler: Callable[[mx.array], mx.array],
    processors: Sequence[Processor] = (),
    length: int = 2,
) -> Distribution:
    """Exact probability of every ``length``-token continuation under mlx-lm."""
    return sequences(
        lambda context: mlx_lm_next_token(model, context, sampler, processors),
        prompt,
        length,
    )


def sequences(
    next_token: Callable[[list[int]], list[float]], prompt: Sequence[int], length: int
) -> Distribution:
    """Chain a next-token distribution into one over ``length``-token continuations."""
    probs: Distribution = {(): 1.0}
    for _ in range(length):
        grown: Distribution = {}
        for seq, p in probs.items():
            for tok, q in enumerate(next_token([*prompt, *seq])):
                if q > 0:
                    grown[seq + (tok,)] = p * q
        probs = grown
    return probs


@dataclass(frozen=True)
class Case:
    """Sampling options, as the decoders take them and as ``make_sampler`` does."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    processors: dict[str, Any] = field(
        default_factory=dict
    )  # make_logits_processors kwargs

    def sampler(self) -> Callable[[mx.array], mx.array]:
        return make_sampler(
            temp=self.temperature,
            top_p=self.top_p if self.top_p < 1.0 else 0.0,
            top_k=self.top_k,
            min_p=self.min_p,
        )

    def logits_processors(self) -> list[Processor]:
        return make_logits_processors(**self.processors) if self.processors else []

    def decoder_options(self) -> dict[str, Any]:
        return {"top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p}


# Every filter changes the distribution on the pair's contexts, and thresholds sit
# well away from the probabilities they are compared with (by 1e-3 or more), so
# float rounding cannot move a token across a filter boundary. The combinations are
# ones where applying the nucleus last, or the filters after the temperature, would
# give a different distribution.
DECODER_CASES = {
    "top_p": Case(0.7, top_p=0.8),
    "top_k": Case(1.0, top_k=4),
    "min_p": Case(1.5, min_p=0.4),
    "top_p+top_k": Case(1.3, top_p=0.8, top_k=4),
    "top_p+min_p": Case(1.3, top_p=0.65, min_p=0.4),
}
DROP_IN_CASES = {
    "top_p": Case(0.7, top_p=0.8),
    "top_k+min_p": Case(1.3, top_k=4, min_p=0.4),
    "penalties+bias": Case(
        1.0,
        processors={
            "repetition_penalty": 2.0,
            "presence_penalty": 1.5,
            "logit_bias": {0: 2.0},
        },
    ),
}
DECODER_SAMPLES = 1_200
DROP_IN_SAMPLES = 1_000
# Sharing one coin between two positions moves the distribution less than a wrong
# filter does (chi-square distance about 0.05 here): more samples.
XTC_SAMPLES = 1_500


def expected(pair: tuple[Any, Any], case: Case) -> Distribution:
    return mlx_lm_sequences(pair[0], PROMPT, case.sampler(), case.logits_processors())


def check_sample(
    counts: Counter[tuple[int, ...]], rejected: int, n: int, reference: Distribution
) -> None:
    # Both branches of the acceptance rule must carry weight for the test to mean much.
    assert 0.05 < rejected / n < 0.95, f"first draft rejected {rejected} of {n} times"
    p = chi_square_pvalue(counts, reference)
    assert p > ALPHA, f"p = {p:.2e}; counts {dict(counts)} vs expected {reference}"


# -- the decoders -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODER_CASES)
def test_decoders_follow_mlx_lm_filters(pair, name):
    """Two-token continuations of the fast or detailed decoder, K = 1."""
    case = DECODER_CASES[name]
    # Alternate the two decoders over the cases; they share the decode loop.
    cls = (
        ManualSpeculativeDecoder
        if list(DECODER_CASES).index(name) % 2 == 0
        else SpeculativeDecoder
    )
    decoder = cls(
        pair[0], pair[1], NoTokenizer(), 1, case.temperature, **case.decoder_options()
    )
    mx.random.seed(1000 + list(DECODER_CASES).index(name))
    counts: Counter[tuple[int, ...]] = Counter()
    rejected = 0
    for _ in range(DECODER_SAMPLES):
        result = decoder.generate(PROMPT, 2)
        counts[tuple(result.tokens)] += 1
        rejected += result.num_accepted_tokens < result.num_draft_tokens
    check_sample(counts, rejected, DECODER_SAMPLES, expected(pair, case))


# -- the mlx-lm drop-in ---------------------------------------------------------------------


@pytest.mark.parametrize("name", DROP_IN_CASES)
def test_drop_in_follows_mlx_lm_sampler_and_processors(pair, name):
    """``speculative_generate_step`` with an opaque ``make_sampler`` sampler and
    ``make_logits_processors``: two tokens, K = 1, as mlx-lm's generator would give."""
    case = DROP_IN_CASES[name]
    sampler, processors = case.sampler(), case.logits_processors()
    prompt = mx.array(PROMPT, mx.uint32)
    mx.random.seed(2000 + list(DROP_IN_CASES).index(name))
    counts: Counter[tuple[int, ...]] = Counter()
    rejected = 0
    for _ in range(DROP_IN_SAMPLES):
        steps = list(
            speculative_generate_step(
                prompt,
                pair[0],
                pair[1],
                num_draft_tokens=1,
                max_tokens=2,
                sampler=sampler,
                logits_processors=processors,
            )
        )
        counts[tuple(t for t, _, _ in steps)] += 1
        rejected += not steps[0][2]
    check_sample(counts, rejected, DROP_IN_SAMPLES, expected(pair, case))


def test_drop_in_follows_mlx_lm_xtc_sampler(pair):
    """mlx-lm's XTC sampler flips one coin per call: with probability 0.5 it drops every
    token above the threshold but the least likely of them. Generating alone, mlx-lm
    flips a fresh coin for every token, so each token follows the even mixture of the
    two filtered distributions, independently of the coins before it."""
    target, draft = pair
    prompt, threshold = [5], 0.05
    always = make_sampler(temp=1.0, xtc_probability=1.0, xtc_threshold=threshold)
    never = make_sampler(temp=1.0)

    def mixture(context: list[int]) -> list[float]:
        on, off = (
            mlx_lm_next_token(target, context, always),
            mlx_lm_next_token(target, context, never),
        )
        return [0.5 * a + 0.5 * b for a, b in zip(on, off)]

    reference = sequences(mixture, prompt, 2)
    sampler = make_sampler(temp=1.0, xtc_probability=0.5, xtc_threshold=threshold)
    mx.random.seed(3000)
    counts: Counter[tuple[int, ...]] = Counter()
    rejected = 0
    for _ in range(XTC_SAMPLES):
        steps = list(
            speculative_generate_step(
                mx.array(prompt, mx.uint32),
                target,
                draft,
                num_draft_tokens=1,
                max_tokens=2,
                sampler=sampler,
            )
        )
        counts[tuple(t for t, _, _ in steps)] += 1
        rejected += not steps[0][2]
    check_sample(counts, rejected, XTC_SAMPLES, reference)


# -- the tests above have power -------------------------------------------------------------


def wrong_answers(pair: tuple[Any, Any], case: Case) -> dict[str, Distribution]:
    """What plausible mistakes would sample from, built from mlx-lm pieces."""
    target = pair[0]
    t = case.temperature
    wrong: dict[str, Distribution] = {}
    processors = case.logits_processors()
    filters = {
        k: v
        for k, v in case.decoder_options().items()
        if v != Case(t).decoder_options()[k]
    }
    for name in filters:
        ignored = Case(
            t,
            **{k: v for k, v in filters.items() if k != name},
            processors=case.processors,
        )
        wrong[f"{name} ignored"] = mlx_lm_sequences(
            target, PROMPT, ignored.sampler(), processors
        )
    if t != 1.0 and ("top_p" in filters or "min_p" in filters):
        # Filters applied to softmax(logits / T) instead of at T = 1 (top_k alone
        # ranks the same at any temperature).
        def scale(_: mx.array, logits: mx.array) -> mx.array:
            return logits * (1.0 / t)

        at_t1 = Case(1.0, **filters)
        wrong["filters after temperature"] = mlx_lm_sequences(
            target, PROMPT, at_t1.sampler(), [*processors, scale]
        )
    if "top_p" in filters and len(filters) > 1:
        # The nucleus taken last, over what the other filters left.
        others = Case(t, **{k: v for k, v in filters.items() if k != "top_p"})

        def others_first(_: mx.array, logits: mx.array) -> mx.array:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if others.min_p:
                logprobs = sample_utils.apply_min_p(logprobs, others.min_p)
            if others.top_k:
                logprobs = sample_utils.apply_top_k(logprobs, others.top_k)
            return logprobs

        wrong["top_p last"] = mlx_lm_sequences(
            target,
            PROMPT,
            Case(t, top_p=case.top_p).sampler(),
            [*processors, others_first],
        )
    if processors:
        # Processors that see the history but not the draft tokens before a position.
        blind = [
            lambda tokens, logits, p=p: p(tokens[: len(PROMPT)], logits)
            for p in processors
        ]
        wrong["processors blind to the tokens so far"] = mlx_lm_sequences(
            target, PROMPT, case.sampler(), blind
        )
        wrong["processors ignored"] = mlx_lm_sequences(target, PROMPT, case.sampler())
    return wrong


@pytest.mark.parametrize(
    "name,case,n",
    [(f"decoder {k}", c, DECODER_SAMPLES) for k, c in DECODER_CASES.items()]
    + [(f"drop-in {k}", c, DROP_IN_SAMPLES) for k, c in DROP_IN_CASES.items()],
    ids=[f"decoder {k}" for k in DECODER_CASES]
    + [f"drop-in {k}" for k in DROP_IN_CASES],
)
def test_sample_sizes_reject_the_wrong_distributions(pair, name, case, n):
    """A seeded sample of each test's size, drawn from a wrong distribution, fails the
    same chi-square test by a wide margin (p < 1e-6)."""
    reference = expected(pair, case)
    wrong = wrong_answers(pair, case)
    assert wrong
    rng = np.random.default_rng(7)
    for label, dist in wrong.items():
        cells = list(dist)
        draws = rng.choice(
            len(cells),
            size=n,
            p=np.array([dist[c] for c in cells]) / sum(dist.values()),
        )
        counts = Counter(cells[i] for i in draws)
        p = chi_square_pvalue(counts, reference)
        assert p < 1e-6, (
            f"{name}: a sample from '{label}' is not rejected (p = {p:.2e})"
        )


# -- greedy: logits processors decide the tokens exactly ----------------------------------------

VOCAB = 97


def test_drop_in_greedy_with_processors_matches_mlx_lm():
    """Greedy tokens with repetition, presence and frequency penalties and a logit bias
    equal mlx-lm's ``generate_step`` with the same processors; the processors change
    the output, and the draft is both accepted and rejected."""
    target = make_tiny_llama(64, 2, vocab_size=VOCAB, seed=1)
    draft = make_tiny_llama(32, 1, vocab_size=VOCAB, seed=2)
    options = {
        "repetition_penalty": 1.5,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "logit_bias": {5: 1.0, 17: -2.0},
        "repetition_context_size": 8,
    }
    rng = random.Random(5)
    changed = accepted = rejected = 0
    for k in (1, 3):
        for _ in range(3):
            prompt = mx.array(
                [rng.randrange(VOCAB) for _ in range(rng.randint(2, 10))], mx.uint32
            )
            processors = make_logits_processors(**options)
            theirs = [
                int(t)
                for t, _ in generate_step(
                    prompt, target, max_tokens=16, logits_processors=processors
                )
            ]
            processors = make_logits_processors(**options)
            ours = list(
                speculative_generate_step(
                    prompt,
                    target,
                    draft,
                    num_draft_tokens=k,
                    max_tokens=16,
                    logits_processors=processors,
                )
            )
            assert [t for t, _, _ in ours] == theirs
            plain = [int(t) for t, _ in generate_step(prompt, target, max_tokens=16)]
            changed += plain != theirs
            accepted += sum(d for _, _, d in ours)
            rejected += sum(not d for _, _, d in ours)
    assert changed >= 3 and accepted > 0 and rejected > 0

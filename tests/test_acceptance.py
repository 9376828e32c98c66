"""speculative_accept: exact greedy cases, forced-uniform branches, the output
distribution, and the C++ kernel against its MLX-op reference."""

from __future__ import annotations

import math

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from speclora.acceptance import (
    PLACEHOLDER,
    speculative_accept,
    speculative_accept_reference,
)

NEG_INF = float("-inf")


def one_hot_logits(ids: list[list[int]], vocab: int) -> mx.array:
    """``[B, N]`` ids -> ``[B, N, V]`` logits whose argmax is each id."""
    return mx.array(np.eye(vocab, dtype=np.float32)[np.array(ids)] * 5.0)


def log_probs(rows: list[list[float]]) -> mx.array:
    """Logits whose softmax at temperature 1 is the given probabilities."""
    with np.errstate(divide="ignore"):
        return mx.array(np.log(np.array(rows, dtype=np.float64)).astype(np.float32))


def accept_both(
    draft_tokens: mx.array,
    draft_logits: mx.array,
    target_logits: mx.array,
    uniforms: mx.array,
    temperature: float,
) -> tuple[list[int], list[list[int]]]:
    """Run the kernel and the reference; assert they agree exactly; return the result."""
    n, tokens = speculative_accept(
        draft_tokens,
        draft_logits,
        target_logits,
        temperature=temperature,
        uniforms=uniforms,
        stream=mx.cpu,
    )
    n_ref, tokens_ref = speculative_accept_reference(
        draft_tokens, draft_logits, target_logits, uniforms, temperature=temperature
    )
    assert n.dtype == tokens.dtype == mx.int32
    assert n.tolist() == n_ref.tolist()
    assert tokens.tolist() == tokens_ref.tolist()
    return n.tolist(), tokens.tolist()


def greedy(draft: list[list[int]], target_argmax: list[list[int]], vocab: int = 8):
    k = len(draft[0])
    draft_tokens = mx.array(draft, mx.int32).reshape(len(draft), k)
    draft_logits = mx.zeros((len(draft), k, vocab))
    target_logits = one_hot_logits(target_argmax, vocab)
    uniforms = mx.zeros((len(draft), k + 1))
    return accept_both(draft_tokens, draft_logits, target_logits, uniforms, 0.0)


# --------------------------------------------------------------- tier 1: greedy


def test_greedy_all_accepted_emits_bonus() -> None:
    assert greedy([[1, 2, 3]], [[1, 2, 3, 7]]) == ([3], [[1, 2, 3, 7]])


def test_greedy_first_rejected_emits_correction() -> None:
    assert greedy([[1, 2, 3]], [[5, 2, 3, 7]]) == ([0], [[5, -1, -1, -1]])


def test_greedy_middle_rejected() -> None:
    assert greedy([[1, 2, 3]], [[1, 6, 3, 7]]) == ([1], [[1, 6, -1, -1]])


def test_greedy_empty_draft_takes_target_argmax() -> None:
    assert greedy([[]], [[4]]) == ([0], [[4]])


def test_greedy_rows_are_independent() -> None:
    n, tokens = greedy(
        [[1, 2], [1, 2], [3, 3], [0, 0]],
        [[1, 2, 5], [1, 0, 5], [2, 3, 4], [0, 0, 0]],
    )
    assert n == [2, 1, 0, 2]
    assert tokens == [[1, 2, 5], [1, 0, -1], [2, -1, -1], [0, 0, 0]]
    assert PLACEHOLDER == -1


def test_greedy_ties_pick_the_lowest_index() -> None:
    target = mx.array([[[0.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]]])
    draft_logits = mx.zeros((1, 1, 4))
    uniforms = mx.zeros((1, 2))
    assert accept_both(mx.array([[2]]), draft_logits, target, uniforms, 0.0) == (
        [0],
        [[1, -1]],
    )
    assert accept_both(mx.array([[1]]), draft_logits, target, uniforms, 0.0) == (
        [1],
        [[1, 0]],
    )


def test_out_of_vocab_drafts_are_rejected_without_validation() -> None:
    target = one_hot_logits([[3, 3, 3], [3, 3, 3]], 4)
    drafts = mx.array([[-1, 3], [4, 3]])
    for temperature in (0.0, 1.0):
        n, tokens = speculative_accept(
            drafts,
            mx.zeros((2, 2, 4)),
            target,
            temperature=temperature,
            uniforms=mx.zeros((2, 3)),
            validate=False,
        )
        assert n.tolist() == [0, 0]
        assert tokens[:, 1:].tolist() == [[-1, -1], [-1, -1]]


def test_any_integer_token_dtype_is_accepted() -> None:
    target = one_hot_logits([[1, 2]], 4)
    for dtype in (mx.int64, mx.uint32, mx.int16, mx.uint8):
        n, tokens = speculative_accept(
            mx.array([[1]], dtype), mx.zeros((1, 1, 4)), target
        )
        assert (n.tolist(), tokens.tolist()) == ([1], [[1, 2]])


# ------------------------------------------------- tier 2: forced uniforms, T > 0

# p and q at the single drafted position, and the target at the bonus position.
P0 = [0.1, 0.2, 0.3, 0.4]
Q0 = [0.4, 0.3, 0.2, 0.1]
BONUS = [0.25, 0.25, 0.25, 0.25]


def forced(draft: int, u: list[float], p0=P0, q0=Q0, bonus=BONUS, temperature=1.0):
    return accept_both(
        mx.array([[draft]]),
        log_probs([[q0]]),
        log_probs([[p0, bonus]]),
        mx.array([u]),
        temperature,
    )


def test_accept_when_u_below_p_over_q() -> None:
    # p(0)/q(0) = 0.25; then the bonus is drawn from the uniform p at u = 0.6.
    assert forced(0, [0.2, 0.6]) == ([1], [[0, 2]])


def test_reject_when_u_above_p_over_q_and_draw_from_residual() -> None:
    # max(p - q, 0) = [0, 0, 0.1, 0.3] -> normalized [0, 0, 0.25, 0.75].
    assert forced(0, [0.3, 0.2]) == ([0], [[2, -1]])
    assert forced(0, [0.3, 0.3]) == ([0], [[3, -1]])
    assert forced(0, [0.3, 0.0]) == ([0], [[2, -1]])
    assert forced(0, [0.3, 0.999999]) == ([0], [[3, -1]])


def test_draft_more_likely_under_target_is_always_accepted() -> None:
    # p(3)/q(3) = 4 > 1.
    assert forced(3, [0.999999, 0.1]) == ([1], [[3, 0]])


def test_draft_impossible_under_draft_but_possible_under_target_is_accepted() -> None:
    q0 = [0.5, 0.5, 0.0, 0.0]
    assert forced(2, [0.999999, 0.1], q0=q0) == ([1], [[2, 0]])


def test_zero_residual_falls_back_to_target() -> None:
    # p == q, and the draft has probability 0 under both: rejected with an
    # all-zero residual, so the correction is drawn from p itself.
    same = [0.5, 0.5, 0.0, 0.0]
    assert forced(3, [0.5, 0.75], p0=same, q0=same) == ([0], [[1, -1]])
    assert forced(3, [0.5, 0.25], p0=same, q0=same) == ([0], [[0, -1]])


def test_masked_vocabulary_is_never_drawn() -> None:
    p0 = [0.0, 0.5, 0.0, 0.5]
    for u in (0.0, 0.3, 0.7, 0.9999999):
        _, tokens = forced(0, [0.999, u], p0=p0, q0=[1.0, 0.0, 0.0, 0.0])
        assert tokens[0][0] in (1, 3)
    bonus = [0.0, 0.0, 1.0, 0.0]
    for u in (0.0, 0.9999999):
        assert forced(3, [0.0, u], bonus=bonus) == ([1], [[3, 2]])


def test_temperature_rescales_both_distributions() -> None:
    # At T = 2 the logits log(P0), log(Q0) give p ~ sqrt(P0), q ~ sqrt(Q0), so
    # p(0)/q(0) = 0.5 instead of 0.25.
    assert forced(0, [0.4, 0.5], temperature=2.0)[0] == [1]
    assert forced(0, [0.4, 0.5], temperature=1.0)[0] == [0]


def test_empty_draft_samples_from_first_target_position() -> None:
    target = log_probs([[[0.2, 0.3, 0.5]]])
    for u, expected in ((0.1, 0), (0.3, 1), (0.6, 2)):
        assert accept_both(
            mx.zeros((1, 0), mx.int32),
            mx.zeros((1, 0, 3)),
            target,
            mx.array([[u]]),
            1.0,
        ) == ([0], [[expected]])


def test_second_position_rejected_uses_last_uniform_for_correction() -> None:
    # Draft [3, 0]: position 0 accepted (p/q = 4); position 1 rejected at u = 0.3.
    drafts = mx.array([[3, 0]])
    draft_logits = log_probs([[Q0, Q0]])
    target_logits = log_probs([[P0, P0, BONUS]])
    assert accept_both(
        drafts, draft_logits, target_logits, mx.array([[0.9, 0.3, 0.3]]), 1.0
    ) == ([1], [[3, 3, -1]])


def point_mass(draft: list[list[int]], vocab: int) -> mx.array:
    """Draft logits of a deterministic proposal (prompt lookup): 0 at the drafted
    id, -inf elsewhere, so ``q`` is one-hot at every temperature."""
    ids = np.array(draft)
    logits = np.full(ids.shape + (vocab,), NEG_INF, np.float32)
    np.put_along_axis(logits, ids[..., None], 0.0, axis=-1)
    return mx.array(logits)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_deterministic_draft_is_accepted_with_the_target_probability(temperature: float) -> None:
    # q(x) = 1: accepted iff u < p(x); rejected, the correction is drawn from p
    # without x, i.e. max(p - onehot(x), 0) renormalized.
    p0 = [0.1, 0.2, 0.3, 0.4]
    target = log_probs([[p0, BONUS]]) * temperature  # p0 again after scaling by 1/T
    draft = point_mass([[2]], 4)
    assert accept_both(mx.array([[2]]), draft, target, mx.array([[0.29, 0.6]]), temperature) == ([1], [[2, 2]])
    # Residual [0.1, 0.2, 0, 0.4] / 0.7: CDF 1/7, 3/7, 3/7, 1.
    for u_last, expected in ((0.1, 0), (0.2, 1), (0.43, 3), (0.99, 3)):
        assert accept_both(
            mx.array([[2]]), draft, target, mx.array([[0.31, u_last]]), temperature
        ) == ([0], [[expected, -1]])


def test_deterministic_draft_the_target_cannot_emit_is_rejected() -> None:
    p0 = [0.5, 0.5, 0.0, 0.0]
    draft = point_mass([[3]], 4)
    for u in (0.0, 0.5):
        assert accept_both(
            mx.array([[3]]), draft, log_probs([[p0, BONUS]]), mx.array([[0.0, u]]), 1.0
        ) == ([0], [[int(u >= 0.5), -1]])


# -------------------------------------------------- tier 3: output distribution


def wilson_hilferty_sf(statistic: float, dof: int) -> float:
    """Survival function of the chi-square distribution (Wilson-Hilferty).

    Within about 15% of the exact value near 1e-3 for dof >= 3 (at dof 3 it gives
    1.13e-3 where the exact tail is 1e-3), so the stated false-failure rate holds
    to that factor.
    """
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    expected = probs[support] * counts.sum()
    statistic = float((((counts[support] - expected) ** 2) / expected).sum())
    return wilson_hilferty_sf(statistic, int(support.sum()) - 1)


# Each test below fails with probability ALPHA for a correct sampler (the
# chi-square test's size); seeds make a run reproducible.
ALPHA = 1e-3
DRAWS = 24_000


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_emitted_token_follows_target_distribution(temperature: float) -> None:
    mx.random.seed(1234)
    V, K = 7, 3
    target = np.array([2.0, 1.0, 0.5, 0.0, -0.5, NEG_INF, 1.5], np.float32)
    draft = np.array([0.0, 2.0, 0.5, 1.5, -1.0, 1.0, 0.0], np.float32)
    target_logits = mx.broadcast_to(mx.array(target), (DRAWS, K + 1, V))
    draft_logits = mx.broadcast_to(mx.array(draft), (DRAWS, K, V))
    # The theory needs drafts drawn from q.
    draft_tokens = mx.random.categorical(draft_logits * (1 / temperature))
    n, tokens = speculative_accept(
        draft_tokens, draft_logits, target_logits, temperature=temperature
    )
    first = np.array(tokens[:, 0])
    counts = np.bincount(first, minlength=V).astype(np.float64)
    scaled = target.astype(np.float64) / temperature
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    assert counts[5] == 0  # masked
    assert chi_square_p_value(counts, p) > ALPHA
    # Both branches were exercised, and the test has power: the drafts alone
    # (what a sampler that accepted everything would emit) fail it.
    assert 0 < float(mx.mean(n == 0)) < 1
    draft_counts = np.bincount(np.array(draft_tokens[:, 0]), minlength=V).astype(
        np.float64
    )
    assert chi_square_p_value(draft_counts, p) < ALPHA


def test_deterministic_drafts_keep_the_target_distribution() -> None:
    """A proposal fixed in advance (prompt lookup) is a one-hot q: the emitted
    token still follows p, whichever token was proposed."""
    mx.random.seed(4321)
    V = 6
    probs = np.array([0.3, 0.05, 0.25, 0.0, 0.15, 0.25])
    target_logits = mx.broadcast_to(log_probs([[probs, probs]]), (DRAWS, 2, V))
    # The proposal cycles through every id, the impossible one (3) included.
    proposals = [[i % V] for i in range(DRAWS)]
    n, tokens = speculative_accept(
        mx.array(proposals, mx.int32), point_mass(proposals, V), target_logits, temperature=1.0
    )
    first = np.array(tokens[:, 0])
    counts = np.bincount(first, minlength=V).astype(np.float64)
    assert counts[3] == 0
    assert chi_square_p_value(counts, probs) > ALPHA
    # Accepted exactly as often as p(x) says, about: 1/6 of the sum of p.
    assert 0.1 < float(mx.mean(n == 1)) < 0.25
    # Power: emitting the proposals themselves fails the test.
    proposed = np.bincount(np.array(proposals)[:, 0], minlength=V).astype(np.float64)
    assert chi_square_p_value(proposed, probs) < ALPHA


def test_bonus_token_follows_target_distribution() -> None:
    mx.random.seed(99)
    V = 5
    probs = np.array([0.05, 0.4, 0.25, 0.0, 0.3])
    target_logits = mx.broadcast_to(
        log_probs([[[1.0, 0, 0, 0, 0], probs]]), (DRAWS, 2, V)
    )
    # The only draft is certain under both models, so it is always accepted.
    draft_logits = mx.broadcast_to(log_probs([[[1.0, 0, 0, 0, 0]]]), (DRAWS, 1, V))
    n, tokens = speculative_accept(
        mx.zeros((DRAWS, 1), mx.int32), draft_logits, target_logits, temperature=1.0
    )
    assert bool(mx.all(n == 1))
    counts = np.bincount(np.array(tokens[:, 1]), minlength=V).astype(np.float64)
    assert counts[3] == 0
    assert chi_square_p_value(counts, probs) > ALPHA


def test_seed_makes_draws_reproducible() -> None:
    logits = mx.random.normal((8, 4, 16), key=mx.random.key(0))
    drafts = mx.argmax(logits[:, :3], axis=-1)
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        runs.append(speculative_accept(drafts, logits[:, :3], logits, temperature=1.0))
    assert runs[0][1].tolist() == runs[1][1].tolist()
    key = mx.random.key(3)
    a = speculative_accept(drafts, logits[:, :3], logits, temperature=1.0, key=key)
    b = speculative_accept(drafts, logits[:, :3], logits, temperature=1.0, key=key)
    assert a[1].tolist() == b[1].tolist()


# ------------------------------------------- tier 4: kernel vs reference, exactly


def random_case(
    key: int, batch: int, k: int, vocab: int, dtype: mx.Dtype, mask_share: float = 0.1
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    keys = mx.random.split(mx.random.key(key), 6)
    target = mx.random.normal((batch, k + 1, vocab), key=keys[0]) * 3
    draft = target[:, :k] + mx.random.normal((batch, k, vocab), key=keys[1]) * 1.5
    masked = mx.random.uniform(shape=(batch, 1, vocab), key=keys[2]) < mask_share
    masked[..., 0] = False
    target = mx.where(masked, NEG_INF, target).astype(dtype)
    draft = mx.where(masked, NEG_INF, draft).astype(dtype)
    if k == 0:
        drafts = mx.zeros((batch, 0), mx.int32)
    else:
        # Half drawn from q, half the target's argmax: both branches get used.
        sampled = mx.random.categorical(draft.astype(mx.float32), key=keys[3])
        greedy_ids = mx.argmax(target[:, :k], axis=-1)
        coin = mx.random.uniform(shape=(batch, k), key=keys[4]) < 0.5
        drafts = mx.where(coin, greedy_ids, sampled).astype(mx.int32)
    uniforms = mx.random.uniform(shape=(batch, k + 1), key=keys[5])
    return drafts, draft, target, uniforms


@pytest.mark.parametrize("vocab", [31, 32, 33, 8193])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_kernel_matches_reference_exactly(vocab: int, dtype: mx.Dtype) -> None:
    batch = 4 if vocab > 1000 else 16
    for k in range(1, 9):
        case = random_case(vocab * 10 + k, batch, k, vocab, dtype)
        for temperature in (0.0, 0.5, 1.3):
            accept_both(*case, temperature)


def test_kernel_matches_reference_on_bfloat16_and_mixed_dtypes() -> None:
    drafts, draft, target, uniforms = random_case(5, 16, 4, 100, mx.float32)
    for d_type, t_type in ((mx.bfloat16, mx.bfloat16), (mx.float16, mx.bfloat16)):
        for temperature in (0.0, 0.8):
            accept_both(
                drafts,
                draft.astype(d_type),
                target.astype(t_type),
                uniforms,
                temperature,
            )


def test_kernel_reads_strided_inputs() -> None:
    drafts, draft, target, uniforms = random_case(6, 6, 3, 40, mx.float32)
    # Non-contiguous views: every other row of a bigger batch, vocab kept.
    wide = mx.concatenate([target, target * 0.5], axis=0)[::2]
    accept_both(drafts, draft, wide, uniforms, 1.0)
    # Broadcast rows (stride 0) and column-major uniforms.
    broadcast = mx.broadcast_to(target[:1], target.shape)
    column_major = mx.array(np.array(uniforms).T).T
    for temperature in (0.0, 1.0):
        accept_both(drafts, draft, broadcast, column_major, temperature)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 4),
    k=st.integers(0, 5),
    vocab=st.integers(1, 12),
    temperature=st.sampled_from([0.0, 0.25, 1.0, 3.0]),
    integer_logits=st.booleans(),
)
def test_kernel_matches_reference_on_small_random_cases(
    seed: int, batch: int, k: int, vocab: int, temperature: float, integer_logits: bool
) -> None:
    drafts, draft, target, uniforms = random_case(
        seed, batch, k, vocab, mx.float32, 0.3
    )
    if integer_logits:
        # Many exact ties in the probabilities.
        draft, target = mx.round(draft / 3), mx.round(target / 3)
    accept_both(drafts, draft, target, uniforms, temperature)


def test_works_inside_compile() -> None:
    drafts, draft, target, uniforms = random_case(8, 4, 3, 50, mx.float32)

    def accept(d, dl, tl, u):
        return speculative_accept(
            d, dl, tl, temperature=0.7, uniforms=u, validate=False
        )

    eager = accept(drafts, draft, target, uniforms)
    for compiled in (mx.compile(accept), mx.compile(accept, shapeless=True)):
        out = compiled(drafts, draft, target, uniforms)
        assert out[0].tolist() == eager[0].tolist()
        assert out[1].tolist() == eager[1].tolist()
    half = mx.compile(accept, shapeless=True)(
        drafts[:2], draft[:2], target[:2], uniforms[:2]
    )
    assert half[1].tolist() == eager[1][:2].tolist()


def test_non_cpu_streams_use_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from speclora import acceptance

    case = random_case(9, 4, 3, 40, mx.float32)
    kernel = speculative_accept(*case[:3], temperature=0.9, uniforms=case[3])
    calls = []

    def reference(*args, **kwargs):
        calls.append(mx.default_stream(mx.default_device()))
        return speculative_accept_reference(*args, **kwargs)

    monkeypatch.setattr(acceptance, "on_cpu", lambda stream: False)
    monkeypatch.setattr(acceptance, "speculative_accept_reference", reference)
    routed = speculative_accept(*case[:3], temperature=0.9, uniforms=case[3])
    assert len(calls) == 1
    assert routed[1].tolist() == kernel[1].tolist()


# ------------------------------------------------------------------ validation

B, K, V = 2, 3, 10
GOOD = {
    "draft_tokens": mx.zeros((B, K), mx.int32),
    "draft_logits": mx.zeros((B, K, V)),
    "target_logits": mx.zeros((B, K + 1, V)),
}


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"draft_tokens": mx.zeros((B * K,), mx.int32)},
            r"draft_tokens must have shape \[B, K\], got \[6\]",
        ),
        (
            {"draft_logits": mx.zeros((B, K))},
            r"draft_logits must have shape \[B, K, V\], got \[2, 3\]",
        ),
        (
            {"target_logits": mx.zeros((B, K + 1, V, 1))},
            r"target_logits must have shape \[B, K\+1, V\], got \[2, 4, 10, 1\]",
        ),
        (
            {"draft_logits": mx.zeros((B + 1, K, V))},
            r"draft_logits \[3, 3, 10\] does not match draft_tokens \[2, 3\]",
        ),
        (
            {"draft_logits": mx.zeros((B, K - 1, V))},
            r"draft_logits \[2, 2, 10\] does not match",
        ),
        (
            {"target_logits": mx.zeros((B, K, V))},
            r"target_logits \[2, 3, 10\] must be \[B, K\+1, V\] = \[2, 4, V\]",
        ),
        (
            {"target_logits": mx.zeros((B + 1, K + 1, V))},
            r"target_logits \[3, 4, 10\] must be",
        ),
        (
            {"draft_logits": mx.zeros((B, K, V + 1))},
            r"disagree on the vocabulary size V",
        ),
        (
            {"draft_tokens": mx.zeros((B, K), mx.float32)},
            r"draft_tokens must have an integer dtype, got float32",
        ),
        (
            {"draft_tokens": mx.zeros((B, K), mx.bool_)},
            r"draft_tokens must have an integer dtype, got bool",
        ),
        (
            {"draft_logits": mx.zeros((B, K, V), mx.int32)},
            r"draft_logits must be float32, float16 or bfloat16, got int32",
        ),
        (
            {"target_logits": mx.zeros((B, K + 1, V), mx.int32)},
            r"target_logits must be float32, float16 or bfloat16, got int32",
        ),
        ({"temperature": -0.5}, r"temperature must be finite and >= 0, got -0.5"),
        (
            {"temperature": float("nan")},
            r"temperature must be finite and >= 0, got nan",
        ),
        (
            {"temperature": float("inf")},
            r"temperature must be finite and >= 0, got inf",
        ),
        (
            {"draft_tokens": mx.full((B, K), V, mx.int32)},
            r"draft_tokens must lie in \[0, V\) = \[0, 10\), got ids in \[10, 10\]",
        ),
        ({"draft_tokens": mx.full((B, K), -3, mx.int32)}, r"got ids in \[-3, -3\]"),
        (
            {"uniforms": mx.zeros((B, K))},
            r"uniforms \[2, 3\] must be \[B, K\+1\] = \[2, 4\]",
        ),
        (
            {"uniforms": mx.zeros((B, K + 1), mx.int32)},
            r"uniforms must have a floating dtype, got int32",
        ),
        (
            {"uniforms": mx.zeros((B, K + 1)), "key": mx.random.key(0)},
            r"pass key or uniforms, not both",
        ),
    ],
)
def test_bad_inputs_raise_value_error(change: dict, message: str) -> None:
    kwargs = {**GOOD, **change}
    with pytest.raises(ValueError, match=r"^\[speculative_accept\] .*" + message):
        speculative_accept(**kwargs)

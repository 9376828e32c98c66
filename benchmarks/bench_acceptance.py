"""Acceptance of K drafts against the target: the fused op, its MLX-op reference,
and mlx-lm's host-side loop, at B = 1.

mlx-lm's ``speculative_generate_step`` decides acceptance on the host: it turns
the verified logits into log-probabilities, takes the greedy sample of every
position, pulls tokens and drafts to Python with ``tolist()`` and compares them
in a loop. ``mlx_lm`` below is that code path; ``mlx_lm_argmax`` drops the
log-probabilities it also computes, for the cheapest host-side variant. Every
contender ends with the result in Python (``tolist``), as a decode loop needs it.
Inputs are evaluated beforehand; drafts all match (the fused op's worst case:
it stops at the first rejection).

Run: ``.venv/bin/python -m pytest benchmarks/bench_acceptance.py --benchmark-only``
"""

from __future__ import annotations

from collections.abc import Callable

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
from speclora.acceptance import speculative_accept, speculative_accept_reference

VOCABS = [4096, 32000, 151936]
DRAFTS = [2, 4, 8]


def inputs(vocab: int, k: int) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    key = mx.random.key(vocab + k)
    target = mx.random.normal((1, k + 1, vocab), key=key) * 4
    draft_logits = target[:, :k]
    draft_tokens = mx.argmax(target[:, :k], axis=-1).astype(mx.int32)
    uniforms = mx.random.uniform(shape=(1, k + 1), key=mx.random.split(key)[0])
    mx.eval(target, draft_logits, draft_tokens, uniforms)
    return draft_tokens, draft_logits, target, uniforms


def fused(temperature: float) -> Callable[..., list]:
    def run(draft_tokens, draft_logits, target, uniforms):
        n, tokens = speculative_accept(
            draft_tokens,
            draft_logits,
            target,
            temperature=temperature,
            uniforms=uniforms,
            validate=False,
        )
        mx.eval(n, tokens)
        return tokens.tolist()

    return run


def reference(temperature: float) -> Callable[..., list]:
    def run(draft_tokens, draft_logits, target, uniforms):
        n, tokens = speculative_accept_reference(
            draft_tokens, draft_logits, target, uniforms, temperature=temperature
        )
        mx.eval(n, tokens)
        return tokens.tolist()

    return run


def mlx_lm(with_logprobs: bool) -> Callable[..., list]:
    # The acceptance part of mlx_lm.generate.speculative_generate_step.
    def run(draft_tokens, draft_logits, target, uniforms):
        logits = target.squeeze(0)
        if with_logprobs:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tokens = mx.argmax(logprobs, axis=-1)
        else:
            tokens = mx.argmax(logits, axis=-1)
        mx.eval(tokens, draft_tokens)
        drafts = draft_tokens[0].tolist()
        tokens = tokens.tolist()
        n = 0
        while n < len(drafts) and tokens[n] == drafts[n]:
            n += 1
        return drafts[:n] + [tokens[n]]

    return run


GREEDY = {
    "fused": fused(0.0),
    "reference": reference(0.0),
    "mlx_lm": mlx_lm(with_logprobs=True),
    "mlx_lm_argmax": mlx_lm(with_logprobs=False),
}
SAMPLING = {"fused": fused(1.0), "reference": reference(1.0)}


def bench(benchmark, run, args) -> None:
    for _ in range(3):
        run(*args)  # warm up
    benchmark.pedantic(run, args=args, rounds=30, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("impl", list(GREEDY))
@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy(benchmark, vocab: int, k: int, impl: str) -> None:
    benchmark.group = f"greedy V={vocab} K={k}"
    args = inputs(vocab, k)
    expected = args[2][0].argmax(axis=-1).tolist()
    result = GREEDY[impl](*args)
    assert (result[0] if impl in ("fused", "reference") else result) == expected
    bench(benchmark, GREEDY[impl], args)


@pytest.mark.parametrize("impl", list(SAMPLING))
@pytest.mark.parametrize("k", DRAFTS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_sampling(benchmark, vocab: int, k: int, impl: str) -> None:
    benchmark.group = f"T=1 V={vocab} K={k}"
    args = inputs(vocab, k)
    assert SAMPLING["fused"](*args) == SAMPLING["reference"](*args)
    bench(benchmark, SAMPLING[impl], args)

"""Rolling back a wrapped sliding-window cache, and what a verification step
costs through it.

Once mlx-lm's ``RotatingKVCache`` has wrapped it cannot drop rejected drafts: the
only exact way back is to recompute the window (a fresh cache and a forward pass
over the last ``W`` tokens). ``RollbackKVCache`` drops them by moving per-row
positions. The second group times one verification round (a ``K + 1``-token
forward plus the rollback of ``K`` rejected tokens) through each cache; mlx-lm's
cache takes its concatenating path there and its round ends with the recompute.

Model: Llama, 256 wide, 4 blocks, every layer windowed (``max_kv_size``), 512
tokens already generated past a window of ``W = 256``.

Run: ``.venv/bin/python -m pytest benchmarks/bench_rollback.py --benchmark-only``
"""

from __future__ import annotations

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import RotatingKVCache
from speclora.cache import RollbackKVCache, make_speculative_cache, trim_cache

WINDOW = 256
HISTORY = 2 * WINDOW
K = 4
VOCAB = 4096


@pytest.fixture(scope="module")
def model() -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
    )
    mx.random.seed(0)
    m = llama.Model(args)
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def history() -> mx.array:
    return mx.random.randint(0, VOCAB, (1, HISTORY + K + 1), key=mx.random.key(1))


def mlx_lm_cache(model: llama.Model) -> list[RotatingKVCache]:
    return [RotatingKVCache(max_size=WINDOW, keep=4) for _ in model.layers]


def recompute_window(model: llama.Model, tokens: mx.array) -> list[RotatingKVCache]:
    cache = mlx_lm_cache(model)
    model(tokens[:, -WINDOW:], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def wrapped_rollback_cache(model: llama.Model, history: mx.array) -> list:
    cache = make_speculative_cache(model, max_kv_size=WINDOW)
    model(history[:, :HISTORY], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def clone(cache: list) -> list:
    """Same arrays, own positions: a trim of the copy leaves the original as is."""
    copies = []
    for c in cache:
        copy = RollbackKVCache.from_state(c.state)
        copy.meta_state = c.meta_state
        copies.append(copy)
    return copies


def test_rollback_trim(benchmark, model, history) -> None:
    benchmark.group = "roll back K tokens of a wrapped window"
    cache = wrapped_rollback_cache(model, history)
    benchmark.pedantic(
        trim_cache,
        setup=lambda: ((clone(cache), K), {}),
        rounds=200,
        warmup_rounds=5,
    )


def test_rollback_recompute_window(benchmark, model, history) -> None:
    benchmark.group = "roll back K tokens of a wrapped window"
    tokens = history[:, :HISTORY]
    benchmark.pedantic(
        recompute_window, args=(model, tokens), rounds=10, iterations=1, warmup_rounds=2
    )


# Each round feeds [last token, K drafts] and rolls the whole block back, so
# every round starts from the same state.


def test_verify_round_rollback_cache(benchmark, model, history) -> None:
    benchmark.group = f"verify K+1={K + 1} tokens, roll back"
    cache = wrapped_rollback_cache(model, history)
    block = history[:, HISTORY : HISTORY + K + 1]

    def verify_round() -> None:
        mx.eval(model(block, cache=cache))
        trim_cache(cache, K + 1)

    benchmark.pedantic(verify_round, rounds=20, iterations=1, warmup_rounds=3)


def test_verify_round_mlx_lm_cache(benchmark, model, history) -> None:
    benchmark.group = f"verify K+1={K + 1} tokens, roll back"
    holder = [recompute_window(model, history[:, :HISTORY])]
    block = history[:, HISTORY : HISTORY + K + 1]

    def verify_round() -> None:
        mx.eval(model(block, cache=holder[0]))
        # Wrapped: no trim possible; restore the window by recomputing it.
        holder[0] = recompute_window(model, history[:, :HISTORY])

    benchmark.pedantic(verify_round, rounds=10, iterations=1, warmup_rounds=2)


def test_verify_forward_only_mlx_lm_cache(benchmark, model, history) -> None:
    # A lower bound, not a usable round: the rejected tokens stay in the cache.
    benchmark.group = f"verify K+1={K + 1} tokens, roll back"
    cache = recompute_window(model, history[:, :HISTORY])
    block = history[:, HISTORY : HISTORY + K + 1]
    benchmark.pedantic(
        lambda: mx.eval(model(block, cache=cache)),
        rounds=20,
        iterations=1,
        warmup_rounds=3,
    )

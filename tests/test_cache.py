"""Rollback of KV caches: the ring-write op against its reference, and
generate -> roll back -> regenerate against a full recompute."""

from __future__ import annotations

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.generate import (
    speculative_generate_step as mlx_lm_speculative_generate_step,
)
from mlx_lm.models import llama
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
from speclora.cache import (
    DEFAULT_HEADROOM,
    CacheRewinder,
    KVQuantization,
    RollbackKVCache,
    kv_ring_write,
    kv_ring_write_reference,
    load_prompt_cache,
    make_speculative_cache,
    prepare_speculative_cache,
    rollback_limit,
    trim_cache,
)
from speclora.generate_step import speculative_generate_step

VOCAB = 61
WINDOW = 8


def tiny_llama(
    window: int | None = WINDOW, seed: int = 0, layers: int = 2
) -> llama.Model:
    """A 2-block Llama; with ``window`` its first block uses sliding-window attention."""
    layer_types = ["full_attention"] * layers
    if window is not None:
        layer_types[0] = "sliding_attention"
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        layer_types=layer_types,
        sliding_window=window,
    )
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def random_tokens(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.random.randint(0, VOCAB, shape, key=mx.random.key(seed))


def run_schedule(
    model: llama.Model,
    cache: list,
    sequences: mx.array,  # [B, T]
    schedule: list[tuple[int, list[int], bool]],
    seed: int = 0,
) -> tuple[list[mx.array], list[int]]:
    """Feed ``S`` tokens per row: row ``b``'s next ``kept[b]`` real tokens, then
    junk, and roll the junk back. The tokens go in as one block (a verification
    step) or, with ``one_by_one``, one call per token (a drafting loop).

    Returns each row's logits for its real tokens and how many it consumed.
    """
    B = sequences.shape[0]
    consumed = [0] * B
    logits: list[list[mx.array]] = [[] for _ in range(B)]
    for step, (S, kept, one_by_one) in enumerate(schedule):
        junk = random_tokens((B, S), seed * 1000 + step)
        block = mx.stack(
            [
                mx.concatenate(
                    [
                        sequences[b, consumed[b] : consumed[b] + kept[b]],
                        junk[b, kept[b] :],
                    ]
                )
                for b in range(B)
            ]
        )
        calls = [block[:, i : i + 1] for i in range(S)] if one_by_one else [block]
        out = mx.concatenate([model(tokens, cache=cache) for tokens in calls], axis=1)
        for b in range(B):
            logits[b].append(out[b, : kept[b]])
            consumed[b] += kept[b]
        rejected = [S - k for k in kept]
        trim_cache(cache, rejected[0] if B == 1 else rejected)
    return [mx.concatenate(rows) for rows in logits], consumed


def assert_matches_full_recompute(
    model: llama.Model, sequences: mx.array, logits: list[mx.array], consumed: list[int]
) -> None:
    for b, (row, n) in enumerate(zip(logits, consumed)):
        full = model(sequences[b : b + 1, :n])[0]
        assert row.shape == full.shape
        assert mx.allclose(row, full, atol=1e-4, rtol=1e-4), f"row {b}"
        assert mx.array_equal(mx.argmax(row, -1), mx.argmax(full, -1))


# Blocks of 1..5 tokens with rollbacks of 0..4, token-by-token runs rolled back
# as a drafting loop does, a prefill block longer than headroom + 1 (the
# concatenating path) and one that wraps the window at once.
SCHEDULE = [
    (3, [3], False),
    (4, [1], False),
    (1, [1], False),
    (5, [2], False),
    (4, [1], True),
    (5, [5], False),
    (12, [12], False),
    (4, [0], False),
    (4, [1], True),
    (4, [3], False),
    (2, [1], False),
    (3, [0], True),
    (5, [4], False),
    (3, [3], True),
]
SCHEDULE_TOKENS = sum(kept[0] for _, kept, _ in SCHEDULE)


# ------------------------------------------------------------- kv_ring_write


def ring_case(key: int, B: int, L: int, S: int, dtype: mx.Dtype = mx.float32):
    keys = mx.random.split(mx.random.key(key), 2)
    cache = mx.random.normal((B, 2, L, 3), key=keys[0]).astype(dtype)
    update = mx.random.normal((B, 2, S, 3), key=keys[1]).astype(dtype)
    return cache, update


@pytest.mark.parametrize(
    "keep, capacity, L, S, starts",
    [
        (0, 0, 16, 3, [0, 5, 13]),  # no rotation; the last row runs off the end
        (0, 10, 10, 4, [0, 8, 23]),  # wraps around the ring end
        (2, 10, 10, 3, [0, 1, 9]),  # sink slots stay, the rest rotates
        (2, 10, 10, 19, [4, 0, 11]),  # more positions than the ring: later wins
        (0, 12, 8, 3, [5, 6, -2]),  # buffer not grown to capacity; negative start
    ],
)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_ring_write_matches_reference(keep, capacity, L, S, starts, dtype) -> None:
    cache, update = ring_case(L * 100 + S, len(starts), L, S, dtype)
    start = mx.array(starts)
    expected = kv_ring_write_reference(
        cache, update, start, keep=keep, capacity=capacity
    )
    got = kv_ring_write(cache, update, start, keep=keep, capacity=capacity)
    assert got.dtype == dtype
    assert mx.array_equal(got, expected)


def test_ring_write_places_rows_at_their_own_positions() -> None:
    cache = mx.zeros((2, 1, 6, 1))
    update = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(2, 1, 3, 1)
    out = kv_ring_write(cache, update, mx.array([4, 1]), keep=1, capacity=6)
    # Row 0: positions 4, 5, 6 -> slots 4, 5, 1 (slot 0 is kept).
    assert out[:, 0, :, 0].tolist() == [[0, 3, 0, 0, 1, 2], [0, 4, 5, 6, 0, 0]]


def test_ring_write_leaves_a_referenced_input_intact() -> None:
    cache = mx.zeros((1, 1, 4, 2))
    mx.eval(cache)
    out = kv_ring_write(cache, mx.ones((1, 1, 2, 2)), mx.array([1]), keep=0, capacity=0)
    mx.eval(out)
    assert float(cache.sum()) == 0.0
    assert float(out.sum()) == 4.0


def test_ring_write_accepts_strided_updates() -> None:
    cache, update = ring_case(3, 2, 8, 6)
    strided = update[:, :, ::2]
    start = mx.array([1, 6])
    assert mx.array_equal(
        kv_ring_write(cache, strided, start, keep=1, capacity=8),
        kv_ring_write_reference(cache, strided, start, keep=1, capacity=8),
    )


def test_ring_write_routes_non_cpu_streams_to_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import speclora.cache as cache_module

    cache, update = ring_case(4, 2, 8, 3)
    start = mx.array([2, 7])
    monkeypatch.setattr(cache_module, "extension", None)  # any use would fail
    monkeypatch.setattr(cache_module, "on_cpu", lambda stream: False)
    assert mx.array_equal(
        kv_ring_write(cache, update, start, keep=0, capacity=8),
        kv_ring_write_reference(cache, update, start, keep=0, capacity=8),
    )


@pytest.mark.parametrize(
    "cache, update, start, keep, capacity, message",
    [
        (
            mx.zeros((2, 8, 3)),
            mx.zeros((2, 1, 8, 3)),
            mx.zeros(2, mx.int32),
            0,
            0,
            r"cache must have shape \[B, H, L, D\], got \[2, 8, 3\]",
        ),
        (
            mx.zeros((2, 1, 8, 3)),
            mx.zeros((2, 1, 3)),
            mx.zeros(2, mx.int32),
            0,
            0,
            r"update must have shape \[B, H, S, D\], got \[2, 1, 3\]",
        ),
        (
            mx.zeros((2, 1, 8, 3)),
            mx.zeros((2, 1, 1, 4)),
            mx.zeros(2, mx.int32),
            0,
            0,
            r"update \[2, 1, 1, 4\] does not match cache \[2, 1, 8, 3\]",
        ),
        (
            mx.zeros((2, 1, 8, 3)),
            mx.zeros((2, 1, 1, 3)),
            mx.zeros(3, mx.int32),
            0,
            0,
            r"start must have shape \[B\] = \[2\], got \[3\]",
        ),
        (
            mx.zeros((2, 1, 8, 3)),
            mx.zeros((2, 1, 1, 3)),
            mx.zeros(2),
            0,
            0,
            r"start must have an integer dtype, got float32",
        ),
        (
            mx.zeros((2, 1, 8, 3)),
            mx.zeros((2, 1, 1, 3)),
            mx.zeros(2, mx.int32),
            -1,
            0,
            r"keep must be >= 0, got -1",
        ),
        (
            mx.zeros((2, 1, 8, 3)),
            mx.zeros((2, 1, 1, 3)),
            mx.zeros(2, mx.int32),
            4,
            4,
            r"capacity must be 0 \(no rotation\) or greater than keep = 4, got 4",
        ),
    ],
)
def test_ring_write_rejects_bad_inputs(
    cache, update, start, keep, capacity, message
) -> None:
    with pytest.raises(ValueError, match=r"^\[kv_ring_write\] " + message):
        kv_ring_write(cache, update, start, keep=keep, capacity=capacity)


# ------------------------------------------------ generate -> roll back -> regenerate


@pytest.mark.parametrize("windowed", [False, True])
def test_rollback_then_regenerate_gives_identical_tokens(windowed: bool) -> None:
    model = tiny_llama(WINDOW if windowed else None)
    cache = make_speculative_cache(model)
    # A prompt longer than the window, so the rotating cache has wrapped.
    prompt = random_tokens((1, 2 * WINDOW + 3), 1)
    model(prompt[:, :-1], cache=cache)

    def generate(n: int) -> tuple[list[int], list[mx.array]]:
        y, tokens, logits = prompt[:, -1:], [], []
        for _ in range(n):
            out = model(y, cache=cache)[:, -1]
            y = mx.argmax(out, axis=-1, keepdims=True)
            tokens.append(y.item())
            logits.append(out)
        return tokens, logits

    first_tokens, first_logits = generate(5)
    assert trim_cache(cache, 5) == 5
    second_tokens, second_logits = generate(5)
    assert first_tokens == second_tokens
    for a, b in zip(first_logits, second_logits):
        assert mx.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("windowed", [False, True])
def test_verify_and_rollback_match_full_recompute(windowed: bool) -> None:
    model = tiny_llama(WINDOW if windowed else None)
    cache = make_speculative_cache(model, headroom=4)
    expected_types = [RollbackKVCache, KVCache] if windowed else [KVCache, KVCache]
    assert [type(c) for c in cache] == expected_types
    sequences = random_tokens((1, SCHEDULE_TOKENS), 2)
    logits, consumed = run_schedule(model, cache, sequences, SCHEDULE)
    # Well past the window: the rotating cache wrapped several times.
    assert consumed[0] == SCHEDULE_TOKENS > 4 * WINDOW
    assert_matches_full_recompute(model, sequences, logits, consumed)


def test_rollback_before_the_window_wraps() -> None:
    model = tiny_llama(WINDOW)
    cache = make_speculative_cache(model, headroom=4)
    schedule = [(3, [2], False), (4, [1], False), (2, [1], True)]
    sequences = random_tokens((1, 5), 3)
    logits, consumed = run_schedule(model, cache, sequences, schedule)
    assert not cache[0]._wrapped(0)
    assert_matches_full_recompute(model, sequences, logits, consumed)


@pytest.mark.parametrize("windowed", [False, True])
def test_rows_roll_back_by_their_own_amounts(windowed: bool) -> None:
    model = tiny_llama(WINDOW if windowed else None)
    cache = make_speculative_cache(model, per_row=True, headroom=4)
    assert all(isinstance(c, RollbackKVCache) for c in cache)
    schedule = [
        (6, [6, 6, 6], False),
        (4, [4, 1, 0], False),
        (3, [1, 3, 2], True),
        (5, [5, 0, 3], False),
        (1, [1, 1, 1], False),
        (12, [12, 9, 11], False),
        (5, [2, 5, 4], False),
        (4, [3, 0, 4], True),
        (4, [3, 0, 4], False),
    ]
    sequences = random_tokens((3, 40), 4)
    logits, consumed = run_schedule(model, cache, sequences, schedule)
    assert len(set(consumed)) == 3
    assert isinstance(cache[0].offset, mx.array)
    assert cache[0].offset.tolist() == consumed
    assert_matches_full_recompute(model, sequences, logits, consumed)


def test_attention_sinks_match_mlx_lm_rotating_cache() -> None:
    # max_kv_size gives every layer a window with mlx-lm's 4 sink tokens. mlx-lm's
    # RotatingKVCache is exact when fed one token at a time: use it as reference.
    model = tiny_llama(None)
    cache = make_speculative_cache(model, max_kv_size=WINDOW, headroom=4)
    assert all(isinstance(c, RollbackKVCache) and c.keep == 4 for c in cache)
    sequences = random_tokens((1, SCHEDULE_TOKENS), 5)
    logits, consumed = run_schedule(model, cache, sequences, SCHEDULE)
    reference_cache = [RotatingKVCache(max_size=WINDOW, keep=4) for _ in model.layers]
    reference = mx.concatenate(
        [
            model(sequences[:, i : i + 1], cache=reference_cache)[0]
            for i in range(consumed[0])
        ]
    )
    assert mx.allclose(logits[0], reference, atol=1e-4, rtol=1e-4)


def test_mlx_lm_speculative_decoding_runs_past_the_window() -> None:
    # mlx-lm's own rotating cache refuses rollback once wrapped; with these caches
    # its speculative_generate_step works past the window and matches greedy
    # decoding by full recompute.
    target, draft = tiny_llama(WINDOW, seed=0), tiny_llama(WINDOW, seed=1, layers=2)
    prompt = random_tokens((WINDOW + 2,), 6)
    cache = make_speculative_cache(target) + make_speculative_cache(draft)
    spec = [
        t
        for t, _, _ in mlx_lm_speculative_generate_step(
            prompt, target, draft, prompt_cache=cache, num_draft_tokens=3, max_tokens=24
        )
    ]
    sequence = prompt.tolist()
    for _ in range(24):
        sequence.append(mx.argmax(target(mx.array([sequence]))[0, -1]).item())
    assert spec == sequence[len(prompt) :]
    plain = [
        int(t)
        for t, _ in generate_step(
            prompt, target, prompt_cache=make_speculative_cache(target), max_tokens=24
        )
    ]
    assert plain == spec


# ------------------------------------------------------------ API contract


def test_cache_reports_mlx_lm_bookkeeping() -> None:
    model = tiny_llama(WINDOW)
    cache = make_speculative_cache(model, headroom=4)
    rotating = cache[0]
    assert rotating.is_trimmable() and rotating.empty() and rotating.offset == 0
    model(random_tokens((1, 20), 7), cache=cache)
    assert rotating.offset == 20 and rotating.size() == WINDOW
    assert not rotating.empty() and rotating.nbytes > 0
    keys = rotating.state[0]
    assert keys.shape[2] == WINDOW + 4
    restored = RollbackKVCache.from_state(rotating.state)
    assert restored.offsets == [20] and restored.max_size == WINDOW
    assert restored.keep == 0 and restored.headroom == 4


def test_rollback_deeper_than_headroom_trims_what_it_can() -> None:
    # mlx-lm's contract: trim what can be trimmed and say how much.
    model = tiny_llama(WINDOW)
    cache = make_speculative_cache(model, headroom=2)
    model(random_tokens((1, 20), 8), cache=cache)
    assert cache[0].trim(2) == 2
    assert cache[0].trim(5) == 1  # 3 = headroom + 1 behind the furthest write
    assert cache[0].trim(1) == 0
    assert cache[0].offset == 17
    # Layers that dropped different amounts: the least is reported.
    assert trim_prompt_cache(cache, 2) == 0 and trim_cache(cache, 2) == 0


@pytest.mark.parametrize(
    "n, message",
    [
        (-1, r"\[trim_cache\] cannot trim a negative count -1"),
        ([1, 2], r"layer 0 \(KVCache\) keeps one position for all rows"),
    ],
)
def test_trim_cache_rejects_bad_counts(n, message) -> None:
    model = tiny_llama(None)
    cache = make_speculative_cache(model)
    model(random_tokens((2, 6), 9), cache=cache)
    with pytest.raises(ValueError, match=message):
        trim_cache(cache, n)


def test_trim_cache_with_equal_row_counts_works_on_plain_caches() -> None:
    model = tiny_llama(None)
    cache = make_speculative_cache(model)
    model(random_tokens((2, 6), 10), cache=cache)
    assert trim_cache(cache, mx.array([2, 2])) == [2, 2]
    assert cache[0].offset == 4


def test_trim_per_row_rejects_bad_counts() -> None:
    cache = RollbackKVCache(WINDOW)
    cache.update_and_fetch(mx.zeros((2, 1, 3, 4)), mx.zeros((2, 1, 3, 4)))
    with pytest.raises(ValueError, match=r"got 3 counts for 2 rows"):
        cache.trim_per_row([1, 1, 1])
    with pytest.raises(ValueError, match=r"counts must be >= 0, got \[1, -1\]"):
        cache.trim_per_row(mx.array([1, -1]))
    assert cache.trim_per_row([5, 1]) == [3, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_size": 0}, r"max_size must be >= 1, got 0"),
        ({"max_size": 4, "keep": 4}, r"keep must be in \[0, max_size\), got 4"),
        ({"keep": 2}, r"keep needs a window"),
        ({"max_size": 4, "headroom": -1}, r"headroom must be >= 0, got -1"),
    ],
)
def test_bad_cache_configuration_raises(kwargs, message) -> None:
    with pytest.raises(ValueError, match=r"^\[RollbackKVCache\] " + message):
        RollbackKVCache(**kwargs)


# ------------------------------------------------------- mlx-lm's trim contract


def test_trim_deeper_than_headroom_before_any_wrap_matches_mlx_lm() -> None:
    # W = 35, one 34-token chunk, trim 34: nothing was overwritten, so all of it goes.
    model = tiny_llama(None)
    window = 35
    ours = make_speculative_cache(model, max_kv_size=window)
    theirs = [RotatingKVCache(max_size=window, keep=4) for _ in model.layers]
    chunk = random_tokens((1, 34), 11)
    model(chunk, cache=ours)
    model(chunk, cache=theirs)
    assert trim_prompt_cache(ours, 34) == trim_prompt_cache(theirs, 34) == 34
    assert ours[0].offset == 0
    again = random_tokens((1, 6), 12)
    assert mx.allclose(model(again, cache=ours), model(again), atol=1e-4)


def test_trim_after_a_wrap_trims_what_it_can_and_stays_exact() -> None:
    model = tiny_llama(None)
    cache = make_speculative_cache(model, max_kv_size=WINDOW, headroom=4)
    sequence = random_tokens((1, 40), 13)
    model(sequence[:, :30], cache=cache)
    assert cache[0].is_trimmable()
    # mlx-lm's RotatingKVCache would report is_trimmable() False here and trim 0.
    assert trim_prompt_cache(cache, 34) == 5  # headroom + 1
    assert cache[0].offset == 25
    logits = mx.concatenate(
        [model(sequence[:, i : i + 1], cache=cache) for i in range(25, 40)], axis=1
    )
    reference_cache = [RotatingKVCache(max_size=WINDOW, keep=4) for _ in model.layers]
    reference = mx.concatenate(
        [model(sequence[:, i : i + 1], cache=reference_cache) for i in range(40)],
        axis=1,
    )
    assert mx.allclose(logits, reference[:, 25:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 3, 4])
def test_windows_that_hold_only_the_sink_tokens_are_refused(window: int) -> None:
    # mlx-lm's RotatingKVCache(window <= 4, keep=4) stops storing new tokens.
    with pytest.raises(ValueError, match=r"max_kv_size must be greater than 4"):
        make_speculative_cache(tiny_llama(None), max_kv_size=window)


def test_smallest_window_matches_mlx_lm() -> None:
    model = tiny_llama(None)
    cache = make_speculative_cache(model, max_kv_size=5, headroom=2)
    assert [(c.max_size, c.keep) for c in cache] == [(5, 4), (5, 4)]
    sequences = random_tokens((1, SCHEDULE_TOKENS), 14)
    logits, consumed = run_schedule(model, cache, sequences, SCHEDULE[:6])
    reference_cache = [RotatingKVCache(max_size=5, keep=4) for _ in model.layers]
    reference = mx.concatenate(
        [
            model(sequences[:, i : i + 1], cache=reference_cache)[0]
            for i in range(consumed[0])
        ]
    )
    assert mx.allclose(logits[0], reference, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------- prompt-cache files


def test_prompt_cache_file_round_trip_continues_identically(tmp_path) -> None:
    """mlx-lm's save_prompt_cache / load_prompt_cache on wrapped windows; decoding
    goes on from the loaded caches exactly as from the originals, and as mlx-lm's
    RotatingKVCache fed the whole history token by token."""
    target, draft = tiny_llama(None, seed=0), tiny_llama(None, seed=1, layers=1)
    prompt = random_tokens((30,), 15)
    caches = make_speculative_cache(target, WINDOW) + make_speculative_cache(
        draft, WINDOW
    )
    first = [
        t
        for t, _, _ in speculative_generate_step(
            prompt,
            target,
            draft,
            prompt_cache=caches,
            num_draft_tokens=3,
            max_tokens=60,
        )
    ]
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, caches, metadata={"note": "wrapped"})
    loaded, metadata = mlx_lm_load_prompt_cache(path, return_metadata=True)
    assert metadata == {"note": "wrapped"}
    assert [type(c) for c in loaded] == [RollbackKVCache] * 3
    assert [c.meta_state for c in loaded] == [c.meta_state for c in caches]
    assert loaded[0].offsets[0] > 2 * (WINDOW + DEFAULT_HEADROOM)  # wrapped twice
    assert [c.offsets for c in load_prompt_cache(path)] == [c.offsets for c in caches]

    follow_up = random_tokens((5,), 16)
    continued = [
        [
            t
            for t, _, _ in speculative_generate_step(
                follow_up,
                target,
                draft,
                prompt_cache=c,
                num_draft_tokens=3,
                max_tokens=20,
            )
        ]
        for c in (loaded, caches)
    ]
    # The target's caches held the prompt and all emitted tokens but the last.
    history = prompt.tolist() + first[:-1] + follow_up.tolist()
    reference_cache = [RotatingKVCache(max_size=WINDOW, keep=4) for _ in target.layers]
    expected = generate_step(
        mx.array(history, mx.uint32),
        target,
        prompt_cache=reference_cache,
        prefill_step_size=1,
        max_tokens=20,
    )
    assert continued[0] == continued[1] == [int(t) for t, _ in expected]


def test_prompt_cache_file_keeps_per_row_positions(tmp_path) -> None:
    cache = RollbackKVCache(WINDOW, 2, headroom=3)
    keys = mx.arange(2 * 1 * 14 * 2, dtype=mx.float32).reshape(2, 1, 14, 2)
    cache.update_and_fetch(keys, -keys)
    cache.trim_per_row([1, 4])
    path = str(tmp_path / "rows.safetensors")
    save_prompt_cache(path, [cache])
    (loaded,) = mlx_lm_load_prompt_cache(path)
    assert loaded.offsets == [13, 10] and (loaded.max_size, loaded.keep) == (WINDOW, 2)
    update = mx.ones((2, 1, 3, 2))
    masks = [c.make_mask(3, return_array=True) for c in (loaded, cache)]
    fetched = [c.update_and_fetch(update, -update) for c in (loaded, cache)]
    assert mx.array_equal(masks[0], masks[1])
    assert mx.array_equal(fetched[0][0], fetched[1][0])


# ------------------------------------------------------- layer types and checks


def test_layer_types_mlx_lm_builds() -> None:
    sliding = tiny_llama(WINDOW)
    windowed = make_speculative_cache(sliding, max_kv_size=16)
    assert [(c.max_size, c.keep) for c in windowed] == [(WINDOW, 0), (16, 4)]

    class Hybrid(llama.Model):
        def make_cache(self) -> list:
            return [CacheList(ArraysCache(size=2), KVCache()), ArraysCache(size=1)]

    model = Hybrid(sliding.args)
    hybrid = make_speculative_cache(model, max_kv_size=16)
    assert isinstance(hybrid[0], CacheList) and isinstance(hybrid[1], ArraysCache)
    assert isinstance(hybrid[0].caches[0], ArraysCache)
    assert (hybrid[0].caches[1].max_size, hybrid[0].caches[1].keep) == (16, 4)
    with pytest.raises(
        ValueError, match=r"layer 0\.0 \(ArraysCache\) holds recurrent state"
    ):
        make_speculative_cache(model, per_row=True)
    with pytest.raises(
        ValueError, match=r"layer 0\.0 \(ArraysCache\) cannot be trimmed"
    ):
        trim_cache(hybrid, 1)

    class Odd(llama.Model):
        def make_cache(self) -> list:
            return [KVCache(), object()]

    with pytest.raises(
        ValueError, match=r"layer 1 uses object, which cannot be rolled back"
    ):
        make_speculative_cache(Odd(sliding.args))


def test_empty_mlx_lm_rotating_caches_are_converted_in_place() -> None:
    model = tiny_llama(WINDOW)
    cache = make_prompt_cache(model)
    rotating = cache[0]
    prepare_speculative_cache(cache)
    assert cache[0] is rotating and isinstance(rotating, RollbackKVCache)
    assert (rotating.max_size, rotating.keep, rotating.offset) == (WINDOW, 0, 0)

    used = make_prompt_cache(model)
    model(random_tokens((1, 3), 17), cache=used)
    with pytest.raises(
        ValueError, match=r"layer 0 is an mlx-lm RotatingKVCache that already"
    ):
        prepare_speculative_cache(used)
    with pytest.raises(
        ValueError, match=r"layer 1 uses list, which cannot be rolled back"
    ):
        prepare_speculative_cache([KVCache(), []])


def test_rewinder_refuses_to_roll_back_less_than_asked() -> None:
    model = tiny_llama(WINDOW)
    cache = make_speculative_cache(model, headroom=1)
    model(random_tokens((1, 20), 18), cache=cache)
    rewinder = CacheRewinder(model, cache)
    assert rollback_limit(cache) == 1
    with pytest.raises(
        RuntimeError, match=r"layer 0 \(RollbackKVCache\) rolled back 2 of 3"
    ):
        rewinder.rewind(mx.zeros((4,), mx.uint32), 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 7}, r"bits must be 2-6 or 8, got 7"),
        ({"group_size": 48}, r"group_size must be 32, 64 or 128, got 48"),
        ({"start": -1}, r"start must be >= 0, got -1"),
    ],
)
def test_bad_kv_quantization_raises(kwargs, message) -> None:
    with pytest.raises(ValueError, match=r"^\[KVQuantization\] " + message):
        KVQuantization(**kwargs)


def test_kv_quantization_switches_at_mlx_lm_token() -> None:
    # mlx-lm switches after the call that leaves `start` tokens in the cache.
    quantization = KVQuantization(bits=4, group_size=32, start=6)
    cache = [KVCache(), ArraysCache(size=1)]
    assert quantization.room(cache) == 6

    def feed(n: int) -> None:
        cache[0].update_and_fetch(mx.zeros((1, 1, n, 32)), mx.zeros((1, 1, n, 32)))
        quantization.apply(cache)

    feed(5)
    assert quantization.room(cache) == 1 and type(cache[0]) is KVCache
    feed(1)
    assert quantization.room(cache) is None
    assert isinstance(cache[0], QuantizedKVCache) and cache[0].offset == 6
    assert isinstance(cache[1], ArraysCache)
    model = tiny_llama(None)
    with pytest.raises(ValueError, match=r"layer 0 is a sliding-window cache"):
        quantization.check(model, make_speculative_cache(model, max_kv_size=16))
    # Heads of 16 cannot be quantized in groups of 32: refused before generating.
    with pytest.raises(ValueError, match=r"llama cannot run on a QuantizedKVCache"):
        quantization.check(model, make_speculative_cache(model))

"""Fuzz targets for the native ops: ``speculative_accept``, ``kv_ring_write`` and
``RollbackKVCache``.

Each target draws one case with hypothesis (random ranks, shapes, dtypes, memory
layouts, NaN/inf logits, out-of-range ids and positions, K = 0, V = 1, large K),
runs the op and checks the outcome against a NumPy model of its contract: either
a ``ValueError`` naming the op and the offending argument, raised exactly when the
input is invalid, or a result equal to the model's. A crash, a hang, another
exception type or a wrong value fails the case.

Used by ``tests/test_hardening_inputs.py`` and, under AddressSanitizer, by
``scripts/asan_fuzz.sh``, which runs ``python tests/fuzz_ops.py --examples N``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import speclora  # noqa: F401  (must precede mlx.core: it preloads OpenBLAS)

# isort: split
import mlx.core as mx
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from speclora.acceptance import (
    PLACEHOLDER,
    speculative_accept,
    speculative_accept_reference,
)
from speclora.cache import RollbackKVCache, kv_ring_write, kv_ring_write_reference

TOKEN_DTYPES = [
    mx.int8,
    mx.int16,
    mx.int32,
    mx.int64,
    mx.uint8,
    mx.uint16,
    mx.uint32,
    mx.uint64,
]
LOGIT_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
ANY_DTYPES = [
    mx.bool_,
    *TOKEN_DTYPES,
    *LOGIT_DTYPES,
    mx.float64,
    mx.complex64,
]
INT64_MAX = 2**63 - 1
# Unsigned views of each item size, to compare results bit for bit.
_BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}

OUTCOMES: Counter[str] = Counter()
"""Cases run per target and outcome (``result`` or ``ValueError``), for reports."""


def fuzz_settings(default_examples: int) -> settings:
    """Derandomized settings; ``SPECLORA_FUZZ_EXAMPLES`` overrides the count."""
    examples = int(os.environ.get("SPECLORA_FUZZ_EXAMPLES", default_examples))
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def bits(a: mx.array) -> np.ndarray:
    """The raw bits of ``a`` as unsigned integers of its item size."""
    return np.array(a.view(_BITS[a.dtype.size]))


def with_layout(x: mx.array, layout: str) -> mx.array:
    """The same logical values as ``x`` in another memory layout.

    ``transposed`` permutes the strides; ``strided`` interleaves the last axis
    with NaN (or all-ones bits) that a kernel ignoring strides would read;
    ``broadcast`` repeats row 0 with a zero stride (it changes the values of the
    other rows: callers read the values back from the result).
    """
    if layout == "transposed" and x.ndim >= 2:
        return mx.swapaxes(mx.contiguous(mx.swapaxes(x, 0, -1)), 0, -1)
    if layout == "strided" and x.ndim >= 1:
        if mx.issubdtype(x.dtype, mx.floating):
            junk = mx.full(x.shape, float("nan"), x.dtype)
        else:
            junk = (mx.zeros(x.shape, x.dtype) - 1).astype(x.dtype)
        wide = mx.stack([x, junk], axis=-1).reshape(*x.shape[:-1], 2 * x.shape[-1])
        return wide[..., ::2]
    if layout == "broadcast" and x.ndim >= 1 and x.shape[0] > 0:
        return mx.broadcast_to(x[:1], x.shape)
    return x


def _reshape_rank(shape: tuple[int, ...], grow: bool) -> tuple[int, ...]:
    return (*shape, 1) if grow or len(shape) == 0 else shape[:-1]


def _change_dim(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    axis %= len(shape)
    new = list(shape)
    new[axis] = shape[axis] + 1 if shape[axis] < 2 else shape[axis] - 1
    return tuple(new)


# ---------------------------------------------------------------- speculative_accept

ACCEPT_ARGS = ("draft_tokens", "draft_logits", "target_logits", "uniforms")


@dataclass
class AcceptCase:
    """One call of ``speculative_accept`` and what a correct op must do with it."""

    args: dict[str, mx.array]
    temperature: float
    validate: bool
    key: mx.array | None
    uniforms_given: bool
    invalid: str | None  # the argument a ValueError must name, None if valid
    info: dict[str, Any] = field(default_factory=dict)


def _token_ids(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    vocab: int,
    mode: str,
    dtype: mx.Dtype,
) -> mx.array:
    """Draft ids: in range, or with a share out of range (negative, >= V, huge)."""
    info = np.iinfo(np.dtype(str(dtype).split(".")[-1]))
    ids = rng.integers(0, max(vocab, 1), size=shape).astype(np.int64)
    ids = np.minimum(ids, min(int(info.max), 2**62))
    if mode != "valid" and ids.size:
        specials = [
            vocab,
            vocab + 1,
            -1,
            -(2**31),
            2**31,
            2**32,
            2**32 + 1,
            2**63 - 1,
            -(2**63),
        ]
        choices = np.array(
            [v for v in specials if info.min <= v <= info.max] or [info.max],
            dtype=object,
        )
        mask = rng.random(shape) < 0.4
        picked = rng.choice(choices, size=shape)
        values = np.where(mask, picked, ids.astype(object))
        return mx.array(np.array(values.tolist(), dtype=info.dtype).reshape(shape))
    return mx.array(ids.astype(info.dtype))


def _logits(
    rng: np.random.Generator, shape: tuple[int, ...], specials: str
) -> np.ndarray:
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    if x.size == 0 or specials == "none":
        return x
    if specials == "all -inf":
        return np.full(shape, -np.inf, np.float32)
    if specials == "huge":
        return (x * 1e37).astype(np.float32)
    values = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    mask = rng.random(shape) < 0.25
    if specials == "mixed":
        picked = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), size=shape)
        return np.where(mask, picked, x).astype(np.float32)
    return np.where(mask, np.float32(values[specials]), x).astype(np.float32)


@st.composite
def accept_cases(draw: st.DrawFn) -> AcceptCase:
    """Valid and invalid inputs of ``speculative_accept``; at most one thing wrong."""
    B = draw(st.integers(0, 3))
    K = draw(st.one_of(st.integers(0, 5), st.sampled_from([31, 200])))
    V = draw(st.one_of(st.integers(1, 12), st.sampled_from([33, 256, 1000])))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    fault = draw(
        st.sampled_from(
            ["none"] * 6
            + ["rank", "dim", "dtype", "temperature", "ids", "key+uniforms", "vocab0"]
        )
    )
    if fault == "vocab0":
        V = 0
    token_dtype = draw(st.sampled_from(TOKEN_DTYPES))
    id_mode = (
        "out of range"
        if fault == "ids"
        else draw(st.sampled_from(["valid", "valid", "out of range"]))
    )
    draft_dtype, target_dtype = (
        draw(st.sampled_from(LOGIT_DTYPES)),
        draw(st.sampled_from(LOGIT_DTYPES)),
    )
    specials = draw(
        st.sampled_from(
            ["none", "none", "nan", "inf", "-inf", "mixed", "all -inf", "huge"]
        )
    )
    temperature = draw(
        st.sampled_from([0.0, 0.0, -0.0, 1e-45, 1e-30, 0.3, 1.0, 1.0, 2.5, 1e4, 3e38])
    )
    uniform_mode = draw(
        st.sampled_from(["none", "valid", "valid", "edges", "nan", "out of [0, 1)"])
    )
    validate = draw(st.booleans())

    args = {
        "draft_tokens": _token_ids(rng, (B, K), V, id_mode, token_dtype),
        "draft_logits": mx.array(_logits(rng, (B, K, V), specials)).astype(draft_dtype),
        "target_logits": mx.array(_logits(rng, (B, K + 1, V), specials)).astype(
            target_dtype
        ),
    }
    u = rng.random((B, K + 1)).astype(np.float32)
    if uniform_mode == "edges":
        u = rng.choice(
            np.array([0.0, np.nextafter(np.float32(1), np.float32(0))], np.float32),
            size=(B, K + 1),
        )
    elif uniform_mode == "nan":
        u[rng.random(u.shape) < 0.3] = np.nan
    elif uniform_mode == "out of [0, 1)":
        u = (rng.random((B, K + 1)) * 4 - 2).astype(np.float32)
    uniforms_given = uniform_mode != "none"
    if uniforms_given:
        args["uniforms"] = mx.array(u)

    invalid: str | None = None
    key = None
    if fault == "rank":
        invalid = draw(st.sampled_from(ACCEPT_ARGS))
        if invalid == "uniforms" and not uniforms_given:
            args["uniforms"], uniforms_given = mx.array(u), True
        arr = args[invalid]
        args[invalid] = mx.zeros(
            _reshape_rank(arr.shape, draw(st.booleans())), arr.dtype
        )
    elif fault == "dim":
        invalid = draw(st.sampled_from(ACCEPT_ARGS))
        if invalid == "uniforms" and not uniforms_given:
            args["uniforms"], uniforms_given = mx.array(u), True
        arr = args[invalid]
        axis = draw(st.integers(0, arr.ndim - 1))
        args[invalid] = mx.zeros(_change_dim(arr.shape, axis), arr.dtype)
    elif fault == "dtype":
        invalid = draw(st.sampled_from(ACCEPT_ARGS))
        if invalid == "uniforms" and not uniforms_given:
            args["uniforms"], uniforms_given = mx.array(u), True
        allowed = {
            "draft_tokens": TOKEN_DTYPES,
            "draft_logits": LOGIT_DTYPES,
            "target_logits": LOGIT_DTYPES,
            "uniforms": [mx.float16, mx.bfloat16, mx.float32, mx.float64],
        }[invalid]
        bad = draw(st.sampled_from([d for d in ANY_DTYPES if d not in allowed]))
        args[invalid] = args[invalid].astype(bad)
    elif fault == "temperature":
        invalid = "temperature"
        temperature = draw(
            st.sampled_from(
                [-1.0, -1e-30, float("nan"), float("inf"), float("-inf"), 1e39]
            )
        )
    elif fault == "ids":
        validate = True
        if B * K and id_mode != "valid":
            ids = np.array(args["draft_tokens"].tolist(), dtype=object)
            if any(not 0 <= int(i) < V for i in ids.ravel()):
                invalid = "draft_tokens"
    elif fault == "key+uniforms":
        if not uniforms_given:
            args["uniforms"], uniforms_given = mx.array(u), True
        key = mx.random.key(seed)
        invalid = "key or uniforms"
    elif fault == "vocab0":
        invalid = "vocabulary size V"
    if fault not in ("key+uniforms",) and not uniforms_given and draw(st.booleans()):
        key = mx.random.key(seed)
    if fault == "none" and validate and B * K:
        ids = np.array(args["draft_tokens"].tolist(), dtype=object)
        if any(not 0 <= int(i) < V for i in ids.ravel()):
            invalid = "draft_tokens"

    layout = draw(
        st.sampled_from(
            ["contiguous", "contiguous", "transposed", "strided", "broadcast"]
        )
    )
    target = draw(st.sampled_from(ACCEPT_ARGS))
    if target in args and invalid != target:
        args[target] = with_layout(args[target], layout)
    return AcceptCase(
        args=args,
        temperature=temperature,
        validate=validate,
        key=key,
        uniforms_given=uniforms_given,
        invalid=invalid,
        info={
            "B": B,
            "K": K,
            "V": V,
            "fault": fault,
            "layout": layout,
            "specials": specials,
        },
    )


def _first_argmax(row: np.ndarray) -> int:
    """mx.argmax's rule: the first maximum, NaN counting as the maximum."""
    nan = np.flatnonzero(np.isnan(row))
    return int(nan[0]) if nan.size else int(np.argmax(row))


def check_accept(case: AcceptCase) -> str:
    """Run one case; returns the outcome (``result`` or ``ValueError``)."""
    args = case.args
    try:
        num_accepted, tokens = speculative_accept(
            args["draft_tokens"],
            args["draft_logits"],
            args["target_logits"],
            temperature=case.temperature,
            key=case.key,
            uniforms=args.get("uniforms"),
            validate=case.validate,
        )
        mx.eval(num_accepted, tokens)
    except ValueError as e:
        message = str(e)
        assert message.startswith("[speculative_accept]"), message
        assert case.invalid is not None, f"valid input refused: {message} ({case.info})"
        assert case.invalid in message, f"{message!r} does not name {case.invalid!r}"
        return "ValueError"
    assert case.invalid is None, f"invalid {case.invalid} accepted ({case.info})"

    B, K, V = case.info["B"], case.info["K"], case.info["V"]
    assert num_accepted.dtype == mx.int32 and tuple(num_accepted.shape) == (B,)
    assert tokens.dtype == mx.int32 and tuple(tokens.shape) == (B, K + 1)
    drafts = np.array(args["draft_tokens"].tolist(), dtype=object).reshape(B, K)
    target = np.array(args["target_logits"].astype(mx.float32))
    n_all = cast(list[int], num_accepted.tolist())
    tok_all = cast(list[list[int]], tokens.tolist())
    greedy = np.float32(case.temperature) == 0
    for b in range(B):
        n, row = n_all[b], tok_all[b]
        assert 0 <= n <= K, (n, case.info)
        for i in range(n):
            assert row[i] == drafts[b, i] and 0 <= drafts[b, i] < V, (
                row,
                drafts[b],
                case.info,
            )
        assert 0 <= row[n] < V, (row, case.info)
        assert all(t == PLACEHOLDER for t in row[n + 1 :]), (row, case.info)
        if greedy:
            best = [_first_argmax(target[b, i]) for i in range(K + 1)]
            expect_n = 0
            while expect_n < K and drafts[b, expect_n] == best[expect_n]:
                expect_n += 1
            assert (n, row[n]) == (expect_n, best[expect_n]), (n, row, best, case.info)

    if case.uniforms_given:
        # Same uniforms: the kernel must agree with the MLX-op composition bit for
        # bit. NaN logits are exempt: the two may reduce them in different orders.
        has_nan = any(
            bool(mx.any(mx.isnan(args[k].astype(mx.float32))).item())
            for k in ("draft_logits", "target_logits")
        )
        if not has_nan:
            ref_n, ref_tokens = speculative_accept_reference(
                args["draft_tokens"],
                args["draft_logits"],
                args["target_logits"],
                args["uniforms"],
                temperature=case.temperature,
            )
            assert ref_n.tolist() == n_all and ref_tokens.tolist() == tok_all, (
                ref_tokens.tolist(),
                tok_all,
                case.info,
            )
    return "result"


# ---------------------------------------------------------------- kv_ring_write


@dataclass
class RingCase:
    """One call of ``kv_ring_write``."""

    cache: mx.array
    update: mx.array
    start: mx.array
    keep: Any
    capacity: Any
    donate: bool
    invalid: str | None
    info: dict[str, Any] = field(default_factory=dict)


@st.composite
def ring_cases(draw: st.DrawFn) -> RingCase:
    """Valid and invalid inputs of ``kv_ring_write``; at most one thing wrong."""
    B, H, D = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    L, S = (
        draw(st.integers(0, 12)),
        draw(st.one_of(st.integers(0, 6), st.integers(7, 40))),
    )
    keep: Any = draw(st.integers(0, 4))
    capacity: Any = draw(st.one_of(st.just(0), st.integers(keep + 1, keep + 14)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cache_dtype = draw(st.sampled_from(ANY_DTYPES))
    update_dtype = draw(st.one_of(st.just(cache_dtype), st.sampled_from(ANY_DTYPES)))
    start_dtype = draw(st.sampled_from(TOKEN_DTYPES))
    info = np.iinfo(np.dtype(str(start_dtype).split(".")[-1]))
    starts = rng.integers(-6, 3 * max(L, 1) + 6, size=(B,))
    specials = [2**31 - 1, 2**31, 2**32 + 1, 2**40, -(2**40), 2**63 - 1, -(2**63)]
    if B and draw(st.booleans()):
        starts = starts.astype(object)
        starts[draw(st.integers(0, B - 1))] = draw(st.sampled_from(specials))
    start_np = np.array(
        [int(v) if info.min <= int(v) <= info.max else int(info.max) for v in starts],
        dtype=info.dtype,
    ).reshape(B)
    cache = mx.array(rng.standard_normal((B, H, L, D)).astype(np.float32) * 50).astype(
        cache_dtype
    )
    update = mx.array(rng.standard_normal((B, H, S, D)).astype(np.float32) * 50).astype(
        update_dtype
    )
    start = mx.array(start_np)

    invalid: str | None = None
    fault = draw(
        st.sampled_from(
            ["none"] * 5 + ["rank", "dim", "start", "keep", "capacity", "huge scalar"]
        )
    )
    if fault == "rank":
        invalid = draw(st.sampled_from(["cache", "update"]))
        arr = cache if invalid == "cache" else update
        bad = mx.zeros(_reshape_rank(arr.shape, draw(st.booleans())), arr.dtype)
        cache, update = (bad, update) if invalid == "cache" else (cache, bad)
    elif fault == "dim":
        axis = draw(st.sampled_from([0, 1, 3]))
        update = mx.zeros(_change_dim(update.shape, axis), update.dtype)
        invalid = "update"
    elif fault == "start":
        invalid = "start"
        kind = draw(st.sampled_from(["rank", "length", "dtype"]))
        if kind == "rank":
            start = start.reshape(B, 1)
        elif kind == "length":
            start = mx.zeros((B + 1,), mx.int32)
        else:
            start = start.astype(
                draw(st.sampled_from([mx.float32, mx.bool_, mx.float16]))
            )
    elif fault == "keep":
        keep, invalid = draw(st.integers(-5, -1)), "keep"
    elif fault == "capacity":
        capacity = (
            draw(st.one_of(st.integers(-5, -1), st.integers(1, keep)))
            if keep
            else draw(st.integers(-5, -1))
        )
        invalid = "capacity"
    elif fault == "huge scalar":
        name = draw(st.sampled_from(["keep", "capacity"]))
        value = draw(st.sampled_from([2**31, 2**40, -(2**40), 1.5, "3", None]))
        keep, capacity = (value, capacity) if name == "keep" else (keep, value)
        invalid = name
    layout = draw(
        st.sampled_from(
            ["contiguous", "contiguous", "transposed", "strided", "broadcast"]
        )
    )
    which = draw(st.sampled_from(["cache", "update"]))
    if invalid is None:
        if which == "cache":
            cache = with_layout(cache, layout)
        else:
            update = with_layout(update, layout)
    mx.eval(cache, update, start)
    return RingCase(
        cache=cache,
        update=update,
        start=start,
        keep=keep,
        capacity=capacity,
        donate=draw(st.booleans()),
        invalid=invalid,
        info={
            "shape": (B, H, L, D),
            "S": S,
            "keep": keep,
            "capacity": capacity,
            "fault": fault,
            "layout": layout,
        },
    )


def _slot(position: int, keep: int, capacity: int) -> int:
    if capacity == 0 or position < keep:
        return position
    return keep + (position - keep) % (capacity - keep)


def check_ring(case: RingCase) -> str:
    """Run one ``kv_ring_write`` case against a NumPy model of it."""
    before = bits(case.cache) if case.invalid is None else None
    expected = None
    if case.invalid is None:
        expected = bits(case.cache).copy()
        new = bits(case.update.astype(case.cache.dtype))
        B, _, L, _ = case.cache.shape
        starts = cast(list[int], case.start.tolist())
        for b in range(B):
            # Positions are int64; uint64 starts beyond it saturate.
            first = min(int(starts[b]), INT64_MAX)
            for i in range(case.update.shape[2]):
                position = first + i
                if position < 0 or position > INT64_MAX:
                    continue
                slot = _slot(position, case.keep, case.capacity)
                if slot < L:
                    expected[b, :, slot, :] = new[b, :, i, :]
    try:
        if case.donate:
            # Nothing else holds the buffer: the op may write into it in place.
            holder = [case.cache]
            case.cache = None  # type: ignore[assignment]
            out = kv_ring_write(
                holder.pop(),
                case.update,
                case.start,
                keep=case.keep,
                capacity=case.capacity,
            )
        else:
            out = kv_ring_write(
                case.cache,
                case.update,
                case.start,
                keep=case.keep,
                capacity=case.capacity,
            )
        mx.eval(out)
    except ValueError as e:
        message = str(e)
        assert message.startswith("[kv_ring_write]"), message
        assert case.invalid is not None, f"valid input refused: {message} ({case.info})"
        assert case.invalid in message, f"{message!r} does not name {case.invalid!r}"
        return "ValueError"
    assert case.invalid is None, f"invalid {case.invalid} accepted ({case.info})"
    assert expected is not None and before is not None
    assert tuple(out.shape) == expected.shape
    assert np.array_equal(bits(out), expected), case.info
    if case.cache is not None:
        reference = kv_ring_write_reference(
            case.cache, case.update, case.start, keep=case.keep, capacity=case.capacity
        )
        assert np.array_equal(bits(reference), expected), ("reference", case.info)
        # A buffer the caller still holds is never written through.
        assert np.array_equal(bits(case.cache), before), case.info
    return "result"


# ---------------------------------------------------------------- RollbackKVCache


@dataclass
class CacheProgram:
    """A cache configuration and a sequence of operations on it."""

    max_size: int | None
    keep: int
    headroom: int
    rows: int
    ops: list[tuple[str, Any]]


@st.composite
def cache_programs(draw: st.DrawFn) -> CacheProgram:
    """Random update / trim sequences, including too-deep and malformed rollbacks."""
    max_size = draw(st.one_of(st.none(), st.integers(1, 10)))
    keep = draw(st.integers(0, min(3, max_size - 1))) if max_size else 0
    headroom = draw(st.integers(0, 4))
    rows = draw(st.integers(1, 3))
    op = st.one_of(
        st.tuples(st.just("update"), st.integers(1, headroom + 2)),
        st.tuples(st.just("update"), st.integers(1, 14)),
        st.tuples(st.just("trim"), st.integers(-1, headroom + 3)),
        st.tuples(
            st.just("trim_per_row"),
            st.lists(st.integers(-1, headroom + 3), min_size=rows, max_size=rows),
        ),
        st.tuples(
            st.just("trim_per_row"),
            st.lists(st.integers(0, 3), min_size=rows + 1, max_size=rows + 1),
        ),
        st.tuples(st.just("update_rows"), st.integers(1, 3)),
    )
    ops = draw(st.lists(op, min_size=1, max_size=14))
    return CacheProgram(max_size, keep, headroom, rows, ops)


def _mask_as_array(mask: Any, queries: int, length: int, rows: int) -> np.ndarray:
    """Any make_mask result as a boolean ``[rows, queries, length]`` array."""
    if mask is None:
        return np.ones((rows, queries, length), bool)
    if isinstance(mask, str):
        assert mask == "causal", mask
        offset = length - queries
        m = np.arange(length)[None, :] <= offset + np.arange(queries)[:, None]
        return np.broadcast_to(m, (rows, queries, length))
    m = np.array(mask)
    assert m.ndim == 4 and m.shape[1] == 1 and m.shape[2:] == (queries, length), m.shape
    return np.broadcast_to(m[:, 0], (rows, queries, length))


def check_cache_program(program: CacheProgram) -> str:
    """Run the program on a RollbackKVCache and on a model of what attention must see.

    Every write stores a unique id; after each update, the ids each query can see
    through the cache's own mask must be exactly those of the positions the model
    says are visible (the latest write of each, within the window).
    """
    cache = RollbackKVCache(program.max_size, program.keep, headroom=program.headroom)
    rows = program.rows
    pos = [0] * rows
    frontier = [0] * rows
    held: list[dict[int, int]] = [{} for _ in range(rows)]  # row -> position -> id
    started = False
    next_id = 1
    outcome = "result"
    for kind, arg in program.ops:
        if kind in ("update", "update_rows"):
            S = arg if kind == "update" else 1
            B = rows if kind == "update" else arg
            ids = np.arange(next_id, next_id + B * S, dtype=np.float32).reshape(
                B, 1, S, 1
            )
            if started and B != rows:
                try:
                    cache.update_and_fetch(mx.array(ids), mx.array(-ids))
                except ValueError as e:
                    assert str(e).startswith("[RollbackKVCache]")
                    outcome = "ValueError"
                    continue
                raise AssertionError(f"{B} rows accepted by a cache of {rows}")
            if not started and B != rows:
                continue  # the program's row count is fixed by the first update
            mask = cache.make_mask(S)
            keys, values = cache.update_and_fetch(mx.array(ids), mx.array(-ids))
            mx.eval(keys, values)
            started = True
            next_id += B * S
            for b in range(rows):
                for i in range(S):
                    held[b][pos[b] + i] = int(ids[b, 0, i, 0])
                frontier[b] = max(frontier[b], pos[b] + S)
            length = keys.shape[2]
            m = _mask_as_array(mask, S, length, rows)
            k_np, v_np = np.array(keys)[:, 0, :, 0], np.array(values)[:, 0, :, 0]
            assert np.array_equal(k_np, -v_np)
            for b in range(rows):
                for i in range(S):
                    q = pos[b] + i
                    want = sorted(
                        held[b][p]
                        for p in held[b]
                        if p <= q
                        and (
                            program.max_size is None
                            or p < program.keep
                            or q - p < program.max_size - program.keep
                        )
                    )
                    got = sorted(int(x) for x in k_np[b][m[b, i]])
                    assert got == want, (program, b, i, got, want)
            pos = [p + S for p in pos]
            assert cache.offsets == pos
            for b in range(rows):
                held[b] = {p: v for p, v in held[b].items() if p < pos[b]}
        else:
            counts = [arg] * rows if kind == "trim" else list(arg)
            expect_error = any(c < 0 for c in counts) or (
                started and len(counts) != rows
            )
            try:
                if kind == "trim":
                    dropped = cache.trim(arg)
                else:
                    dropped = cache.trim_per_row(arg)
            except ValueError as e:
                assert str(e).startswith("[RollbackKVCache]"), str(e)
                assert expect_error, (program, kind, arg, str(e))
                assert cache.offsets == (pos if started else [])
                outcome = "ValueError"
                continue
            assert not expect_error, (program, kind, arg)
            if started:
                # mlx-lm's contract: trim what can be trimmed, return how much. A
                # row goes back to 0 while nothing was overwritten, else at most
                # headroom + 1 behind its furthest write.
                capacity = program.max_size and program.max_size + program.headroom
                deepest = [
                    0 if not capacity or f <= capacity else f - (program.headroom + 1)
                    for f in frontier
                ]
                drops = [max(0, min(c, p - d)) for c, p, d in zip(counts, pos, deepest)]
                assert dropped == (max(drops) if kind == "trim" else drops)
                pos = [p - d for p, d in zip(pos, drops)]
                for b in range(rows):
                    held[b] = {p: v for p, v in held[b].items() if p < pos[b]}
                assert cache.offsets == pos
    return outcome


# ---------------------------------------------------------------- runners

TARGETS: dict[str, tuple[Callable[[Any], str], Any]] = {
    "speculative_accept": (check_accept, accept_cases()),
    "kv_ring_write": (check_ring, ring_cases()),
    "RollbackKVCache": (check_cache_program, cache_programs()),
}


def run_target(name: str, examples: int) -> Counter[str]:
    """Fuzz one target for ``examples`` cases; returns the outcome counts."""
    check, strategy = TARGETS[name]
    counts: Counter[str] = Counter()

    @fuzz_settings(examples)
    @given(strategy)
    def run(case: Any) -> None:
        outcome = check(case)
        counts[outcome] += 1
        OUTCOMES[f"{name}: {outcome}"] += 1

    run()
    return counts


def main(argv: list[str] | None = None) -> int:
    """Fuzz every target and print the cases run per outcome."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per target")
    parser.add_argument(
        "--target", choices=sorted(TARGETS), action="append", help="default: all"
    )
    args = parser.parse_args(argv)
    # No buffer reuse: every array gets its own allocation, so a read past one
    # lands in a sanitizer's redzone rather than in a larger cached block.
    mx.set_cache_limit(0)
    total = 0
    for name in args.target or list(TARGETS):
        start = time.perf_counter()
        counts = run_target(name, args.examples)
        total += sum(counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(
            f"{name}: {sum(counts.values())} cases ({detail}) in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    print(f"total: {total} cases, no failure", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which drafted tokens the target accepts, and which token follows them.

:func:`speculative_accept` is one MLX op: a fused C++ kernel on CPU streams and
:func:`speculative_accept_reference`, a composition of MLX ops, on any other
stream (Metal, CUDA). Both compute the same float32 quantities in the same order
(sums accumulated in index order, as ``mx.cumsum`` does), so given the same
uniforms they agree bit for bit.

Randomness is an input: the wrapper draws ``uniforms [B, K+1]`` with
``mx.random.uniform`` (``mx.random.seed`` or ``key=`` make it reproducible) and
the kernels are deterministic functions of them.

Validation: shapes, dtypes and the temperature are checked eagerly (by the C++
op, on every stream) and raise ``ValueError`` with a ``[speculative_accept]``
message. Checking that draft ids lie in ``[0, V)`` needs the data on the host, so
it happens only with ``validate=True`` (one ``mx.max``/``mx.min`` sync); a decode
loop passes ``validate=False``. Either way the kernels never read out of bounds:
an out-of-range draft id is rejected.
"""

from __future__ import annotations

import numbers
from typing import cast

import mlx.core as mx
import numpy as np

from speclora._native import extension, on_cpu, resolve_stream

PLACEHOLDER = -1
"""Fills ``tokens`` after the last emitted token of a row."""


def _leading_true(flags: mx.array) -> mx.array:
    """``[B, K] bool`` -> ``[B] int32``: how many leading entries are True."""
    return mx.sum(mx.cumprod(flags.astype(mx.int32), axis=1), axis=1)


def _softmax_numerators(x: mx.array) -> tuple[mx.array, mx.array]:
    """``exp(x - max)`` over the last axis and its index-order sum (keepdims).

    A row with no finite entry yields zeros and a zero sum.
    """
    m = mx.max(x, axis=-1, keepdims=True)
    e = mx.where(m == -mx.inf, 0.0, mx.exp(x - m))
    return e, mx.cumsum(e, axis=-1)[..., -1:]


def _normalize(e: mx.array, total: mx.array) -> mx.array:
    return mx.where(total > 0, e / total, 0.0)


def _inverse_cdf(weights: mx.array, u: mx.array) -> mx.array:
    """Draw from unnormalized ``weights [B, V]`` with ``u [B]`` -> ``[B] int32``.

    The first index whose running sum exceeds ``u * total``; if rounding leaves
    none, the last index with positive weight; with no positive weight, 0.
    """
    cdf = mx.cumsum(weights, axis=-1)
    above = cdf > (u * cdf[:, -1])[:, None]
    positive = weights > 0
    last_positive = weights.shape[-1] - 1 - mx.argmax(positive[:, ::-1], axis=-1)
    index = mx.where(
        mx.any(above, axis=-1),
        mx.argmax(above, axis=-1),
        mx.where(mx.any(positive, axis=-1), last_positive, 0),
    )
    return index.astype(mx.int32)


def _take_row(a: mx.array, index: mx.array) -> mx.array:
    """``a [B, N, ...]``, ``index [B]`` -> ``a[b, index[b]]`` for each row."""
    index = index.reshape((-1,) + (1,) * (a.ndim - 1))
    return mx.take_along_axis(a, index, axis=1).squeeze(1)


def speculative_accept_reference(
    draft_tokens: mx.array,  # [B, K] int
    draft_logits: mx.array,  # [B, K, V] float
    target_logits: mx.array,  # [B, K+1, V] float
    uniforms: mx.array,  # [B, K+1] float in [0, 1)
    *,
    temperature: float,
) -> tuple[mx.array, mx.array]:
    """The acceptance rule as a composition of MLX ops.

    Same semantics and, given the same ``uniforms``, bit-identical results as
    :func:`speculative_accept` (see there). Inputs are assumed valid; it runs on
    whatever stream is current.

    Args:
        draft_tokens (mx.array): ``[B, K]`` drafted ids.
        draft_logits (mx.array): ``[B, K, V]`` draft logits for them.
        target_logits (mx.array): ``[B, K+1, V]`` target logits at the same
          positions plus one.
        uniforms (mx.array): ``[B, K+1]`` uniforms in ``[0, 1)``.
        temperature (float): ``0`` for greedy matching.

    Returns:
        tuple[mx.array, mx.array]: ``num_accepted [B] int32`` and
        ``tokens [B, K+1] int32``.
    """
    B, K = draft_tokens.shape
    V = target_logits.shape[-1]
    if B == 0:
        # MLX refuses reductions over an empty batch; the answer is empty.
        return mx.zeros((0,), mx.int32), mx.zeros((0, K + 1), mx.int32)
    # int64, as the kernel: an id beyond int32 must not wrap into [0, V).
    drafts = draft_tokens.astype(mx.int64)
    in_vocab = (drafts >= 0) & (drafts < V)
    # The scalar the C++ op receives is a float32; decide and scale with it.
    t32 = np.float32(temperature)

    if t32 == 0:
        best = mx.argmax(target_logits, axis=-1).astype(mx.int32)  # [B, K+1]
        n = _leading_true(in_vocab & (best[:, :K] == drafts))
        following = _take_row(best, n)
    else:
        # A subnormal temperature gives inf, as the kernel's float32 division does.
        with np.errstate(over="ignore"):
            inv_temp = float(np.float32(1.0) / t32)
        u = uniforms.astype(mx.float32)
        e_t, s_t = _softmax_numerators(target_logits.astype(mx.float32) * inv_temp)
        e_d, s_d = _softmax_numerators(draft_logits.astype(mx.float32) * inv_temp)
        p = _normalize(e_t, s_t)  # [B, K+1, V]
        q = _normalize(e_d, s_d)  # [B, K, V]
        safe = mx.where(in_vocab, drafts, 0)[..., None]
        p_x = mx.take_along_axis(p[:, :K], safe, axis=-1)[..., 0]
        q_x = mx.take_along_axis(q, safe, axis=-1)[..., 0]
        n = _leading_true(in_vocab & (u[:, :K] * q_x < p_x))

        # What the next token is drawn from: the residual max(p - q, 0) at the
        # first rejection (p there if the residual is all zero), p at position K
        # when every draft survived.
        weights = _take_row(e_t, n)
        if K > 0:
            residual = _take_row(
                mx.maximum(p[:, :K] - q, 0.0), mx.minimum(n, K - 1)
            )  # [B, V]
            has_residual = mx.cumsum(residual, axis=-1)[:, -1] > 0
            use_residual = (n < K) & has_residual
            weights = mx.where(use_residual[:, None], residual, weights)
        following = _inverse_cdf(weights, u[:, K])

    position = mx.arange(K + 1)[None]
    drafts_padded = mx.concatenate([drafts, mx.zeros((B, 1), drafts.dtype)], axis=1)
    tokens = mx.where(
        position < n[:, None],
        drafts_padded,
        mx.where(position == n[:, None], following[:, None], PLACEHOLDER),
    )
    return n.astype(mx.int32), tokens.astype(mx.int32)


def _check_token_range(draft_tokens: mx.array, vocab_size: int) -> None:
    if draft_tokens.size == 0:
        return
    bounds = mx.stack([mx.min(draft_tokens), mx.max(draft_tokens)]).astype(mx.int64)
    low, high = cast(list[int], bounds.tolist())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"[speculative_accept] draft_tokens must lie in [0, V) = [0, {vocab_size}), "
            f"got ids in [{low}, {high}]."
        )


def speculative_accept(
    draft_tokens: mx.array,  # [B, K] int
    draft_logits: mx.array,  # [B, K, V] float
    target_logits: mx.array,  # [B, K+1, V] float
    *,
    temperature: float = 0.0,
    key: mx.array | None = None,
    uniforms: mx.array | None = None,
    validate: bool = True,
    stream: mx.Stream | mx.Device | mx.DeviceType | None = None,
) -> tuple[mx.array, mx.array]:
    """Accept a prefix of the drafted tokens and pick the token that follows.

    At ``temperature == 0`` a draft survives while it equals the target's argmax
    (lowest index on ties); the next token is the target's argmax at the first
    mismatch, or at position ``K`` when every draft survived.

    At ``temperature > 0`` this is the rejection sampling of Leviathan et al.
    (2023) and Chen et al. (2023) on ``p = softmax(target_logits / T)`` and
    ``q = softmax(draft_logits / T)``: draft ``x_i`` survives iff
    ``u[i] * q(x_i) < p(x_i)`` (probability ``min(1, p/q)``; with ``q(x_i) = 0``
    iff ``p(x_i) > 0``). At the first rejection the next token is drawn from
    ``normalize(max(p - q, 0))`` (from ``p`` if that is zero everywhere), after
    ``K`` survivals from ``p`` at position ``K``, both by inverse CDF with
    ``u[K]``. With drafts drawn from ``q``, emitted tokens follow ``p`` exactly.
    Logits of ``-inf`` (masked vocabulary) have probability zero and are never
    emitted. ``K = 0`` samples one token from ``target_logits[:, 0]``.

    Args:
        draft_tokens (mx.array): ``[B, K]`` drafted ids, any integer dtype.
        draft_logits (mx.array): ``[B, K, V]`` draft logits (float32, float16 or
          bfloat16) the drafts were drawn from. Unused at temperature 0.
        target_logits (mx.array): ``[B, K+1, V]`` target logits at the drafted
          positions plus one.
        temperature (float): Softmax temperature; ``0`` is greedy. Default: ``0.0``.
        key (mx.array, optional): PRNG key for the uniforms. Default: ``None``
          (the global ``mx.random`` state).
        uniforms (mx.array, optional): ``[B, K+1]`` uniforms in ``[0, 1)`` to use
          instead of drawing them. Default: ``None``.
        validate (bool): Also check that draft ids lie in ``[0, V)``, which costs
          a host sync. Default: ``True``.
        stream (mx.Stream or mx.Device, optional): Where to run. Default:
          ``None`` (the default stream of the default device).

    Returns:
        tuple[mx.array, mx.array]: ``num_accepted [B] int32`` and
        ``tokens [B, K+1] int32``: the accepted drafts, then the correction or
        bonus token, then :data:`PLACEHOLDER`.

    Raises:
        ValueError: on bad ranks, shapes, dtypes, temperature, or (with
          ``validate``) draft ids outside ``[0, V)``.
    """
    if key is not None and uniforms is not None:
        raise ValueError("[speculative_accept] pass key or uniforms, not both.")
    for name, value in (
        ("draft_tokens", draft_tokens),
        ("draft_logits", draft_logits),
        ("target_logits", target_logits),
        ("uniforms", uniforms),
        ("key", key),
    ):
        if value is not None and not isinstance(value, mx.array):
            raise ValueError(
                f"[speculative_accept] {name} must be an mx.array, got {type(value).__name__}."
            )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(
            f"[speculative_accept] temperature must be a float, got {temperature!r}."
        )
    s = resolve_stream(stream)
    ext = extension()
    if uniforms is None:
        shape = draft_tokens.shape
        # Rank errors are reported by the op's own checks below.
        rows, k = (shape[0], shape[1]) if len(shape) == 2 else (1, 0)
        if temperature == 0:
            uniforms = mx.zeros((rows, k + 1), mx.float32, stream=s)
        else:
            uniforms = mx.random.uniform(shape=(rows, k + 1), key=key, stream=s)
    ext.check_speculative_accept_inputs(
        draft_tokens, draft_logits, target_logits, uniforms, temperature
    )
    if validate:
        _check_token_range(draft_tokens, target_logits.shape[-1])
    if on_cpu(s):
        num_accepted, tokens = ext.speculative_accept(
            draft_tokens, draft_logits, target_logits, uniforms, temperature, stream=s
        )
        return num_accepted, tokens
    with mx.stream(s):
        return speculative_accept_reference(
            draft_tokens, draft_logits, target_logits, uniforms, temperature=temperature
        )

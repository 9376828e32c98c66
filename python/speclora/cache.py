"""KV caches that speculative decoding can roll back in every state, row by row.

mlx-lm's ``KVCache.trim`` is an O(1) move of the offset and is used as is. Two
things mlx-lm cannot do:

* roll back a rotating (sliding-window) cache once it has wrapped:
  ``RotatingKVCache.is_trimmable()`` turns False at ``offset >= max_size``
  because a write has overwritten what a rollback would need, and its
  multi-token update path mis-evicts;
* roll back each row of a batch by its own amount.

:class:`RollbackKVCache` does both. Its buffer holds ``headroom`` slots beyond
the window, so a block of up to ``headroom + 1`` tokens is written in place (the
``kv_ring_write`` op) without evicting anything a query of the block can still
see, and rolling back up to ``headroom + 1`` tokens behind the furthest write is
an O(1) move of per-row positions: nothing needs restoring because nothing still
needed was overwritten. Attention masks follow from the absolute position each
slot holds, so the attention is exactly the windowed attention of a full
recompute. Longer blocks (a prefill chunk) take a concatenating path, like
mlx-lm's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache

from speclora._native import extension, on_cpu, resolve_stream

DEFAULT_HEADROOM = 32
"""Extra slots of a windowed cache: the longest rollback is ``headroom + 1``."""

_MLX_LM_ROTATING_KEEP = 4
"""The attention-sink slots mlx-lm's ``make_prompt_cache`` gives ``max_kv_size`` caches."""


def kv_ring_write_reference(
    cache: mx.array,  # [B, H, L, D]
    update: mx.array,  # [B, H, S, D]
    start: mx.array,  # [B] int
    *,
    keep: int,
    capacity: int,
) -> mx.array:
    """``kv_ring_write`` as a composition of MLX ops (same results).

    Args:
        cache (mx.array): ``[B, H, L, D]`` buffer.
        update (mx.array): ``[B, H, S, D]`` new entries.
        start (mx.array): ``[B]`` position of ``update[:, :, 0]`` per row.
        keep (int): Leading slots that never rotate.
        capacity (int): Slots of the full ring; ``0`` for no rotation.

    Returns:
        mx.array: The buffer after the write.
    """
    B, H, L, D = cache.shape
    S = update.shape[2]
    # int64, as the kernel: a position beyond int32 must not wrap into the buffer,
    # and uint64 values past the int64 range saturate rather than turn negative.
    if start.dtype == mx.uint64:
        start = mx.minimum(start, mx.array(2**63 - 1, mx.uint64))
    first = start.astype(mx.int64)[:, None]
    index = mx.arange(S)[None]
    # Past int64 the sum wraps negative and is skipped, as the kernel skips it.
    position = first + index  # [B, S]
    if capacity:
        ring = capacity - keep
        slot = mx.where(position < keep, position, keep + (position - keep) % ring)
        # A later position of the same call lands on the same slot: it wins
        # (if that position exists, i.e. does not pass int64).
        superseded = (
            (position >= keep) & (index + ring < S) & (position <= 2**63 - 1 - ring)
        )
    else:
        slot = position
        superseded = mx.zeros(position.shape, mx.bool_)
    skip = (position < 0) | (slot >= L) | superseded
    # Skipped entries go to one scratch slot past the end, sliced off below.
    slot = mx.where(skip, L, slot)[:, None, :, None]
    padded = mx.concatenate([cache, mx.zeros((B, H, 1, D), cache.dtype)], axis=2)
    written = mx.put_along_axis(
        padded, mx.broadcast_to(slot, update.shape), update.astype(cache.dtype), axis=2
    )
    return written[:, :, :L]


def kv_ring_write(
    cache: mx.array,  # [B, H, L, D]
    update: mx.array,  # [B, H, S, D]
    start: mx.array,  # [B] int
    *,
    keep: int,
    capacity: int,
    stream: mx.Stream | mx.Device | mx.DeviceType | None = None,
) -> mx.array:
    """Write ``update[b, :, i]`` into the slot of position ``start[b] + i``.

    Slots: position ``p`` sits in slot ``p`` if ``capacity == 0`` or ``p < keep``,
    else in ``keep + (p - keep) % (capacity - keep)``. When one call writes more
    positions than the rotating part holds, the later one wins; positions below 0
    or past the buffer are skipped. On a CPU stream the C++ op writes in place
    when MLX can donate the buffer; elsewhere :func:`kv_ring_write_reference` runs.

    Args:
        cache (mx.array): ``[B, H, L, D]`` buffer.
        update (mx.array): ``[B, H, S, D]`` new entries.
        start (mx.array): ``[B]`` position of ``update[:, :, 0]`` per row.
        keep (int): Leading slots that never rotate.
        capacity (int): Slots of the full ring; ``0`` for no rotation.
        stream (mx.Stream or mx.Device, optional): Where to run. Default: ``None``.

    Returns:
        mx.array: The buffer after the write, ``[B, H, L, D]``.

    Raises:
        ValueError: on bad ranks, shapes, dtypes, ``keep`` or ``capacity``.
    """
    for name, value in (("cache", cache), ("update", update), ("start", start)):
        if not isinstance(value, mx.array):
            raise ValueError(
                f"[kv_ring_write] {name} must be an mx.array, got {type(value).__name__}."
            )
    for name, number in (("keep", keep), ("capacity", capacity)):
        # The op keeps them as C int.
        if (
            isinstance(number, bool)
            or not isinstance(number, int)
            or not -(2**31) <= number < 2**31
        ):
            raise ValueError(
                f"[kv_ring_write] {name} must be a 32-bit int, got {number!r}."
            )
    s = resolve_stream(stream)
    if on_cpu(s):
        result: mx.array = extension().kv_ring_write(
            cache, update, start, keep=keep, capacity=capacity, stream=s
        )
        return result
    with mx.stream(s):
        return kv_ring_write_reference(
            cache, update, start, keep=keep, capacity=capacity
        )


def _counts(n: mx.array | Sequence[int]) -> list[int]:
    """Per-row counts on the host."""
    values = n.tolist() if isinstance(n, mx.array) else list(n)
    return [int(c) for c in cast(list[int], values)]


class RollbackKVCache(_BaseCache):
    """A KV cache with per-row positions that rolls back in every state.

    With ``max_size`` it is a sliding-window cache and a drop-in for mlx-lm's
    ``RotatingKVCache``: each query attends to the ``keep`` first tokens and the
    last ``max_size - keep`` tokens up to itself. Without, it grows like
    ``KVCache``; use it over ``KVCache`` only to roll rows back by different
    amounts (:meth:`trim_per_row`).

    While every row is at the same position, :attr:`offset` is an ``int``, as in
    mlx-lm; after rows diverge it is an ``mx.array [B]`` (RoPE takes either).

    Args:
        max_size (int, optional): Window length. Default: ``None`` (no window).
        keep (int): Leading tokens that stay visible (attention sinks); only
          with ``max_size``. Default: ``0``.
        headroom (int): Extra slots beyond the window; blocks of up to
          ``headroom + 1`` tokens are written in place and rollbacks of up to
          ``headroom + 1`` tokens are always possible. Default:
          :data:`DEFAULT_HEADROOM`.
    """

    step = 256

    def __init__(
        self,
        max_size: int | None = None,
        keep: int = 0,
        *,
        headroom: int = DEFAULT_HEADROOM,
    ) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError(
                f"[RollbackKVCache] max_size must be >= 1, got {max_size}."
            )
        if keep < 0 or (max_size is not None and keep >= max_size):
            raise ValueError(
                f"[RollbackKVCache] keep must be in [0, max_size), got {keep} "
                f"(max_size={max_size})."
            )
        if max_size is None and keep:
            raise ValueError("[RollbackKVCache] keep needs a window (max_size).")
        if headroom < 0:
            raise ValueError(
                f"[RollbackKVCache] headroom must be >= 0, got {headroom}."
            )
        self.max_size = max_size
        self.keep = keep
        self.headroom = headroom
        self.keys: mx.array | None = None  # [B, H, L, D]
        self.values: mx.array | None = None  # [B, H, L, Dv]
        self._pos: list[int] = []  # per row: position of the next token
        self._frontier: list[int] = []  # per row: furthest position written + 1

    # ------------------------------------------------------------ positions

    @property
    def capacity(self) -> int:
        """Slots of the full ring (``max_size + headroom``); 0 without a window."""
        return 0 if self.max_size is None else self.max_size + self.headroom

    @property
    def offset(self) -> int | mx.array:
        """Position of the next token: an ``int`` while rows agree, else ``[B]``."""
        if not self._pos:
            return 0
        if self._uniform():
            return self._pos[0]
        return mx.array(self._pos, mx.int32)

    @property
    def offsets(self) -> list[int]:
        """Position of the next token of each row (empty before the first update)."""
        return list(self._pos)

    def _uniform(self) -> bool:
        return all(p == self._pos[0] for p in self._pos)

    def _rows(self) -> tuple[list[int], list[int]]:
        """Per-row positions and frontiers; one row at 0 before the first update."""
        return (self._pos, self._frontier) if self._pos else ([0], [0])

    def _in_place(self, n: int) -> bool:
        return self.max_size is None or n <= self.headroom + 1

    def _wrapped(self, n: int) -> bool:
        """Whether, once an ``n``-token block is written in place (``n = 0``: as
        things stand), some slot may hold a position other than its own index."""
        if self.max_size is None:
            return False
        pos, frontier = self._rows()
        return max(max(f, p + n) for f, p in zip(frontier, pos)) > self.capacity

    def _visible_slots(self, n: int) -> int:
        """How many leading buffer slots the fetch of an ``n``-token block returns."""
        written = n if self._in_place(n) else 0
        if self._wrapped(written):
            return self.capacity
        return max(self._rows()[0]) + written

    # --------------------------------------------------------------- update

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        have = 0 if self.keys is None else self.keys.shape[2]
        if needed <= have:
            return
        size = -(-needed // self.step) * self.step
        if self.max_size is not None:
            size = min(size, self.capacity)
        new_k = mx.zeros((B, H, size - have, Dk), keys.dtype)
        new_v = mx.zeros((B, H, size - have, Dv), values.dtype)
        if self.keys is None or self.values is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def update_and_fetch(
        self,
        keys: mx.array,  # [B, H, S, D]
        values: mx.array,  # [B, H, S, Dv]
    ) -> tuple[mx.array, mx.array]:
        """Append ``S`` tokens per row and return what attention reads.

        Args:
            keys (mx.array): ``[B, H, S, D]`` new keys.
            values (mx.array): ``[B, H, S, Dv]`` new values.

        Returns:
            tuple[mx.array, mx.array]: keys and values to attend to, slots in
            buffer order; :meth:`make_mask` describes which each query sees.
        """
        B, _, S, _ = keys.shape
        if not self._pos:
            self._pos, self._frontier = [0] * B, [0] * B
        elif len(self._pos) != B:
            raise ValueError(
                f"[RollbackKVCache] the cache holds {len(self._pos)} rows, got keys "
                f"for {B}."
            )
        in_place = self._in_place(S)
        visible = self._visible_slots(S)
        furthest = max(p + S for p in self._pos)
        needed = furthest if self.max_size is None else min(furthest, self.capacity)
        self._grow(keys, values, needed)
        assert self.keys is not None and self.values is not None
        start = mx.array(self._pos, mx.int32)
        if in_place:
            self.keys = kv_ring_write(
                self.keys, keys, start, keep=self.keep, capacity=self.capacity
            )
            self.values = kv_ring_write(
                self.values, values, start, keep=self.keep, capacity=self.capacity
            )
            out_k, out_v = self.keys, self.values
            if visible < out_k.shape[2]:
                out_k, out_v = out_k[..., :visible, :], out_v[..., :visible, :]
        else:
            out_k = mx.concatenate([self.keys[..., :visible, :], keys], axis=2)
            out_v = mx.concatenate([self.values[..., :visible, :], values], axis=2)
            self.keys = kv_ring_write(
                self.keys, keys, start, keep=self.keep, capacity=self.capacity
            )
            self.values = kv_ring_write(
                self.values, values, start, keep=self.keep, capacity=self.capacity
            )
        self._frontier = [max(f, p + S) for f, p in zip(self._frontier, self._pos)]
        self._pos = [p + S for p in self._pos]
        return out_k, out_v

    # ----------------------------------------------------------------- mask

    def _slot_positions(self, top: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """Position held by each of the first ``length`` slots, for rows whose
        latest position is ``top [R, 1]``; and whether it holds one at all."""
        slot = mx.arange(length)[None]  # [1, L]
        if self.max_size is None:
            return mx.broadcast_to(slot, (top.shape[0], length)), slot <= top
        ring = self.capacity - self.keep
        top_slot = mx.where(top < self.keep, top, self.keep + (top - self.keep) % ring)
        rotated = top - (top_slot - slot) % ring
        position = mx.where(slot < self.keep, slot, rotated)
        held = (position >= 0) & (position <= top)
        held = held & ((slot < self.keep) | (position >= self.keep))
        return position, held

    def make_mask(
        self,
        N: int,
        window_size: int | None = None,
        return_array: bool = False,
    ) -> mx.array | str | None:
        """The attention mask for the next ``N``-token update.

        Args:
            N (int): Tokens in the block about to be written.
            window_size (int, optional): The model's sliding window, if any.
              Default: ``None`` (the cache's ``max_size``).
            return_array (bool): Always return a boolean array. Default: ``False``.

        Returns:
            ``None`` or ``"causal"`` where plain causal attention is exact, else a
            boolean mask ``[R, 1, N, L]`` (``R`` is 1 while rows agree, else ``B``).
        """
        span = self.max_size
        if window_size is not None:
            span = window_size if span is None else min(span, window_size)
        rows = self._pos or [0]
        uniform = all(p == rows[0] for p in rows)
        in_place = self._in_place(N)
        if (
            uniform
            and not return_array
            and not self._wrapped(N if in_place else 0)
            and (span is None or rows[0] + N <= span)
        ):
            return None if N == 1 else "causal"

        first = mx.array(rows[:1] if uniform else rows, mx.int32)[:, None]  # [R, 1]
        query = first + mx.arange(N)[None]  # [R, N]
        visible = self._visible_slots(N)
        if in_place:
            position, held = self._slot_positions(first + N - 1, visible)
        else:
            old, old_held = self._slot_positions(first - 1, visible)
            new = mx.broadcast_to(first + mx.arange(N)[None], (first.shape[0], N))
            position = mx.concatenate([old, new], axis=1)
            held = mx.concatenate([old_held, mx.ones(new.shape, mx.bool_)], axis=1)
        position, held = position[:, None, :], held[:, None, :]  # [R, 1, L]
        query = query[:, :, None]  # [R, N, 1]
        mask = held & (position <= query)
        if span is not None:
            keep = self.keep if self.max_size is not None else 0
            mask = mask & ((position < keep) | (query - position < span - keep))
        return mask[:, None]

    # ------------------------------------------------------------- rollback

    def _check_depth(self, row: int, target: int, n: int) -> None:
        if self.max_size is None:
            return
        deepest = self._frontier[row] - (self.headroom + 1)
        if target < deepest:
            raise ValueError(
                f"[RollbackKVCache] cannot roll row {row} back by {n} tokens to "
                f"position {target}: a window of {self.max_size} with headroom "
                f"{self.headroom} keeps positions from {deepest} on after writing up "
                f"to {self._frontier[row]}; build the cache with a larger headroom."
            )

    def trim(self, n: int) -> int:
        """Roll every row back by ``n`` tokens (at most its position).

        Args:
            n (int): Tokens to drop from the end.

        Returns:
            int: Tokens dropped from the longest row.

        Raises:
            ValueError: if ``n < 0`` or, with a window, a row would go back more
              than ``headroom + 1`` tokens behind its furthest write.
        """
        if n < 0:
            raise ValueError(f"[RollbackKVCache] cannot trim a negative count {n}.")
        return max(self.trim_per_row([n] * len(self._pos)), default=0)

    def trim_per_row(self, n: mx.array | Sequence[int]) -> list[int]:
        """Roll row ``b`` back by ``n[b]`` tokens (at most its position).

        Args:
            n (mx.array or Sequence[int]): ``[B]`` non-negative counts. An array is
              read on the host.

        Returns:
            list[int]: Tokens dropped from each row.

        Raises:
            ValueError: on a count that is negative, a length other than ``B``,
              or a rollback deeper than the window allows (see :meth:`trim`).
        """
        counts = _counts(n)
        if len(counts) != len(self._pos) and self._pos:
            raise ValueError(
                f"[RollbackKVCache] got {len(counts)} counts for {len(self._pos)} rows."
            )
        if any(c < 0 for c in counts):
            raise ValueError(f"[RollbackKVCache] counts must be >= 0, got {counts}.")
        if not self._pos:
            return [0] * len(counts)
        dropped = [min(c, p) for c, p in zip(counts, self._pos)]
        targets = [p - d for p, d in zip(self._pos, dropped)]
        for row, (target, count) in enumerate(zip(targets, counts)):
            self._check_depth(row, target, count)
        self._pos = targets
        return dropped

    def is_trimmable(self) -> bool:
        return True

    # ------------------------------------------------------- bookkeeping API

    def size(self) -> int:
        if not self._pos:
            return 0
        longest = max(self._pos)
        return longest if self.max_size is None else min(longest, self.max_size)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return int(self.keys.nbytes + self.values.nbytes)

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        return self.keys, self.values

    @state.setter
    def state(self, v: tuple[mx.array | None, mx.array | None]) -> None:
        self.keys, self.values = v

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (
            "" if self.max_size is None else str(self.max_size),
            str(self.keep),
            str(self.headroom),
            ",".join(map(str, self._pos)),
            ",".join(map(str, self._frontier)),
        )

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        max_size, keep, headroom, pos, frontier = v
        self.max_size = int(max_size) if max_size else None
        self.keep, self.headroom = int(keep), int(headroom)
        self._pos = [int(p) for p in pos.split(",")] if pos else []
        self._frontier = [int(f) for f in frontier.split(",")] if frontier else []


def make_speculative_cache(
    model: nn.Module,
    max_kv_size: int | None = None,
    *,
    per_row: bool = False,
    headroom: int = DEFAULT_HEADROOM,
) -> list[Any]:
    """Caches for ``model`` that can be rolled back in every state.

    Layers the model gives an mlx-lm ``KVCache`` keep it (its ``trim`` is already
    an O(1) offset move), or get a :class:`RollbackKVCache` without a window if
    ``per_row``; sliding-window layers (``RotatingKVCache``) get a windowed
    :class:`RollbackKVCache` of the same window. With ``max_kv_size``, full
    attention layers get a windowed :class:`RollbackKVCache` of that size with
    mlx-lm's 4 sink tokens, as ``mlx_lm``'s ``make_prompt_cache`` does for models
    without their own ``make_cache`` (and, unlike it, for models with one).

    Args:
        model (nn.Module): An mlx-lm model.
        max_kv_size (int, optional): Bound on full-attention layers. Default:
          ``None``.
        per_row (bool): Allow :func:`trim_cache` with a count per row. Default:
          ``False``.
        headroom (int): Rollback depth of windowed layers, see
          :class:`RollbackKVCache`. Default: :data:`DEFAULT_HEADROOM`.

    Returns:
        list: One cache per layer.

    Raises:
        ValueError: if a layer's cache kind cannot be rolled back (e.g. the
          state of a recurrent layer).
    """
    if hasattr(model, "make_cache"):
        base = model.make_cache()
    else:
        base = [KVCache() for _ in model.layers]
    caches: list[Any] = []
    for i, c in enumerate(base):
        if isinstance(c, RotatingKVCache):
            caches.append(RollbackKVCache(c.max_size, c.keep, headroom=headroom))
        elif isinstance(c, KVCache) and max_kv_size is not None:
            keep = min(_MLX_LM_ROTATING_KEEP, max_kv_size - 1)
            caches.append(RollbackKVCache(max_kv_size, keep, headroom=headroom))
        elif isinstance(c, KVCache):
            caches.append(RollbackKVCache(headroom=headroom) if per_row else c)
        elif c.is_trimmable():
            caches.append(c)
        else:
            raise ValueError(
                f"[make_speculative_cache] layer {i} uses {type(c).__name__}, which "
                "cannot be rolled back."
            )
    return caches


def trim_cache(cache: list[Any], n: int | mx.array | Sequence[int]) -> int | list[int]:
    """Roll every layer's cache back by ``n`` tokens, or row ``b`` by ``n[b]``.

    Args:
        cache (list): Caches from :func:`make_speculative_cache` (or any
          trimmable mlx-lm caches for a single count).
        n (int or mx.array or Sequence[int]): One count, or ``[B]`` counts.

    Returns:
        int or list[int]: Tokens dropped (per row for per-row counts).

    Raises:
        ValueError: on negative counts, or per-row counts that differ on a cache
          whose rows share one position (plain ``KVCache``: build the caches with
          ``per_row=True``).
    """
    if isinstance(n, int):
        if n < 0:
            raise ValueError(f"[trim_cache] cannot trim a negative count {n}.")
        dropped = [c.trim(n) for c in cache]
        return dropped[0] if dropped else 0
    counts = _counts(n)
    result: list[int] = []
    for i, c in enumerate(cache):
        if hasattr(c, "trim_per_row"):
            result = c.trim_per_row(counts)
        elif counts and all(k == counts[0] for k in counts):
            result = [c.trim(counts[0])] * len(counts)
        else:
            raise ValueError(
                f"[trim_cache] layer {i} ({type(c).__name__}) keeps one position for "
                f"all rows and cannot trim {counts} per row; build the caches with "
                "make_speculative_cache(..., per_row=True)."
            )
    return result
